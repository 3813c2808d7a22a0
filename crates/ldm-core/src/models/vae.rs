//! The encoder and decoder shared by `AutoencoderKL` and `VQModel` (diffusers `vae.py`).

use std::path::Path;

use crate::backend::Backend;
use crate::models::config::{check_size, MAX_CHANNELS, MAX_LAYERS};
use crate::models::unet_2d_blocks::{AttnKind, MidBlock};
use crate::nn::{Conv2d, Downsample2D, GroupNorm, NormSilu, ResnetBlock2D, ResnetCfg, Upsample2D, Weights};
use crate::{Error, Result};

/// diffusers' autoencoders use this epsilon in every norm.
const EPS: f64 = 1e-6;

/// The architecture keys the encoder and decoder read from the autoencoder's config.
#[derive(Clone, Debug)]
pub struct CoderCfg {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub mid_block_add_attention: bool,
}

impl CoderCfg {
    /// Checks sizes and block types; `down`/`up` are the configured block type names.
    pub fn check(&self, path: &Path, act_fn: &str, down: &[String], up: &[String]) -> Result<()> {
        let n = self.block_out_channels.len();
        check_size(path, "block_out_channels", n, 16)?;
        check_size(path, "layers_per_block", self.layers_per_block, MAX_LAYERS)?;
        check_size(path, "norm_num_groups", self.norm_num_groups, MAX_CHANNELS)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            check_size(path, &format!("block_out_channels[{i}]"), c, MAX_CHANNELS)?;
            if c % self.norm_num_groups != 0 {
                return Err(Error::config(path, "norm_num_groups", format!("{} does not divide block_out_channels[{i}] = {c}", self.norm_num_groups)));
            }
        }
        if act_fn != "silu" {
            return Err(Error::config(path, "act_fn", format!("`{act_fn}` is not supported (silu)")));
        }
        for (field, types, want) in [("down_block_types", down, "DownEncoderBlock2D"), ("up_block_types", up, "UpDecoderBlock2D")] {
            if types.len() != n {
                return Err(Error::config(path, field, format!("{} entries for {n} block_out_channels", types.len())));
            }
            if let Some(t) = types.iter().find(|t| *t != want) {
                return Err(Error::config(path, field, format!("`{t}` is not supported ({want})")));
            }
        }
        Ok(())
    }

    fn resnet(&self) -> ResnetCfg {
        ResnetCfg { temb_channels: None, groups: self.norm_num_groups, eps: EPS, output_scale_factor: 1.0 }
    }

    fn mid(&self) -> AttnKind {
        if self.mid_block_add_attention {
            // One head over all channels: diffusers passes attention_head_dim = channels.
            let c = *self.block_out_channels.last().unwrap_or(&1);
            AttnKind::Spatial { head_dim: c, groups: self.norm_num_groups, eps: EPS }
        } else {
            AttnKind::None
        }
    }
}

struct EncoderBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    down: Option<Downsample2D<B>>,
}

/// diffusers `Encoder`: image to latent moments.
pub struct Encoder<B: Backend> {
    conv_in: Conv2d<B>,
    blocks: Vec<EncoderBlock<B>>,
    mid: MidBlock<B>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    pub fn load(w: &Weights<B>, cfg: &CoderCfg, cin: usize, cout: usize) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut blocks = Vec::new();
        for i in 0..n {
            let wb = w.pp("down_blocks").pp(i);
            let input = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock2D::load(&wb.pp("resnets").pp(j), if j == 0 { input } else { ch[i] }, ch[i], cfg.resnet()))
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < n { Some(Downsample2D::load(&wb.pp("downsamplers").pp(0), ch[i], ch[i], 0)?) } else { None };
            blocks.push(EncoderBlock { resnets, down });
        }
        Ok(Self {
            conv_in: Conv2d::load(&w.pp("conv_in"), cin, ch[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::load(&w.pp("mid_block"), ch[n - 1], cfg.resnet(), cfg.mid())?,
            norm_out: GroupNorm::load(&w.pp("conv_norm_out"), cfg.norm_num_groups, ch[n - 1], EPS)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[n - 1], cout, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.blocks {
            for r in &block.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = &block.down {
                h = d.forward(&h)?;
            }
        }
        h = self.mid.forward(&h, None, None)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

struct DecoderBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    up: Option<Upsample2D<B>>,
}

/// diffusers `Decoder`: latents to image.
pub struct Decoder<B: Backend> {
    conv_in: Conv2d<B>,
    mid: MidBlock<B>,
    blocks: Vec<DecoderBlock<B>>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    pub fn load(w: &Weights<B>, cfg: &CoderCfg, cin: usize, cout: usize) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut blocks = Vec::new();
        let mut out = ch[n - 1];
        for i in 0..n {
            let wb = w.pp("up_blocks").pp(i);
            let prev = out;
            out = ch[n - 1 - i];
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock2D::load(&wb.pp("resnets").pp(j), if j == 0 { prev } else { out }, out, cfg.resnet()))
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n { Some(Upsample2D::load(&wb.pp("upsamplers").pp(0), out, out)?) } else { None };
            blocks.push(DecoderBlock { resnets, up });
        }
        Ok(Self {
            conv_in: Conv2d::load(&w.pp("conv_in"), cin, ch[n - 1], 3, 1, 1)?,
            mid: MidBlock::load(&w.pp("mid_block"), ch[n - 1], cfg.resnet(), cfg.mid())?,
            blocks,
            norm_out: GroupNorm::load(&w.pp("conv_norm_out"), cfg.norm_num_groups, ch[0], EPS)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[0], cout, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, z: &B::Tensor) -> Result<B::Tensor> {
        let mut h = self.forward_mid(z)?;
        for b in 0..self.stages() {
            h = self.forward_stage(b, &h, &mut |n, x| n.forward_silu(x))?;
        }
        Ok(h)
    }

    /// The part of [`Self::forward`] at the latents' resolution: `conv_in` and the mid block.
    pub fn forward_mid(&self, z: &B::Tensor) -> Result<B::Tensor> {
        self.mid.forward(&self.conv_in.forward(z)?, None, None)
    }

    /// Stages of the rest of [`Self::forward`], one per up block: stage `b` is the upsampling
    /// that ends block `b - 1` (none for the first), then block `b`'s resnets, and for the last
    /// stage the output layers.
    pub fn stages(&self) -> usize {
        self.blocks.len()
    }

    /// Stage `b` ([`Self::stages`]) on `h`, every group norm (each followed by SiLU) applied by
    /// `norm`.
    pub fn forward_stage(&self, b: usize, h: &B::Tensor, norm: &mut NormSilu<'_, B>) -> Result<B::Tensor> {
        let mut h = match b.checked_sub(1).and_then(|p| self.blocks[p].up.as_ref()) {
            Some(u) => u.forward(h, None)?,
            None => h.clone(),
        };
        for r in &self.blocks[b].resnets {
            h = r.forward_with(&h, None, norm)?;
        }
        if b + 1 == self.blocks.len() {
            h = self.conv_out.forward(&norm(&self.norm_out, &h)?)?;
        }
        Ok(h)
    }

    /// Output positions per input position of stage `b`, along each side.
    pub fn stage_scale(&self, b: usize) -> usize {
        if b > 0 && self.blocks[b - 1].up.is_some() { 2 } else { 1 }
    }

    /// The group norms of stage `b`, in the order it applies them.
    pub fn stage_norms(&self, b: usize) -> usize {
        2 * self.blocks[b].resnets.len() + usize::from(b + 1 == self.blocks.len())
    }

    /// How many input positions away stage `b` looks from an output's own: each 3x3
    /// convolution reaches one position further at the output's resolution. A part of the input
    /// with this much context on each side gives its centre exactly as the whole input would.
    pub fn stage_reach(&self, b: usize) -> usize {
        let convs = 2 * self.blocks[b].resnets.len() + usize::from(self.stage_scale(b) > 1) + usize::from(b + 1 == self.blocks.len());
        convs.div_ceil(self.stage_scale(b))
    }
}
