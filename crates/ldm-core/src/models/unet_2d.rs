//! diffusers `UNet2DModel`, as the LDM super-resolution checkpoint configures it: resnet and
//! spatial self-attention blocks, conditioned only on the timestep.

use std::path::Path;

use serde::Deserialize;

use crate::backend::Backend;
use crate::models::config::{self, check_size, check_unsupported, check_range, MAX_SAMPLE_SIZE, MAX_CHANNELS, MAX_LAYERS};
use crate::models::unet_2d_blocks::{AttnKind, DownBlock, MidBlock, UpBlock};
use crate::models::unet_2d_condition::broadcast_timesteps;
use crate::nn::{timestep_embedding, Conv2d, GroupNorm, ResnetCfg, TimestepEmbedding, Weights};
use crate::{Error, Result};

/// The keys of `config.json` that this model reads, with diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct UNet2DConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub time_embedding_type: String,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_block_scale_factor: f32,
    pub downsample_padding: usize,
    pub downsample_type: String,
    pub upsample_type: String,
    pub act_fn: String,
    /// Channels per attention head (here it means what it says).
    pub attention_head_dim: Option<usize>,
    pub norm_num_groups: Option<usize>,
    pub attn_norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub resnet_time_scale_shift: String,
    pub add_attention: bool,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
}

impl Default for UNet2DConfig {
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"].map(String::from).to_vec(),
            mid_block_type: Some("UNetMidBlock2D".into()),
            up_block_types: ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"].map(String::from).to_vec(),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
        }
    }
}

impl UNet2DConfig {
    fn check(&self, path: &Path) -> Result<()> {
        let n = self.block_out_channels.len();
        check_size(path, "block_out_channels", n, 16)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            check_size(path, &format!("block_out_channels[{i}]"), c, MAX_CHANNELS)?;
        }
        check_size(path, "in_channels", self.in_channels, MAX_CHANNELS)?;
        check_size(path, "out_channels", self.out_channels, MAX_CHANNELS)?;
        check_size(path, "layers_per_block", self.layers_per_block, MAX_LAYERS)?;
        if let Some(size) = self.sample_size {
            check_size(path, "sample_size", size, MAX_SAMPLE_SIZE)?;
        }
        check_range(path, "downsample_padding", self.downsample_padding, 0, 1)?;
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::config(path, "down_block_types", format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        check_unsupported(path, "act_fn", &self.act_fn.as_str(), &"silu")?;
        check_unsupported(path, "time_embedding_type", &self.time_embedding_type.as_str(), &"positional")?;
        check_unsupported(path, "resnet_time_scale_shift", &self.resnet_time_scale_shift.as_str(), &"default")?;
        check_unsupported(path, "downsample_type", &self.downsample_type.as_str(), &"conv")?;
        check_unsupported(path, "upsample_type", &self.upsample_type.as_str(), &"conv")?;
        check_unsupported(path, "class_embed_type", &self.class_embed_type, &None)?;
        check_unsupported(path, "num_class_embeds", &self.num_class_embeds, &None)?;
        Ok(())
    }
}

/// `UNet2DModel`: predicts the noise of `sample` at `timestep`, without text.
pub struct UNet2DModel<B: Backend> {
    be: B,
    pub config: UNet2DConfig,
    conv_in: Conv2d<B>,
    time_embedding: TimestepEmbedding<B>,
    down_blocks: Vec<DownBlock<B>>,
    mid_block: MidBlock<B>,
    up_blocks: Vec<UpBlock<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> UNet2DModel<B> {
    pub fn load(config: UNet2DConfig, path: &Path, w: &Weights<B>) -> Result<Self> {
        config.check(path)?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let groups = config.norm_num_groups.unwrap_or((ch[0] / 4).clamp(1, 32));
        let temb = ch[0] * 4;
        let resnet = ResnetCfg { temb_channels: Some(temb), groups, eps: config.norm_eps, output_scale_factor: 1.0 };
        let spatial = |c: usize| AttnKind::Spatial { head_dim: config.attention_head_dim.unwrap_or(c), groups, eps: config.norm_eps };
        let mut down_blocks = Vec::new();
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let attn = match kind.as_str() {
                "AttnDownBlock2D" => spatial(ch[i]),
                "DownBlock2D" => AttnKind::None,
                other => return Err(Error::config(path, "down_block_types", format!("`{other}` is not supported (AttnDownBlock2D, DownBlock2D)"))),
            };
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let wb = w.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::load(&wb, config.layers_per_block, cin, ch[i], resnet, attn, i + 1 < n, config.downsample_padding)?);
        }
        match config.mid_block_type.as_deref() {
            Some("UNetMidBlock2D") | None => {}
            Some(other) => return Err(Error::config(path, "mid_block_type", format!("`{other}` is not supported (UNetMidBlock2D)"))),
        }
        let mid_attn = if config.add_attention {
            AttnKind::Spatial {
                head_dim: config.attention_head_dim.unwrap_or(ch[n - 1]),
                groups: config.attn_norm_num_groups.unwrap_or(groups),
                eps: config.norm_eps,
            }
        } else {
            AttnKind::None
        };
        let mid_resnet = ResnetCfg { output_scale_factor: config.mid_block_scale_factor, ..resnet };
        let mid_block = MidBlock::load(&w.pp("mid_block"), ch[n - 1], mid_resnet, mid_attn)?;
        let mut up_blocks = Vec::new();
        let mut out = ch[n - 1];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let r = n - 1 - i;
            let prev = out;
            out = ch[r];
            let attn = match kind.as_str() {
                "AttnUpBlock2D" => spatial(out),
                "UpBlock2D" => AttnKind::None,
                other => return Err(Error::config(path, "up_block_types", format!("`{other}` is not supported (AttnUpBlock2D, UpBlock2D)"))),
            };
            let wb = w.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock::load(&wb, config.layers_per_block + 1, ch[r.saturating_sub(1)], prev, out, resnet, attn, i + 1 < n)?);
        }
        Ok(Self {
            be: w.backend().clone(),
            conv_in: Conv2d::load(&w.pp("conv_in"), config.in_channels, ch[0], 3, 1, 1)?,
            time_embedding: TimestepEmbedding::load(&w.pp("time_embedding"), ch[0], temb)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), groups, ch[0], config.norm_eps)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[0], config.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// How much smaller than the sample the deepest feature map is: samples must be multiples.
    pub fn downscale(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    pub fn forward(&self, sample: &B::Tensor, timesteps: &[f32]) -> Result<B::Tensor> {
        let be = &self.be;
        let d = be.dims(sample);
        if d.len() != 4 || d[1] != self.config.in_channels {
            return Err(Error::InvalidArgument(format!("UNet input has shape {d:?}, expected (batch, {}, height, width)", self.config.in_channels)));
        }
        let f = self.downscale();
        if d[2] % f != 0 || d[3] % f != 0 {
            return Err(Error::InvalidArgument(format!("UNet input of {}x{} is not a multiple of {f}", d[2], d[3])));
        }
        let ts = broadcast_timesteps(timesteps, d[0])?;
        let ch0 = self.config.block_out_channels[0];
        let t = timestep_embedding(&ts, ch0, self.config.flip_sin_to_cos, self.config.freq_shift);
        let emb = self.time_embedding.forward(&be.upload(t, &[d[0], ch0])?)?;
        let x = if self.config.center_input_sample { be.affine(sample, 2.0, -1.0)? } else { sample.clone() };
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, Some(&emb), None, &mut skips)?;
        }
        h = self.mid_block.forward(&h, Some(&emb), None)?;
        for block in &self.up_blocks {
            h = block.forward(&h, Some(&emb), None, &mut skips)?;
        }
        self.conv_out.forward_norm_silu(&self.conv_norm_out, &h)
    }
}

/// Reads the config file of a UNet2DModel folder.
pub fn read_config(dir: &Path) -> Result<UNet2DConfig> {
    config::read(&config::config_path(dir))
}
