//! The compute backends. Every model is written once against [`Backend`]: the handful of tensor
//! operations the LDM models need. The CPU implementation is candle ([`cpu::Cpu`]); the GPU one
//! (WGSL compute kernels through wgpu, [`wgpu::Gpu`], feature `webgpu`) implements the same trait.
//!
//! Tensors are float32 and contiguous from the model's point of view; shapes are plain
//! `&[usize]` in PyTorch order (N, C, H, W).

pub mod cpu;
#[cfg(feature = "webgpu")]
pub mod wgpu;

use crate::Result;

/// Tensor operations the models are written against.
///
/// Elementwise binary operations broadcast like NumPy: shapes are right-aligned and a dimension
/// of 1 stretches.
pub trait Backend: Clone + Send + Sync + 'static {
    type Tensor: Clone + Send + Sync + std::fmt::Debug;

    /// A short name ("cpu", "webgpu"), for messages.
    fn name(&self) -> &'static str;

    /// How this backend holds convolution and attention work buffers, for the memory estimates
    /// that refuse runs too large for the machine.
    fn transients(&self) -> crate::pipelines::memory::Transients {
        crate::pipelines::memory::Transients::Full
    }

    fn dims(&self, t: &Self::Tensor) -> Vec<usize>;
    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<Self::Tensor>;
    /// Uploads a model weight. A backend may store it differently from activations (the GPU
    /// backend can keep weights as f16); every operation accepts either. Defaults to `upload`.
    fn upload_weight(&self, data: Vec<f32>, shape: &[usize]) -> Result<Self::Tensor> {
        self.upload(data, shape)
    }
    /// Uploads the weight `(out, in)` of a linear layer, row-major in `data`, for `linear` alone.
    /// A backend may lay it out in memory as its `linear` reads it fastest (the CPU backend keeps
    /// it transposed, or packed as bf16 when asked to: then it has neither that shape nor exactly
    /// those values). Defaults to `upload_weight`.
    fn upload_linear_weight(&self, data: Vec<f32>, out_dim: usize, in_dim: usize) -> Result<Self::Tensor> {
        self.upload_weight(data, &[out_dim, in_dim])
    }
    /// Uploads the weight `(o, c, kh, kw)` of a convolution, for `conv2d` alone. A backend may
    /// store it as its `conv2d` reads it fastest (the CPU backend can pack it as bf16: then it
    /// has neither that shape nor exactly those values). Defaults to `upload_weight`.
    fn upload_conv_weight(&self, data: Vec<f32>, shape: [usize; 4]) -> Result<Self::Tensor> {
        self.upload_weight(data, &shape)
    }
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// Reads a tensor back without blocking: the form the pipelines use, since in the browser
    /// the GPU's results arrive through the event loop. Defaults to `download`.
    fn download_async(&self, t: &Self::Tensor) -> impl std::future::Future<Output = Result<Vec<f32>>> {
        std::future::ready(self.download(t))
    }

    fn reshape(&self, t: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    /// Reorders the dimensions (PyTorch `permute`); the result is laid out contiguously.
    fn permute(&self, t: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor>;
    fn narrow(&self, t: &Self::Tensor, dim: usize, start: usize, len: usize) -> Result<Self::Tensor>;
    fn cat(&self, ts: &[&Self::Tensor], dim: usize) -> Result<Self::Tensor>;

    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `t * mul + add`.
    fn affine(&self, t: &Self::Tensor, mul: f32, add: f32) -> Result<Self::Tensor>;
    fn clamp(&self, t: &Self::Tensor, lo: f32, hi: f32) -> Result<Self::Tensor>;
    fn silu(&self, t: &Self::Tensor) -> Result<Self::Tensor>;
    /// GELU with the exact erf, as `torch.nn.functional.gelu` by default.
    fn gelu(&self, t: &Self::Tensor) -> Result<Self::Tensor>;
    fn softmax_last(&self, t: &Self::Tensor) -> Result<Self::Tensor>;

    /// Batched matrix product `(..., m, k) x (..., k, n)`, batch dimensions equal.
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x (..., in)` times `w (out, in)` transposed, plus `b (out)`: `torch.nn.Linear`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>) -> Result<Self::Tensor>;
    /// `gelu(linear(x, w, b))`, the exact GELU after a linear layer (a feed-forward's first
    /// half); a backend may apply it as each block of the product is finished. The default is
    /// the two steps.
    fn linear_gelu(&self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        self.gelu(&self.linear(x, w, b)?)
    }
    /// `residual + linear(x, w, b)`, a linear layer closing a residual connection (`residual`
    /// has the output's shape); a backend may add it as each block of the product is finished.
    /// The default is the two steps.
    fn linear_add(&self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>, residual: &Self::Tensor) -> Result<Self::Tensor> {
        self.add(residual, &self.linear(x, w, b)?)
    }
    /// `torch.nn.Conv2d` with symmetric zero padding; `x (N, C, H, W)`, `w (O, C, kh, kw)`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Self::Tensor>;
    /// [`Backend::conv2d`] of a map the caller gives up: no other handle to `x` (no clone, and no
    /// reshaped or narrowed view of its storage) may be alive, since a backend may write the
    /// result into `x`'s own memory (the CPU backend does for 1x1 convolutions to fewer
    /// channels, such as a resnet's shortcut, and releases the rest). Defaults to `conv2d`.
    fn conv2d_reusing(&self, x: Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>, stride: usize, padding: usize) -> Result<Self::Tensor> {
        self.conv2d(&x, w, b, stride, padding)
    }
    /// Zero padding of the last two dimensions: `[top, bottom, left, right]`.
    fn pad2d(&self, x: &Self::Tensor, pad: [usize; 4]) -> Result<Self::Tensor>;
    /// Nearest-neighbour resize of the last two dimensions to `(h, w)`, as
    /// `F.interpolate(mode="nearest")`: source index `floor(dst * in / out)`.
    fn upsample_nearest(&self, x: &Self::Tensor, h: usize, w: usize) -> Result<Self::Tensor>;

    /// `torch.nn.GroupNorm` over `(N, C, ...)`.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f64,
    ) -> Result<Self::Tensor>;
    /// `torch.nn.LayerNorm` over the last dimension.
    fn layer_norm(&self, x: &Self::Tensor, gamma: &Self::Tensor, beta: &Self::Tensor, eps: f64) -> Result<Self::Tensor>;

    /// Rows of `table (V, D)` picked by `ids`: `(ids.len(), D)`.
    fn embedding(&self, ids: &[u32], table: &Self::Tensor) -> Result<Self::Tensor>;
    /// For each row of `z (N, D)`, the row of `codebook (K, D)` nearest in Euclidean distance
    /// (the first on ties, as `torch.argmin`).
    fn vq_nearest(&self, z: &Self::Tensor, codebook: &Self::Tensor) -> Result<Self::Tensor>;

    /// Scaled dot-product attention over `(B, H, L, D)` tensors: `softmax(q k^T * scale) v`.
    fn attention(&self, q: &Self::Tensor, k: &Self::Tensor, v: &Self::Tensor, scale: f32) -> Result<Self::Tensor> {
        let kt = self.permute(k, &[0, 1, 3, 2])?;
        let scores = self.affine(&self.matmul(q, &kt)?, scale, 0.0)?;
        let probs = self.softmax_last(&scores)?;
        self.matmul(&probs, v)
    }

    /// [`Backend::attention`] on sequences `(B, L, heads * D)` with the heads side by side (as
    /// the projections give them); the result is laid out the same way. The default splits and
    /// merges the heads around `attention`.
    fn attention_heads(&self, q: &Self::Tensor, k: &Self::Tensor, v: &Self::Tensor, heads: usize, scale: f32) -> Result<Self::Tensor> {
        let split = |x: &Self::Tensor| crate::nn::split_heads(self, x, heads);
        let o = self.attention(&split(q)?, &split(k)?, &split(v)?, scale)?;
        crate::nn::merge_heads(self, &o)
    }

    /// `group_norm` followed by SiLU, as every resnet and decoder output applies them.
    fn group_norm_silu(&self, x: &Self::Tensor, groups: usize, gamma: &Self::Tensor, beta: &Self::Tensor, eps: f64) -> Result<Self::Tensor> {
        self.silu(&self.group_norm(x, groups, gamma, beta, eps)?)
    }

    /// `conv2d(group_norm_silu(x, ...), w, b, stride, padding)`: the norm, SiLU and convolution
    /// that every resnet (and a decoder's output) applies. A backend may normalise the input as
    /// the convolution reads it, never holding the normalised map (the CPU backend does, for
    /// the 3x3 convolutions it does by Winograd's method). Defaults to the two steps.
    fn group_norm_silu_conv2d(
        &self,
        x: &Self::Tensor,
        (groups, gamma, beta, eps): (usize, &Self::Tensor, &Self::Tensor, f64),
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Self::Tensor> {
        self.conv2d(&self.group_norm_silu(x, groups, gamma, beta, eps)?, w, b, stride, padding)
    }

    /// A 3x3 convolution (stride 1, padding 1) of `x (N, C, H, W)` upsampled to `(2H, 2W)` by
    /// nearest neighbour: diffusers' `Upsample2D`. A backend may upsample as the convolution
    /// reads its input, never holding the upsampled map (the CPU backend does where it uses
    /// Winograd's method). Defaults to the two steps.
    fn upsample2x_conv3x3(&self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        upsample2x_conv3x3_in_steps(self, x, w, b)
    }

    /// GEGLU over the last dimension `2 * n`: `hidden * gelu(gate)` of its two halves, `(..., n)`.
    fn geglu(&self, t: &Self::Tensor) -> Result<Self::Tensor> {
        let d = self.dims(t);
        let last = d.len() - 1;
        let n = d[last] / 2;
        let hidden = self.narrow(t, last, 0, n)?;
        let gate = self.narrow(t, last, n, n)?;
        self.mul(&hidden, &self.gelu(&gate)?)
    }
}

/// [`Backend::upsample2x_conv3x3`] as its two steps: the upsampled map made whole, then convolved.
pub fn upsample2x_conv3x3_in_steps<B: Backend>(be: &B, x: &B::Tensor, w: &B::Tensor, b: Option<&B::Tensor>) -> Result<B::Tensor> {
    let d = be.dims(x);
    if d.len() != 4 {
        return Err(crate::Error::Backend(format!("upsample2x_conv3x3 of {d:?}")));
    }
    be.conv2d(&be.upsample_nearest(x, 2 * d[2], 2 * d[3])?, w, b, 1, 1)
}
