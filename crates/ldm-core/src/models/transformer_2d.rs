//! diffusers `Transformer2DModel` for continuous (feature map) input, with its
//! `BasicTransformerBlock`s: self-attention, cross-attention, GEGLU feed-forward, each behind a
//! LayerNorm and a residual.

use crate::backend::Backend;
use crate::models::attention::Attention;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear, Weights};
use crate::Result;

/// `FeedForward` with the GEGLU activation: `proj` to twice the inner width, `hidden * gelu(gate)`.
struct FeedForward<B: Backend> {
    be: B,
    proj: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    fn load(w: &Weights<B>, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            be: w.backend().clone(),
            proj: Linear::load(&w.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::load(&w.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let be = &self.be;
        self.out.forward(&be.geglu(&self.proj.forward(x)?)?)
    }
}

struct BasicTransformerBlock<B: Backend> {
    be: B,
    norm1: LayerNorm<B>,
    attn1: Attention<B>,
    norm2: LayerNorm<B>,
    attn2: Attention<B>,
    norm3: LayerNorm<B>,
    ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    fn load(w: &Weights<B>, dim: usize, heads: usize, dim_head: usize, context_dim: usize) -> Result<Self> {
        Ok(Self {
            be: w.backend().clone(),
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&w.pp("attn1"), dim, dim, heads, dim_head, false)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&w.pp("attn2"), dim, context_dim, heads, dim_head, false)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &B::Tensor, context: &B::Tensor) -> Result<B::Tensor> {
        let be = &self.be;
        let x = be.add(&self.attn1.forward(&self.norm1.forward(x)?, None)?, x)?;
        let x = be.add(&self.attn2.forward(&self.norm2.forward(&x)?, Some(context))?, &x)?;
        be.add(&self.ff.forward(&self.norm3.forward(&x)?)?, &x)
    }
}

enum Proj<B: Backend> {
    Conv(Conv2d<B>),
    Linear(Linear<B>),
}

/// `Transformer2DModel` on a feature map `(B, C, H, W)` with text context `(B, L, D)`.
pub struct Transformer2D<B: Backend> {
    be: B,
    norm: GroupNorm<B>,
    proj_in: Proj<B>,
    blocks: Vec<BasicTransformerBlock<B>>,
    proj_out: Proj<B>,
    inner: usize,
}

/// What a UNet block passes to its `Transformer2DModel`s.
#[derive(Clone, Copy, Debug)]
pub struct TransformerCfg {
    pub heads: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub layers: usize,
    pub use_linear_projection: bool,
}

impl<B: Backend> Transformer2D<B> {
    pub fn load(w: &Weights<B>, channels: usize, cfg: TransformerCfg) -> Result<Self> {
        let dim_head = channels / cfg.heads.max(1);
        let inner = cfg.heads * dim_head;
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                Proj::Linear(Linear::load(&w.pp("proj_in"), channels, inner, true)?),
                Proj::Linear(Linear::load(&w.pp("proj_out"), inner, channels, true)?),
            )
        } else {
            (
                Proj::Conv(Conv2d::load(&w.pp("proj_in"), channels, inner, 1, 1, 0)?),
                Proj::Conv(Conv2d::load(&w.pp("proj_out"), inner, channels, 1, 1, 0)?),
            )
        };
        let blocks = (0..cfg.layers)
            .map(|i| BasicTransformerBlock::load(&w.pp("transformer_blocks").pp(i), inner, cfg.heads, dim_head, cfg.context_dim))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            be: w.backend().clone(),
            norm: GroupNorm::load(&w.pp("norm"), cfg.groups, channels, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
            inner,
        })
    }

    pub fn forward(&self, x: &B::Tensor, context: &B::Tensor) -> Result<B::Tensor> {
        let be = &self.be;
        let d = be.dims(x);
        let (b, c, h, wd) = (d[0], d[1], d[2], d[3]);
        let to_seq = |t: &B::Tensor, ch: usize| -> Result<B::Tensor> {
            be.reshape(&be.permute(t, &[0, 2, 3, 1])?, &[b, h * wd, ch])
        };
        let to_map = |t: &B::Tensor, ch: usize| -> Result<B::Tensor> {
            be.permute(&be.reshape(t, &[b, h, wd, ch])?, &[0, 3, 1, 2])
        };
        let normed = self.norm.forward(x)?;
        let mut seq = match &self.proj_in {
            Proj::Conv(conv) => to_seq(&conv.forward(&normed)?, self.inner)?,
            Proj::Linear(lin) => lin.forward(&to_seq(&normed, c)?)?,
        };
        for block in &self.blocks {
            seq = block.forward(&seq, context)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_map(&seq, self.inner)?)?,
            Proj::Linear(lin) => to_map(&lin.forward(&seq)?, c)?,
        };
        be.add(&out, x)
    }
}
