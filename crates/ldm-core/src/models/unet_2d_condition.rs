//! diffusers `UNet2DConditionModel`, as the LDM text-to-image checkpoint configures it:
//! cross-attention down/up blocks around a cross-attention mid block, conditioned on the
//! timestep through a sinusoidal embedding and on text through `encoder_hidden_states`.

use std::path::Path;

use serde::Deserialize;

use crate::backend::Backend;
use crate::models::config::{self, check_size, check_unsupported, check_range, MAX_SAMPLE_SIZE, PerBlock, MAX_CHANNELS, MAX_LAYERS};
use crate::models::transformer_2d::TransformerCfg;
use crate::models::unet_2d_blocks::{AttnKind, DownBlock, MidBlock, UpBlock};
use crate::nn::{timestep_embedding, Conv2d, GroupNorm, ResnetCfg, TimestepEmbedding, Weights};
use crate::{Error, Result};

/// The keys of `config.json` that this model reads (others are ignored). Defaults are
/// diffusers' for absent keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f32,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    /// diffusers uses this as the number of heads when `num_attention_heads` is absent.
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub time_embedding_type: String,
    pub resnet_time_scale_shift: String,
    pub upcast_attention: bool,
    pub dual_cross_attention: bool,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
                .map(String::from)
                .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
                .map(String::from)
                .to_vec(),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            time_embedding_type: "positional".into(),
            resnet_time_scale_shift: "default".into(),
            upcast_attention: false,
            dual_cross_attention: false,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
        }
    }
}

/// The block settings derived from a config, checked.
struct Plan {
    n: usize,
    layers: Vec<usize>,
    heads: Vec<usize>,
    context: Vec<usize>,
    tlayers: Vec<usize>,
}

impl UNet2DConditionConfig {
    fn plan(&self, path: &Path) -> Result<Plan> {
        let n = self.block_out_channels.len();
        check_size(path, "block_out_channels", n, 16)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            check_size(path, &format!("block_out_channels[{i}]"), c, MAX_CHANNELS)?;
            if c % self.norm_num_groups.max(1) != 0 {
                return Err(Error::config(path, "norm_num_groups", format!("{} does not divide block_out_channels[{i}] = {c}", self.norm_num_groups)));
            }
        }
        check_size(path, "in_channels", self.in_channels, MAX_CHANNELS)?;
        check_size(path, "out_channels", self.out_channels, MAX_CHANNELS)?;
        check_size(path, "norm_num_groups", self.norm_num_groups, MAX_CHANNELS)?;
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
        check_unsupported(path, "class_embed_type", &self.class_embed_type, &None)?;
        check_unsupported(path, "addition_embed_type", &self.addition_embed_type, &None)?;
        check_unsupported(path, "dual_cross_attention", &self.dual_cross_attention, &false)?;
        check_unsupported(path, "conv_in_kernel", &self.conv_in_kernel, &3)?;
        check_unsupported(path, "conv_out_kernel", &self.conv_out_kernel, &3)?;
        check_unsupported(path, "only_cross_attention", &self.only_cross_attention.expand(n, path, "only_cross_attention")?, &vec![false; n])?;
        let layers = self.layers_per_block.expand(n, path, "layers_per_block")?;
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, path, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, path, "attention_head_dim")?,
        };
        let context = self.cross_attention_dim.expand(n, path, "cross_attention_dim")?;
        let tlayers = self.transformer_layers_per_block.expand(n, path, "transformer_layers_per_block")?;
        for i in 0..n {
            check_size(path, "layers_per_block", layers[i], MAX_LAYERS)?;
            check_size(path, "transformer_layers_per_block", tlayers[i], MAX_LAYERS)?;
            check_size(path, "cross_attention_dim", context[i], MAX_CHANNELS)?;
            check_size(path, "attention_head_dim", heads[i], self.block_out_channels[i])?;
        }
        Ok(Plan { n, layers, heads, context, tlayers })
    }
}

/// `UNet2DConditionModel`: predicts the noise (or v, or x0) of `sample` at `timestep`.
pub struct UNet2DConditionModel<B: Backend> {
    be: B,
    pub config: UNet2DConditionConfig,
    conv_in: Conv2d<B>,
    time_embedding: TimestepEmbedding<B>,
    down_blocks: Vec<DownBlock<B>>,
    mid_block: MidBlock<B>,
    up_blocks: Vec<UpBlock<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Builds the model from its config (`path` names it in errors) and weights.
    pub fn load(config: UNet2DConditionConfig, path: &Path, w: &Weights<B>) -> Result<Self> {
        let p = config.plan(path)?;
        let ch = &config.block_out_channels;
        let temb = ch[0] * 4;
        let resnet = ResnetCfg { temb_channels: Some(temb), groups: config.norm_num_groups, eps: config.norm_eps, output_scale_factor: 1.0 };
        let cross = |i: usize| {
            AttnKind::Cross(TransformerCfg {
                heads: p.heads[i],
                context_dim: p.context[i],
                groups: config.norm_num_groups,
                layers: p.tlayers[i],
                use_linear_projection: config.use_linear_projection,
            })
        };
        let mut down_blocks = Vec::new();
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let attn = match kind.as_str() {
                "CrossAttnDownBlock2D" => cross(i),
                "DownBlock2D" => AttnKind::None,
                other => return Err(Error::config(path, "down_block_types", format!("`{other}` is not supported (CrossAttnDownBlock2D, DownBlock2D)"))),
            };
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let wb = w.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::load(&wb, p.layers[i], cin, ch[i], resnet, attn, i + 1 < p.n, config.downsample_padding)?);
        }
        let mid_attn = match config.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") | None => cross(p.n - 1),
            Some(other) => return Err(Error::config(path, "mid_block_type", format!("`{other}` is not supported (UNetMidBlock2DCrossAttn)"))),
        };
        let mid_resnet = ResnetCfg { output_scale_factor: config.mid_block_scale_factor, ..resnet };
        let mid_block = MidBlock::load(&w.pp("mid_block"), ch[p.n - 1], mid_resnet, mid_attn)?;
        let mut up_blocks = Vec::new();
        let mut out = ch[p.n - 1];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let r = p.n - 1 - i;
            let prev = out;
            out = ch[r];
            let cin = ch[r.saturating_sub(1)];
            let attn = match kind.as_str() {
                "CrossAttnUpBlock2D" => cross(r),
                "UpBlock2D" => AttnKind::None,
                other => return Err(Error::config(path, "up_block_types", format!("`{other}` is not supported (CrossAttnUpBlock2D, UpBlock2D)"))),
            };
            let wb = w.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock::load(&wb, p.layers[r] + 1, cin, prev, out, resnet, attn, i + 1 < p.n)?);
        }
        Ok(Self {
            be: w.backend().clone(),
            conv_in: Conv2d::load(&w.pp("conv_in"), config.in_channels, ch[0], 3, 1, 1)?,
            time_embedding: TimestepEmbedding::load(&w.pp("time_embedding"), ch[0], temb)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), config.norm_num_groups, ch[0], config.norm_eps)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[0], config.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// How much smaller than the sample the deepest feature map is: samples must be multiples.
    pub fn downscale(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// `sample (B, C, H, W)`, one timestep per batch item (or one for all), and
    /// `encoder_hidden_states (B, L, D)`.
    pub fn forward(&self, sample: &B::Tensor, timesteps: &[f32], encoder_hidden_states: &B::Tensor) -> Result<B::Tensor> {
        let be = &self.be;
        let d = be.dims(sample);
        if d.len() != 4 || d[1] != self.config.in_channels {
            return Err(Error::InvalidArgument(format!("UNet input has shape {d:?}, expected (batch, {}, height, width)", self.config.in_channels)));
        }
        let ts = broadcast_timesteps(timesteps, d[0])?;
        let ch0 = self.config.block_out_channels[0];
        let t = timestep_embedding(&ts, ch0, self.config.flip_sin_to_cos, self.config.freq_shift);
        let emb = self.time_embedding.forward(&be.upload(t, &[d[0], ch0])?)?;
        let x = if self.config.center_input_sample { be.affine(sample, 2.0, -1.0)? } else { sample.clone() };
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, Some(&emb), Some(encoder_hidden_states), &mut skips)?;
        }
        h = self.mid_block.forward(&h, Some(&emb), Some(encoder_hidden_states))?;
        for block in &self.up_blocks {
            h = block.forward(&h, Some(&emb), Some(encoder_hidden_states), &mut skips)?;
        }
        self.conv_out.forward_norm_silu(&self.conv_norm_out, &h)
    }
}

/// One timestep per batch item: a single value is repeated, as diffusers' `expand`.
pub fn broadcast_timesteps(timesteps: &[f32], batch: usize) -> Result<Vec<f32>> {
    match timesteps.len() {
        1 => Ok(vec![timesteps[0]; batch]),
        n if n == batch => Ok(timesteps.to_vec()),
        n => Err(Error::InvalidArgument(format!("{n} timesteps for a batch of {batch}"))),
    }
}

/// Reads the config file of a UNet2DConditionModel folder.
pub fn read_config(dir: &Path) -> Result<UNet2DConditionConfig> {
    config::read(&config::config_path(dir))
}
