//! The UNet blocks of diffusers' `unet_2d_blocks.py` that the LDM checkpoints use, for both
//! `UNet2DConditionModel` (cross-attention) and `UNet2DModel` (spatial self-attention).
//!
//! A down block is resnets, each optionally followed by an attention, then an optional
//! downsampler; it hands every intermediate state to the up path as a skip connection. An up
//! block concatenates one skip per resnet along channels.

use crate::backend::Backend;
use crate::models::attention::SpatialAttention;
use crate::models::transformer_2d::{Transformer2D, TransformerCfg};
use crate::nn::{Downsample2D, ResnetBlock2D, ResnetCfg, Upsample2D, Weights};
use crate::{Error, Result};

/// The attention that follows a resnet in a block.
pub enum BlockAttention<B: Backend> {
    /// `Transformer2DModel` attending to the text (Cross* blocks).
    Cross(Transformer2D<B>),
    /// Self-attention over positions (Attn* blocks of `UNet2DModel`).
    Spatial(SpatialAttention<B>),
}

/// Which attention a block has, with its settings.
#[derive(Clone, Copy, Debug)]
pub enum AttnKind {
    None,
    Cross(TransformerCfg),
    /// `head_dim` channels per head; `eps` and `groups` of its group norm.
    Spatial { head_dim: usize, groups: usize, eps: f64 },
}

impl<B: Backend> BlockAttention<B> {
    fn load(w: &Weights<B>, channels: usize, kind: AttnKind, rescale: f32) -> Result<Option<Self>> {
        Ok(match kind {
            AttnKind::None => None,
            AttnKind::Cross(cfg) => Some(Self::Cross(Transformer2D::load(w, channels, cfg)?)),
            AttnKind::Spatial { head_dim, groups, eps } => {
                let heads = (channels / head_dim.max(1)).max(1);
                Some(Self::Spatial(SpatialAttention::load(w, channels, heads, groups, eps, rescale)?))
            }
        })
    }

    fn forward(&self, x: &B::Tensor, context: Option<&B::Tensor>) -> Result<B::Tensor> {
        match self {
            Self::Cross(t) => {
                let ctx = context.ok_or_else(|| {
                    Error::InvalidArgument("a cross-attention block needs encoder hidden states".into())
                })?;
                t.forward(x, ctx)
            }
            Self::Spatial(a) => a.forward(x),
        }
    }
}

fn load_attentions<B: Backend>(w: &Weights<B>, n: usize, ch: usize, kind: AttnKind, rescale: f32) -> Result<Vec<BlockAttention<B>>> {
    let mut out = Vec::new();
    for i in 0..n {
        if let Some(a) = BlockAttention::load(&w.pp("attentions").pp(i), ch, kind, rescale)? {
            out.push(a);
        }
    }
    Ok(out)
}

/// DownBlock2D, CrossAttnDownBlock2D, AttnDownBlock2D.
pub struct DownBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<BlockAttention<B>>,
    downsampler: Option<Downsample2D<B>>,
}

impl<B: Backend> DownBlock<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights<B>,
        layers: usize,
        cin: usize,
        cout: usize,
        resnet: ResnetCfg,
        attn: AttnKind,
        add_downsample: bool,
        downsample_padding: usize,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| ResnetBlock2D::load(&w.pp("resnets").pp(i), if i == 0 { cin } else { cout }, cout, resnet))
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(w, layers, cout, attn, resnet.output_scale_factor)?;
        let downsampler = if add_downsample {
            Some(Downsample2D::load(&w.pp("downsamplers").pp(0), cout, cout, downsample_padding)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and pushes the skip connections onto `skips`.
    pub fn forward(
        &self,
        x: &B::Tensor,
        temb: Option<&B::Tensor>,
        context: Option<&B::Tensor>,
        skips: &mut Vec<B::Tensor>,
    ) -> Result<B::Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// UpBlock2D, CrossAttnUpBlock2D, AttnUpBlock2D.
pub struct UpBlock<B: Backend> {
    be: B,
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<BlockAttention<B>>,
    upsampler: Option<Upsample2D<B>>,
}

impl<B: Backend> UpBlock<B> {
    /// `cin`: channels of the skip that arrives last (from the block below in the down path),
    /// `prev`: channels coming up from the previous up block.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights<B>,
        layers: usize,
        cin: usize,
        prev: usize,
        cout: usize,
        resnet: ResnetCfg,
        attn: AttnKind,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let skip = if i == layers - 1 { cin } else { cout };
                let input = if i == 0 { prev } else { cout };
                ResnetBlock2D::load(&w.pp("resnets").pp(i), input + skip, cout, resnet)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(w, layers, cout, attn, resnet.output_scale_factor)?;
        let upsampler = if add_upsample { Some(Upsample2D::load(&w.pp("upsamplers").pp(0), cout, cout)?) } else { None };
        Ok(Self { be: w.backend().clone(), resnets, attentions, upsampler })
    }

    /// Consumes one skip connection per resnet from the end of `skips`.
    pub fn forward(
        &self,
        x: &B::Tensor,
        temb: Option<&B::Tensor>,
        context: Option<&B::Tensor>,
        skips: &mut Vec<B::Tensor>,
    ) -> Result<B::Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| Error::Backend("UNet skip connections exhausted".into()))?;
            h = resnet.forward(&self.be.cat(&[&h, &skip], 1)?, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        if let Some(up) = &self.upsampler {
            // Up to the size of the skip the next block consumes: 2x when the sample is a
            // multiple of the UNet's downscale, the down path's odd size otherwise.
            let size = skips.last().map(|s| {
                let d = self.be.dims(s);
                (d[2], d[3])
            });
            h = up.forward(&h, size)?;
        }
        Ok(h)
    }
}

/// UNetMidBlock2DCrossAttn and UNetMidBlock2D: a resnet, then (attention, resnet) pairs.
pub struct MidBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<BlockAttention<B>>,
}

impl<B: Backend> MidBlock<B> {
    pub fn load(w: &Weights<B>, channels: usize, resnet: ResnetCfg, attn: AttnKind) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::load(&w.pp("resnets").pp(i), channels, channels, resnet))
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(w, 1, channels, attn, resnet.output_scale_factor)?;
        Ok(Self { resnets, attentions })
    }

    pub fn forward(&self, x: &B::Tensor, temb: Option<&B::Tensor>, context: Option<&B::Tensor>) -> Result<B::Tensor> {
        let mut h = self.resnets[0].forward(x, temb)?;
        if let Some(attn) = self.attentions.first() {
            h = attn.forward(&h, context)?;
        }
        self.resnets[1].forward(&h, temb)
    }
}
