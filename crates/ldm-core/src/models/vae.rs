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
        self.conv_out.forward_norm_silu(&self.norm_out, &h)
    }
}

struct DecoderBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    up: Option<Upsample2D<B>>,
}

/// One layer group of the decoder's up path: resnet `j` of up block `b`, block `b`'s upsampling,
/// or the output layers (`conv_norm_out`, SiLU, `conv_out`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    Resnet(usize, usize),
    Up(usize),
    Out,
}

/// diffusers `Decoder`: latents to image.
pub struct Decoder<B: Backend> {
    conv_in: Conv2d<B>,
    mid: MidBlock<B>,
    blocks: Vec<DecoderBlock<B>>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    /// The up path in stages ([`Self::stages`]).
    stages: Vec<Vec<Part>>,
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
        let stages = stages(&blocks.iter().map(|b| (b.resnets.len(), b.up.is_some())).collect::<Vec<_>>());
        Ok(Self {
            conv_in: Conv2d::load(&w.pp("conv_in"), cin, ch[n - 1], 3, 1, 1)?,
            mid: MidBlock::load(&w.pp("mid_block"), ch[n - 1], cfg.resnet(), cfg.mid())?,
            blocks,
            norm_out: GroupNorm::load(&w.pp("conv_norm_out"), cfg.norm_num_groups, ch[0], EPS)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[0], cout, 3, 1, 1)?,
            stages,
        })
    }

    pub fn forward(&self, z: &B::Tensor) -> Result<B::Tensor> {
        let mut h = self.forward_mid(z)?;
        for s in 0..self.stages() {
            h = self.forward_stage(s, h, None)?;
        }
        Ok(h)
    }

    /// The part of [`Self::forward`] at the latents' resolution: `conv_in` and the mid block.
    pub fn forward_mid(&self, z: &B::Tensor) -> Result<B::Tensor> {
        self.mid.forward(&self.conv_in.forward(z)?, None, None)
    }

    /// Stages of the rest of [`Self::forward`], for decoding in tiles (`pipelines::tiles`), which
    /// holds each stage's input and output whole: each resnet is a stage, except that an
    /// upsampling and the resnet after it are one (so the upsampled map, the largest of its
    /// block, is never held whole), and the output layers are the last.
    pub fn stages(&self) -> usize {
        self.stages.len()
    }

    /// Stage `s` ([`Self::stages`]) on `h`, every group norm (each followed by SiLU) applied by
    /// `norm` where one is given (else with the convolution after it). Each map is freed as soon
    /// as the stage has read it, `h` included where the caller holds no other handle to it; the
    /// maps the stage makes itself are its alone, so a resnet after an upsampling may reuse
    /// its input's memory ([`ResnetBlock2D::forward_input`]).
    pub fn forward_stage(&self, s: usize, mut h: B::Tensor, mut norm: Option<&mut NormSilu<'_, B>>) -> Result<B::Tensor> {
        // whether h is a map this stage made (the stage's input may be shared with the caller)
        let mut sole = false;
        for &part in &self.stages[s] {
            (h, sole) = match part {
                Part::Resnet(b, j) => (self.blocks[b].resnets[j].forward_input(h, sole, None, norm.as_deref_mut())?, true),
                Part::Up(b) => match &self.blocks[b].up {
                    Some(u) => (u.forward(&h, None)?, true),
                    None => (h, sole),
                },
                Part::Out => (self.conv_out.forward_normed(&self.norm_out, &h, norm.as_deref_mut())?, true),
            };
        }
        Ok(h)
    }

    /// Output positions per input position of stage `s`, along each side.
    pub fn stage_scale(&self, s: usize) -> usize {
        if self.stages[s].iter().any(|p| matches!(p, Part::Up(_))) { 2 } else { 1 }
    }

    /// The group norms of stage `s`, in the order it applies them.
    pub fn stage_norms(&self, s: usize) -> usize {
        self.stages[s].iter().map(|p| match p { Part::Resnet(..) => 2, Part::Up(_) => 0, Part::Out => 1 }).sum()
    }

    /// How many input positions away stage `s` looks from an output's own: each 3x3
    /// convolution reaches one position further at the output's resolution. A part of the input
    /// with this much context on each side gives its centre exactly as the whole input would.
    pub fn stage_reach(&self, s: usize) -> usize {
        let convs: usize = self.stages[s].iter().map(|p| match p { Part::Resnet(..) => 2, Part::Up(_) | Part::Out => 1 }).sum();
        convs.div_ceil(self.stage_scale(s))
    }
}

/// Marks an autoencoder's encoding half (`encoder`, `quant_conv`) as deliberately left unread,
/// for a model loaded for decoding only.
pub(crate) fn skip_encoder<B: Backend>(w: &Weights<B>) -> Result<()> {
    w.pp("encoder").skip()?;
    w.pp("quant_conv").skip()
}

/// The error of `encode` on an autoencoder of type `model` loaded for decoding only.
pub(crate) fn no_encoder(model: &str) -> Error {
    Error::Unsupported(format!("this {model} was loaded for decoding only ({model}::load_decoder); load it with {model}::load to encode"))
}

/// The stages of an up path whose blocks have `(resnets, upsampling)` ([`Decoder::stages`]).
fn stages(blocks: &[(usize, bool)]) -> Vec<Vec<Part>> {
    let mut stages = Vec::new();
    let mut pending = None;
    for (b, &(resnets, up)) in blocks.iter().enumerate() {
        for j in 0..resnets {
            stages.push(pending.take().into_iter().chain([Part::Resnet(b, j)]).collect());
        }
        if let Some(p) = pending.take() {
            stages.push(vec![p]);
        }
        if up {
            pending = Some(Part::Up(b));
        }
    }
    stages.push(pending.into_iter().chain([Part::Out]).collect());
    stages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_take_each_resnet_alone_and_each_upsampling_with_the_next_layer() {
        use Part::*;
        // the published decoders: three blocks of three resnets, upsampling after the first two
        let s = stages(&[(3, true), (3, true), (3, false)]);
        let want = vec![
            vec![Resnet(0, 0)], vec![Resnet(0, 1)], vec![Resnet(0, 2)],
            vec![Up(0), Resnet(1, 0)], vec![Resnet(1, 1)], vec![Resnet(1, 2)],
            vec![Up(1), Resnet(2, 0)], vec![Resnet(2, 1)], vec![Resnet(2, 2)],
            vec![Out],
        ];
        assert_eq!(s, want);
        // no resnets in a block: its upsampling meets the next block's, or the output layers
        assert_eq!(stages(&[(0, true), (0, true), (1, false)]), vec![vec![Up(0)], vec![Up(1), Resnet(2, 0)], vec![Out]]);
        assert_eq!(stages(&[(1, true)]), vec![vec![Resnet(0, 0)], vec![Up(0), Out]]);
    }
}
