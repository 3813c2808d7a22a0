//! diffusers' `Attention` in its two LDM uses: the (cross-)attention of a transformer block, and
//! the spatial self-attention over feature maps of `UNet2DModel` and the autoencoders.

use crate::backend::Backend;
use crate::nn::{GroupNorm, Linear, Weights};
use crate::pipelines::memory::{Transients, ATTENTION_SCORES};
use crate::Result;

/// Multi-head attention with `to_q`, `to_k`, `to_v`, `to_out.0`, on `(B, L, C)` sequences.
pub struct Attention<B: Backend> {
    be: B,
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Linear<B>,
    heads: usize,
    scale: f32,
}

impl<B: Backend> Attention<B> {
    /// `context_dim`: the width of the keys' source (the query width for self-attention).
    pub fn load(
        w: &Weights<B>,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        dim_head: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        Ok(Self {
            be: w.backend().clone(),
            to_q: Linear::load(&w.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: Linear::load(&w.pp("to_k"), context_dim, inner, qkv_bias)?,
            to_v: Linear::load(&w.pp("to_v"), context_dim, inner, qkv_bias)?,
            to_out: Linear::load(&w.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
            scale: (dim_head as f32).powf(-0.5),
        })
    }

    /// Attends from `x (B, L, C)` to `context` (itself when `None`).
    pub fn forward(&self, x: &B::Tensor, context: Option<&B::Tensor>) -> Result<B::Tensor> {
        let be = &self.be;
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        // A backend that builds every score at once gets the queries in chunks (rows of the
        // scores are independent), so that a decoder's mid block over a large image fits.
        let (b, lq, lk) = (be.dims(&q)[0], be.dims(&q)[1], be.dims(&k)[1]);
        let rows = if be.transients() == Transients::Full { (ATTENTION_SCORES / (b * self.heads * lk).max(1)).max(1) } else { lq };
        if rows >= lq {
            return self.to_out.forward(&be.attention_heads(&q, &k, &v, self.heads, self.scale)?);
        }
        let chunks = (0..lq)
            .step_by(rows)
            .map(|s| be.attention_heads(&be.narrow(&q, 1, s, rows.min(lq - s))?, &k, &v, self.heads, self.scale))
            .collect::<Result<Vec<_>>>()?;
        self.to_out.forward(&be.cat(&chunks.iter().collect::<Vec<_>>(), 1)?)
    }
}

/// Self-attention over a feature map `(B, C, H, W)`: group norm, attention over the H*W
/// positions, residual connection, division by `rescale_output_factor`. (diffusers'
/// `Attention(..., residual_connection=True, _from_deprecated_attn_block=True)`.)
///
/// Older checkpoints (the published LDM ones among them) name the projections `query`, `key`,
/// `value` and `proj_attn`; diffusers renames them on load, and so do we.
pub struct SpatialAttention<B: Backend> {
    be: B,
    group_norm: GroupNorm<B>,
    attn: Attention<B>,
    rescale: f32,
}

impl<B: Backend> SpatialAttention<B> {
    pub fn load(
        w: &Weights<B>,
        channels: usize,
        heads: usize,
        groups: usize,
        eps: f64,
        rescale: f32,
    ) -> Result<Self> {
        let dim_head = channels / heads.max(1);
        let attn = if !w.contains("to_q.weight") && w.contains("query.weight") {
            let lin = |n: &str| Linear::load(&w.pp(n), channels, channels, true);
            Attention {
                be: w.backend().clone(),
                to_q: lin("query")?,
                to_k: lin("key")?,
                to_v: lin("value")?,
                to_out: lin("proj_attn")?,
                heads,
                scale: (dim_head as f32).powf(-0.5),
            }
        } else {
            Attention::load(w, channels, channels, heads, dim_head, true)?
        };
        let norm_w = if w.contains("group_norm.weight") { w.pp("group_norm") } else { w.pp("norm") };
        Ok(Self { be: w.backend().clone(), group_norm: GroupNorm::load(&norm_w, groups, channels, eps)?, attn, rescale })
    }

    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let be = &self.be;
        let d = be.dims(x);
        let (b, c, h, wd) = (d[0], d[1], d[2], d[3]);
        let seq = be.permute(&be.reshape(&self.group_norm.forward(x)?, &[b, c, h * wd])?, &[0, 2, 1])?;
        let out = self.attn.forward(&seq, None)?;
        let out = be.reshape(&be.permute(&out, &[0, 2, 1])?, &[b, c, h, wd])?;
        let out = be.add(&out, x)?;
        if self.rescale != 1.0 {
            be.affine(&out, 1.0 / self.rescale, 0.0)
        } else {
            Ok(out)
        }
    }
}
