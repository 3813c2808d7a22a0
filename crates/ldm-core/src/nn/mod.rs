//! Layers shared by the models, written against [`Backend`]. Each layer keeps its own handle on
//! the backend so that model code reads like the diffusers modules it reproduces.

mod weights;

pub use weights::Weights;

use crate::backend::Backend;
use crate::Result;

/// `torch.nn.Linear`: weight `(out, in)`, optional bias `(out)`.
pub struct Linear<B: Backend> {
    be: B,
    w: B::Tensor,
    b: Option<B::Tensor>,
}

impl<B: Backend> Linear<B> {
    pub fn load(w: &Weights<B>, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get_linear("weight", out_dim, in_dim)?;
        let b = if bias { Some(w.get("bias", &[out_dim])?) } else { None };
        Ok(Self { be: w.backend().clone(), w: weight, b })
    }

    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        self.be.linear(x, &self.w, self.b.as_ref())
    }

    /// `gelu(self.forward(x))` in one pass where the backend can ([`Backend::linear_gelu`]).
    pub fn forward_gelu(&self, x: &B::Tensor) -> Result<B::Tensor> {
        self.be.linear_gelu(x, &self.w, self.b.as_ref())
    }

    /// `residual + self.forward(x)` in one pass where the backend can ([`Backend::linear_add`]).
    pub fn forward_add(&self, x: &B::Tensor, residual: &B::Tensor) -> Result<B::Tensor> {
        self.be.linear_add(x, &self.w, self.b.as_ref(), residual)
    }
}

/// `torch.nn.Conv2d` with a square kernel and symmetric padding.
pub struct Conv2d<B: Backend> {
    be: B,
    w: B::Tensor,
    b: B::Tensor,
    stride: usize,
    padding: usize,
}

impl<B: Backend> Conv2d<B> {
    pub fn load(w: &Weights<B>, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            be: w.backend().clone(),
            w: w.get_conv("weight", [cout, cin, k, k])?,
            b: w.get("bias", &[cout])?,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        self.be.conv2d(x, &self.w, Some(&self.b), self.stride, self.padding)
    }

    /// [`Self::forward`] of a map no other handle holds: the backend may write the result into
    /// its memory ([`Backend::conv2d_reusing`]).
    pub fn forward_reusing(&self, x: B::Tensor) -> Result<B::Tensor> {
        self.be.conv2d_reusing(x, &self.w, Some(&self.b), self.stride, self.padding)
    }

    /// `self.forward(norm.forward_silu(x))`, the normalised map left to the backend
    /// ([`Backend::group_norm_silu_conv2d`]).
    pub fn forward_norm_silu(&self, norm: &GroupNorm<B>, x: &B::Tensor) -> Result<B::Tensor> {
        let n = (norm.groups, &norm.gamma, &norm.beta, norm.eps);
        self.be.group_norm_silu_conv2d(x, n, &self.w, Some(&self.b), self.stride, self.padding)
    }

    /// `self.forward` on `x` normalised by `norm`: by the caller's `NormSilu` where one is given,
    /// else by [`Self::forward_norm_silu`].
    pub fn forward_normed(&self, norm: &GroupNorm<B>, x: &B::Tensor, with: Option<&mut NormSilu<'_, B>>) -> Result<B::Tensor> {
        match with {
            Some(f) => self.forward(&f(norm, x)?),
            None => self.forward_norm_silu(norm, x),
        }
    }
}

/// `torch.nn.GroupNorm` with affine parameters.
pub struct GroupNorm<B: Backend> {
    be: B,
    groups: usize,
    gamma: B::Tensor,
    beta: B::Tensor,
    eps: f64,
}

impl<B: Backend> GroupNorm<B> {
    pub fn load(w: &Weights<B>, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            return Err(crate::Error::InvalidArgument(format!(
                "{}: {channels} channels cannot be split into {groups} groups (norm_num_groups must divide every block's channels)",
                w.source().location(None)
            )));
        }
        Ok(Self {
            be: w.backend().clone(),
            groups,
            gamma: w.get("weight", &[channels])?,
            beta: w.get("bias", &[channels])?,
            eps,
        })
    }

    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        self.be.group_norm(x, self.groups, &self.gamma, &self.beta, self.eps)
    }

    /// The norm followed by SiLU.
    pub fn forward_silu(&self, x: &B::Tensor) -> Result<B::Tensor> {
        self.be.group_norm_silu(x, self.groups, &self.gamma, &self.beta, self.eps)
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The norm as a per-channel `x * a + b` (the tensors `(1, C, 1, 1)` returned), with each
    /// group's `(mean, variance)` given instead of taken from the input: for
    /// [`Self::forward_silu_affine`], which normalises a tile of a map as the whole map is.
    pub fn affine_with(&self, stats: &[(f64, f64)]) -> Result<(B::Tensor, B::Tensor)> {
        let be = &self.be;
        let (gamma, beta) = (be.download(&self.gamma)?, be.download(&self.beta)?);
        let c = gamma.len();
        if stats.len() != self.groups {
            return Err(crate::Error::Backend(format!("group norm: {} group statistics for {} groups", stats.len(), self.groups)));
        }
        // (x - mean) * rstd * gamma + beta as one per-channel x * a + b
        let per_group = c / self.groups;
        let (mut a, mut b) = (vec![0f32; c], vec![0f32; c]);
        for ch in 0..c {
            let (mean, var) = stats[ch / per_group];
            let scale = gamma[ch] as f64 / (var + self.eps).sqrt();
            a[ch] = scale as f32;
            b[ch] = (beta[ch] as f64 - mean * scale) as f32;
        }
        Ok((be.upload(a, &[1, c, 1, 1])?, be.upload(b, &[1, c, 1, 1])?))
    }

    /// SiLU of `x * a + b`, `(a, b)` from [`Self::affine_with`].
    pub fn forward_silu_affine(&self, x: &B::Tensor, (a, b): &(B::Tensor, B::Tensor)) -> Result<B::Tensor> {
        let be = &self.be;
        if be.dims(x).get(1) != be.dims(a).get(1) {
            return Err(crate::Error::Backend(format!("group norm: {:?} normalised with {:?} channels", be.dims(x), be.dims(a))));
        }
        be.silu(&be.add(&be.mul(x, a)?, b)?)
    }
}

/// A group norm followed by SiLU, as the caller applies it: the decoders' up path takes one, so
/// that tiled decoding can normalise each tile with the whole image's statistics.
pub type NormSilu<'a, B> = dyn FnMut(&GroupNorm<B>, &<B as Backend>::Tensor) -> Result<<B as Backend>::Tensor> + 'a;

/// `torch.nn.LayerNorm` over the last dimension.
pub struct LayerNorm<B: Backend> {
    be: B,
    gamma: B::Tensor,
    beta: B::Tensor,
    eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn load(w: &Weights<B>, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { be: w.backend().clone(), gamma: w.get("weight", &[dim])?, beta: w.get("bias", &[dim])?, eps })
    }

    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        self.be.layer_norm(x, &self.gamma, &self.beta, self.eps)
    }
}

/// Sinusoidal timestep embedding (diffusers `get_timestep_embedding`), computed on the host.
///
/// diffusers works in float32: the frequencies `exp(-ln(max_period) * i / (half - shift))` and
/// the products `t * freq` are rounded to float32 before the sine, so we round at the same
/// places; the sine and cosine themselves are computed in double precision, which keeps large
/// arguments (t near 1000) exact where a GPU's float sine would not be.
pub fn timestep_embedding(timesteps: &[f32], dim: usize, flip_sin_to_cos: bool, freq_shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let denom = half as f32 - freq_shift;
    let neg_log = -(10000f32).ln();
    let freqs: Vec<f32> = (0..half).map(|i| ((neg_log * i as f32) / denom).exp()).collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f64> = freqs.iter().map(|&f| (t * f) as f64).collect();
        let sin = args.iter().map(|a| a.sin() as f32);
        let cos = args.iter().map(|a| a.cos() as f32);
        if flip_sin_to_cos {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// diffusers `TimestepEmbedding`: linear, SiLU, linear.
pub struct TimestepEmbedding<B: Backend> {
    be: B,
    linear_1: Linear<B>,
    linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    pub fn load(w: &Weights<B>, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            be: w.backend().clone(),
            linear_1: Linear::load(&w.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::load(&w.pp("linear_2"), dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.be.silu(&self.linear_1.forward(x)?)?;
        self.linear_2.forward(&h)
    }
}

/// diffusers `ResnetBlock2D` (the "default" time embedding norm, no up/down sampling).
pub struct ResnetBlock2D<B: Backend> {
    be: B,
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    time_emb_proj: Option<Linear<B>>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    conv_shortcut: Option<Conv2d<B>>,
    output_scale_factor: f32,
}

/// The settings a block passes to its resnets.
#[derive(Clone, Copy, Debug)]
pub struct ResnetCfg {
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f32,
}

impl<B: Backend> ResnetBlock2D<B> {
    pub fn load(w: &Weights<B>, cin: usize, cout: usize, cfg: ResnetCfg) -> Result<Self> {
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(Linear::load(&w.pp("time_emb_proj"), t, cout, true)?),
            None => None,
        };
        let conv_shortcut =
            if cin != cout { Some(Conv2d::load(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None };
        Ok(Self {
            be: w.backend().clone(),
            norm1: GroupNorm::load(&w.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::load(&w.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    pub fn forward(&self, x: &B::Tensor, temb: Option<&B::Tensor>) -> Result<B::Tensor> {
        self.forward_with(x, temb, None)
    }

    /// [`Self::forward`] with its two norms applied by `norm` where one is given (else each is
    /// left to the convolution after it, [`Conv2d::forward_norm_silu`]).
    pub fn forward_with(&self, x: &B::Tensor, temb: Option<&B::Tensor>, norm: Option<&mut NormSilu<'_, B>>) -> Result<B::Tensor> {
        self.forward_owned(x.clone(), temb, norm)
    }

    /// [`Self::forward_with`] taking the input: where the caller holds no other handle to it,
    /// it is freed as soon as the first convolution and the shortcut have read it.
    pub fn forward_owned(&self, x: B::Tensor, temb: Option<&B::Tensor>, norm: Option<&mut NormSilu<'_, B>>) -> Result<B::Tensor> {
        self.forward_input(x, false, temb, norm)
    }

    /// [`Self::forward_owned`], told whether `x` is `sole`: a map that nothing else refers to
    /// (no clone, no view of its storage). The shortcut convolution, where there is one, may
    /// then write its output into the input's memory ([`Backend::conv2d_reusing`]), so the
    /// input, the first convolution's output and the shortcut's are never all alive at once.
    pub fn forward_input(&self, x: B::Tensor, sole: bool, temb: Option<&B::Tensor>, mut norm: Option<&mut NormSilu<'_, B>>) -> Result<B::Tensor> {
        let be = &self.be;
        let mut h = self.conv1.forward_normed(&self.norm1, &x, norm.as_deref_mut())?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&be.silu(t)?)?;
            let d = be.dims(&t);
            h = be.add(&h, &be.reshape(&t, &[d[0], d[1], 1, 1])?)?;
        }
        // each map is dropped as soon as nothing reads it: at most the input (or the shortcut's
        // output), one normalised map (none where the convolution normalises as it reads it)
        // and one output are alive (what the memory estimate counts)
        let skip = match &self.conv_shortcut {
            Some(c) if sole => c.forward_reusing(x)?,
            Some(c) => {
                let skip = c.forward(&x)?;
                drop(x);
                skip
            }
            None => x,
        };
        let h2 = self.conv2.forward_normed(&self.norm2, &h, norm)?;
        drop(h);
        let out = be.add(&skip, &h2)?;
        if self.output_scale_factor != 1.0 {
            be.affine(&out, 1.0 / self.output_scale_factor, 0.0)
        } else {
            Ok(out)
        }
    }
}

/// diffusers `Downsample2D` with a convolution: stride 2, and with `padding == 0` the
/// asymmetric (0, 1, 0, 1) zero padding the autoencoders use.
pub struct Downsample2D<B: Backend> {
    be: B,
    conv: Conv2d<B>,
    pad_asym: bool,
}

impl<B: Backend> Downsample2D<B> {
    pub fn load(w: &Weights<B>, cin: usize, cout: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            be: w.backend().clone(),
            conv: Conv2d::load(&w.pp("conv"), cin, cout, 3, 2, padding)?,
            pad_asym: padding == 0,
        })
    }

    pub fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        if self.pad_asym {
            self.conv.forward(&self.be.pad2d(x, [0, 1, 0, 1])?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers `Upsample2D` with a convolution: nearest 2x (or to an explicit size, which
/// `UNet2DConditionModel` passes when the sample is not a multiple of its downscale), then a 3x3
/// convolution.
pub struct Upsample2D<B: Backend> {
    be: B,
    conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    pub fn load(w: &Weights<B>, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self { be: w.backend().clone(), conv: Conv2d::load(&w.pp("conv"), cin, cout, 3, 1, 1)? })
    }

    pub fn forward(&self, x: &B::Tensor, size: Option<(usize, usize)>) -> Result<B::Tensor> {
        let d = self.be.dims(x);
        let (h, w) = size.unwrap_or((d[2] * 2, d[3] * 2));
        if d.len() == 4 && (h, w) == (2 * d[2], 2 * d[3]) {
            return self.be.upsample2x_conv3x3(x, &self.conv.w, Some(&self.conv.b));
        }
        self.conv.forward(&self.be.upsample_nearest(x, h, w)?)
    }
}

/// Splits `(B, L, H*D)` into heads `(B, H, L, D)`.
pub fn split_heads<B: Backend>(be: &B, x: &B::Tensor, heads: usize) -> Result<B::Tensor> {
    let d = be.dims(x);
    let x = be.reshape(x, &[d[0], d[1], heads, d[2] / heads])?;
    be.permute(&x, &[0, 2, 1, 3])
}

/// Joins heads `(B, H, L, D)` back into `(B, L, H*D)`.
pub fn merge_heads<B: Backend>(be: &B, x: &B::Tensor) -> Result<B::Tensor> {
    let d = be.dims(x);
    let x = be.permute(x, &[0, 2, 1, 3])?;
    be.reshape(&x, &[d[0], d[2], d[1] * d[3]])
}
