//! The CPU backend: candle tensors, with the operations that dominate the LDM models (matrix
//! products, convolutions, normalisation, attention, activations) done by our own kernels over
//! the tensors' buffers ([`gemm`], [`conv`], [`norm`], [`attention`], [`math`]), spread over the
//! current rayon pool (so `threads::Threads` bounds them). The rest is candle's.

mod attention;
#[cfg(target_arch = "x86_64")]
mod amx;
pub mod bf16;
mod conv;
mod conv_bf16;
mod elementwise;
mod gemm;
mod linear;
mod math;
mod norm;
mod vq;
mod winograd;

use candle_core::{DType, Device, Storage, Tensor};

use super::Backend;
use crate::{Error, Result};

/// Runs `f` on the tensor's float32 elements in row-major order (copying only a tensor that is
/// not contiguous).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Backend("a CPU kernel was given a tensor that is not on the CPU".into()));
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Backend("a contiguous tensor has no contiguous offsets".into()))?;
    Ok(f(&data[start..end]))
}

/// Runs `f` on the elements of a bf16 tensor (a packed weight) in row-major order.
fn with_bf16<R>(t: &Tensor, f: impl FnOnce(&[half::bf16]) -> R) -> Result<R> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Backend("a CPU kernel was given a tensor that is not on the CPU".into()));
    };
    Ok(f(&cpu.as_slice::<half::bf16>()?[layout.start_offset()..][..t.elem_count()]))
}

/// `a op b` for equal shapes, or `b` of `a`'s shape with its trailing dimensions 1 (a per-channel
/// term); `None` for other broadcasts, which candle does.
fn binary(a: &Tensor, b: &Tensor, op: fn(f32, f32) -> f32) -> Option<Result<Tensor>> {
    let (da, db) = (a.dims(), b.dims());
    if da == db {
        return Some(with_f32(a, |x| with_f32(b, |y| elementwise::zip(x, y, op))).and_then(|r| tensor(r?, da)));
    }
    let k = db.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    if db.len() == da.len() && k > 0 && k < da.len() && da[..k] == db[..k] {
        let run: usize = da[k..].iter().product();
        if run > 0 {
            return Some(with_f32(a, |x| with_f32(b, |y| elementwise::zip_runs(x, y, run, op))).and_then(|r| tensor(r?, da)));
        }
    }
    None
}

/// Runs `f` on the `(in, out)` matrix `w^T` of a linear weight `w (out, in)`: read in place from
/// a weight that `upload_linear_weight` stored transposed, else a view of the row-major one.
fn with_linear_weight<R>(w: &Tensor, f: impl FnOnce(gemm::Mat<'_>) -> R) -> Result<R> {
    let (out_dim, in_dim) = w.dims2()?;
    let (storage, layout) = w.storage_and_layout();
    if layout.stride() == [1, out_dim] {
        if let Storage::Cpu(cpu) = &*storage {
            let data = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            if let Some(data) = data.get(start..start + in_dim * out_dim) {
                return Ok(f(gemm::Mat::rows(data, in_dim, out_dim)));
            }
        }
    }
    drop(storage);
    with_f32(w, |data| f(gemm::Mat::rows(data, out_dim, in_dim).t()))
}

/// Moves the values out of a float32 tensor that is its storage's whole, contiguous content,
/// leaving the storage empty; `None` (and the tensor untouched) otherwise. Only for a tensor
/// that has no other handle (see [`Backend::conv2d_reusing`]).
fn take_f32(t: &Tensor) -> Result<Option<Vec<f32>>> {
    struct Take(std::sync::Mutex<Option<Vec<f32>>>);
    impl candle_core::InplaceOp1 for Take {
        fn name(&self) -> &'static str {
            "take"
        }
        fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
            if let (candle_core::CpuStorage::F32(v), Ok(mut taken)) = (storage, self.0.lock()) {
                if layout.start_offset() == 0 && layout.is_contiguous() && v.len() == layout.shape().elem_count() {
                    *taken = Some(std::mem::take(v));
                }
            }
            Ok(())
        }
    }
    let take = Take(std::sync::Mutex::new(None));
    t.inplace_op1(&take)?;
    Ok(take.0.into_inner().ok().flatten())
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Input maps of at least this many values are normalised as the convolution reads them
/// whatever the Winograd tile (see `group_norm_silu_conv2d`): 16 MiB of float32.
const FUSED_NORM_ALWAYS: usize = 1 << 22;

/// candle on the CPU, with f32 weights. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    /// Whether weights are kept as bf16 ([`bf16`], [`conv_bf16`]).
    bf16_weights: bool,
}

/// The CPU backend with f32 weights, as a value: `&Cpu` wherever a backend is asked for.
#[allow(non_upper_case_globals)]
pub const Cpu: Cpu = Cpu { bf16_weights: false };

impl Cpu {
    /// f32 weights throughout.
    pub fn new() -> Self {
        Cpu
    }

    /// Linear layers' weights kept as bf16 and multiplied in bf16 with f32 sums (half their
    /// memory; on Intel AMX, 2-4x faster products than AVX512-BF16, which is itself about
    /// 1.5-2x faster than f32; slower on CPUs with neither). On AMX, convolutions with a
    /// multiple of 32 input channels too ([`conv_bf16`]). Norms and attention stay f32.
    pub fn with_bf16_weights() -> Self {
        Cpu { bf16_weights: true }
    }

    /// Whether weights are kept as bf16 where they can be.
    pub fn bf16_weights(&self) -> bool {
        self.bf16_weights
    }
}

/// `x w^T (+ b)` for a weight packed by [`bf16::pack`], a bf16 tensor `(out / NR, in / 2, 2 NR)`.
fn linear_bf16(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (panels, pairs, width) = w.dims3()?;
    let (out_dim, in_dim) = (panels * bf16::NR, pairs * 2);
    let dims = x.dims();
    if width != 2 * bf16::NR || dims.last() != Some(&in_dim) {
        return Err(Error::Backend(format!("linear: a bf16 weight of {:?} for input {dims:?}", w.dims())));
    }
    let mut out = vec![0f32; x.elem_count() / in_dim * out_dim];
    let bias = b.map(contiguous_f32).transpose()?;
    with_bf16(w, |packed| with_f32(x, |x| bf16::linear(&mut out, x, packed, bias.as_deref(), in_dim, out_dim)))???;
    let mut shape = dims.to_vec();
    *shape.last_mut().unwrap_or(&mut 0) = out_dim;
    tensor(out, &shape)
}

/// `x w^T (+ b)` for an f32 weight that could not be packed (kept transposed,
/// [`with_linear_weight`]), on the `gemm` crate.
fn linear_gemm(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let inner = *dims.last().ok_or_else(|| Error::Backend("linear on a scalar".into()))?;
    let wd = w.dims();
    if wd.len() != 2 || wd[1] != inner {
        return Err(Error::Backend(format!("linear: weight {wd:?} for input {dims:?}")));
    }
    let (rows, out_dim) = (x.elem_count() / inner.max(1), wd[0]);
    let mut out = vec![0f32; rows * out_dim];
    if let Some(b) = b {
        with_f32(b, |b| out.chunks_mut(out_dim.max(1)).for_each(|r| r.copy_from_slice(b)))?;
    }
    with_f32(x, |x| {
        with_linear_weight(w, |w| {
            gemm::gemm(gemm::MatMut::rows(&mut out, rows, out_dim), gemm::Mat::rows(x, rows, inner), w, b.is_some(), gemm::Par::Auto)
        })
    })???;
    let mut shape = dims.to_vec();
    *shape.last_mut().unwrap_or(&mut 0) = out_dim;
    tensor(out, &shape)
}

/// What a packed linear layer's product does to its output in the same pass.
#[derive(Clone, Copy)]
enum After<'a> {
    Nothing,
    Gelu,
    /// Adds this tensor, of the output's shape.
    Add(&'a Tensor),
}

/// `x w^T (+ b)`, then `after`, for a weight packed by [`linear::pack`], an f32 tensor
/// `(out / NR, in, NR)`.
fn linear_packed(x: &Tensor, w: &Tensor, b: Option<&Tensor>, after: After<'_>) -> Result<Tensor> {
    let (panels, in_dim, width) = w.dims3()?;
    let out_dim = panels * linear::NR;
    let dims = x.dims();
    if width != linear::NR || dims.last() != Some(&in_dim) {
        return Err(Error::Backend(format!("linear: a packed weight of {:?} for input {dims:?}", w.dims())));
    }
    let mut shape = dims.to_vec();
    *shape.last_mut().unwrap_or(&mut 0) = out_dim;
    let mut out = vec![0f32; x.elem_count() / in_dim.max(1) * out_dim];
    let bias = b.map(contiguous_f32).transpose()?;
    let run = |epi: linear::Epilogue<'_>, out: &mut [f32]| -> Result<()> {
        with_f32(w, |packed| with_f32(x, |x| linear::linear(out, x, packed, bias.as_deref(), in_dim, out_dim, epi)))???;
        Ok(())
    };
    match after {
        After::Nothing => run(linear::Epilogue::None, &mut out)?,
        After::Gelu => run(linear::Epilogue::Gelu, &mut out)?,
        After::Add(r) => {
            if r.dims() != shape {
                return Err(Error::Backend(format!("linear: a residual of {:?} for an output of {shape:?}", r.dims())));
            }
            with_f32(r, |r| run(linear::Epilogue::Add(r), &mut out))??
        }
    }
    tensor(out, &shape)
}

/// A convolution with a weight packed by [`conv_bf16::pack`], a bf16 tensor `(o / NR, kh, kw, c, NR)`.
fn conv_bf16_tensor(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let (xd, wd) = (x.dims(), w.dims());
    if xd.len() != 4 || wd.len() != 5 || wd[4] != bf16::NR || xd[1] != wd[3] {
        return Err(Error::Backend(format!("conv2d of {xd:?} with a bf16 weight of {wd:?}")));
    }
    let s = conv::ConvShape { n: xd[0], c: xd[1], h: xd[2], w: xd[3], o: wd[0] * bf16::NR, kh: wd[1], kw: wd[2], stride, padding };
    let (oh, ow) = s.out_hw()?;
    let bias = b.map(contiguous_f32).transpose()?;
    let out = with_bf16(w, |packed| with_f32(x, |x| conv_bf16::conv2d(x, packed, bias.as_deref(), s)))???;
    tensor(out, &[s.n, s.o, oh, ow])
}

fn contiguous_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Backend for Cpu {
    type Tensor = Tensor;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn transients(&self) -> crate::pipelines::memory::Transients {
        crate::pipelines::memory::Transients::Blocked
    }

    fn dims(&self, t: &Tensor) -> Vec<usize> {
        t.dims().to_vec()
    }

    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Backend(format!(
                "upload: {} values for shape {shape:?} ({n} expected)",
                data.len()
            )));
        }
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    fn download(&self, t: &Tensor) -> Result<Vec<f32>> {
        contiguous_f32(t)
    }

    fn reshape(&self, t: &Tensor, shape: &[usize]) -> Result<Tensor> {
        Ok(t.reshape(shape)?)
    }

    fn permute(&self, t: &Tensor, perm: &[usize]) -> Result<Tensor> {
        Ok(t.permute(perm)?.contiguous()?)
    }

    fn narrow(&self, t: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        Ok(t.narrow(dim, start, len)?.contiguous()?)
    }

    fn cat(&self, ts: &[&Tensor], dim: usize) -> Result<Tensor> {
        Ok(Tensor::cat(ts, dim)?)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        binary(a, b, |x, y| x + y).unwrap_or_else(|| Ok(a.broadcast_add(b)?))
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        binary(a, b, |x, y| x * y).unwrap_or_else(|| Ok(a.broadcast_mul(b)?))
    }

    fn affine(&self, t: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
        tensor(with_f32(t, |x| elementwise::affine(x, mul, add))?, t.dims())
    }

    fn clamp(&self, t: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
        Ok(t.clamp(lo, hi)?)
    }

    fn silu(&self, t: &Tensor) -> Result<Tensor> {
        let mut data = with_f32(t, |x| x.to_vec())?;
        math::silu_inplace(&mut data);
        tensor(data, t.dims())
    }

    fn gelu(&self, t: &Tensor) -> Result<Tensor> {
        let mut data = with_f32(t, |x| x.to_vec())?;
        math::gelu_inplace(&mut data);
        tensor(data, t.dims())
    }

    fn geglu(&self, t: &Tensor) -> Result<Tensor> {
        let mut dims = t.dims().to_vec();
        let last = dims.last_mut().ok_or_else(|| Error::Backend("geglu on a scalar".into()))?;
        if *last % 2 != 0 {
            return Err(Error::Backend(format!("geglu: odd last dimension {last}")));
        }
        *last /= 2;
        let inner = *last;
        tensor(with_f32(t, |x| math::geglu(x, inner))?, &dims)
    }

    fn softmax_last(&self, t: &Tensor) -> Result<Tensor> {
        let cols = *t.dims().last().ok_or_else(|| Error::Backend("softmax on a scalar".into()))?;
        let mut data = with_f32(t, |x| x.to_vec())?;
        math::softmax_rows(&mut data, cols);
        tensor(data, t.dims())
    }

    fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (da, db) = (a.dims(), b.dims());
        let r = da.len();
        if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
            return Err(Error::Backend(format!("matmul of {da:?} and {db:?}")));
        }
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        let batch: usize = da[..r - 2].iter().product();
        let mut out = vec![0f32; batch * m * n];
        with_f32(a, |a| {
            with_f32(b, |b| -> Result<()> {
                for i in 0..batch {
                    gemm::gemm(
                        gemm::MatMut::rows(&mut out[i * m * n..(i + 1) * m * n], m, n),
                        gemm::Mat::rows(&a[i * m * k..(i + 1) * m * k], m, k),
                        gemm::Mat::rows(&b[i * k * n..(i + 1) * k * n], k, n),
                        false,
                        gemm::Par::Auto,
                    )?;
                }
                Ok(())
            })
        })???;
        let mut shape = da.to_vec();
        shape[r - 1] = n;
        tensor(out, &shape)
    }

    fn upload_linear_weight(&self, data: Vec<f32>, out_dim: usize, in_dim: usize) -> Result<Tensor> {
        if data.len() != out_dim * in_dim {
            return Err(Error::Backend(format!("a {out_dim}x{in_dim} linear weight of {} values", data.len())));
        }
        if self.bf16_weights && bf16::packable(out_dim, in_dim) {
            let packed = bf16::pack(&data, out_dim, in_dim)?;
            drop(data);
            let shape = [out_dim / bf16::NR, in_dim / 2, 2 * bf16::NR];
            return Ok(Tensor::from_vec(packed, &shape[..], &Device::Cpu)?);
        }
        if linear::packable(out_dim, in_dim) {
            let packed = linear::pack(&data, out_dim, in_dim)?;
            drop(data);
            return tensor(packed, &[out_dim / linear::NR, in_dim, linear::NR]);
        }
        // (in, out) row-major, seen as its transpose: the (out, in) tensor with strides (1, out)
        let t = elementwise::transpose(&data, out_dim, in_dim);
        drop(data);
        Ok(tensor(t, &[in_dim, out_dim])?.t()?)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.linear_then(x, w, b, After::Nothing)
    }

    fn linear_gelu(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.linear_then(x, w, b, After::Gelu)
    }

    fn linear_add(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
        self.linear_then(x, w, b, After::Add(residual))
    }

    fn upload_conv_weight(&self, data: Vec<f32>, shape: [usize; 4]) -> Result<Tensor> {
        let [o, c, kh, kw] = shape;
        if self.bf16_weights && data.len() == o * c * kh * kw && conv_bf16::packable(o, c, kh, kw) {
            let packed = conv_bf16::pack(&data, o, c, kh, kw)?;
            drop(data);
            // the packed layout, shaped so that it carries the convolution's dimensions
            let shape = [o / bf16::NR, kh, kw, c, bf16::NR];
            return Ok(Tensor::from_vec(packed, &shape[..], &Device::Cpu)?);
        }
        self.upload_weight(data, &shape)
    }

    fn conv2d(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
        if w.dtype() == DType::BF16 {
            return conv_bf16_tensor(x, w, b, stride, padding);
        }
        let (xd, wd) = (x.dims(), w.dims());
        if xd.len() != 4 || wd.len() != 4 || xd[1] != wd[1] {
            return Err(Error::Backend(format!("conv2d of {xd:?} with weight {wd:?}")));
        }
        let s = conv::ConvShape { n: xd[0], c: xd[1], h: xd[2], w: xd[3], o: wd[0], kh: wd[2], kw: wd[3], stride, padding };
        let (oh, ow) = s.out_hw()?;
        let bias = b.map(|b| with_f32(b, |b| b.to_vec())).transpose()?;
        let out = with_f32(x, |x| with_f32(w, |w| conv::conv2d(x, w, bias.as_deref(), s)))???;
        tensor(out, &[s.n, s.o, oh, ow])
    }

    fn conv2d_reusing(&self, x: Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
        let (xd, wd) = (x.dims().to_vec(), w.dims().to_vec());
        // one image, 1x1 to fewer channels: the output fits where the input was
        let fits = w.dtype() == DType::F32 && xd.len() == 4 && xd[0] == 1 && wd[..] == [wd[0], xd[1], 1, 1] && wd[0] <= xd[1];
        let taken = if fits && stride == 1 && padding == 0 { take_f32(&x)? } else { None };
        let Some(mut data) = taken else {
            return self.conv2d(&x, w, b, stride, padding);
        };
        drop(x);
        let (c, o, p) = (xd[1], wd[0], xd[2] * xd[3]);
        let bias = b.map(contiguous_f32).transpose()?;
        with_f32(w, |w| conv::conv1x1_in_place(&mut data, w, bias.as_deref(), c, o, p))??;
        // the planes past the output are given back (glibc's realloc shrinks in place)
        data.truncate(o * p);
        data.shrink_to_fit();
        tensor(data, &[1, o, xd[2], xd[3]])
    }

    fn pad2d(&self, x: &Tensor, pad: [usize; 4]) -> Result<Tensor> {
        let r = x.rank();
        let x = x.pad_with_zeros(r - 2, pad[0], pad[1])?;
        Ok(x.pad_with_zeros(r - 1, pad[2], pad[3])?)
    }

    fn group_norm_silu_conv2d(
        &self,
        x: &Tensor,
        (groups, gamma, beta, eps): (usize, &Tensor, &Tensor, f64),
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        // with F(2x2) each input row is made twice (F(4x4): 1.5 times), SiLU and all: slower
        // than one pass over a map that small, whose memory does not matter
        let fuse = |(s, t): (conv::ConvShape, &winograd::Tiling)| t.m == 4 || s.n * s.c * s.h * s.w >= FUSED_NORM_ALWAYS;
        let Some((s, _)) = self.winograd_shape(x, w, stride, padding, false).filter(|&st| fuse(st)) else {
            return self.conv2d(&self.group_norm_silu(x, groups, gamma, beta, eps)?, w, b, stride, padding);
        };
        let (g, bt) = (contiguous_f32(gamma)?, contiguous_f32(beta)?);
        let bias = b.map(contiguous_f32).transpose()?;
        let out = with_f32(x, |x| {
            let (a, ab) = norm::group_affine(x, s.n, s.c, s.h * s.w, groups, &g, &bt, eps)?;
            let pro = winograd::Prologue { up2: false, norm_silu: Some((&a, &ab)) };
            with_f32(w, |w| conv::conv2d_with(x, w, bias.as_deref(), s, pro))?
        })??;
        tensor(out, &[s.n, s.o, s.h, s.w])
    }

    fn upsample2x_conv3x3(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let Some((s, _)) = self.winograd_shape(x, w, 1, 1, true) else {
            return super::upsample2x_conv3x3_in_steps(self, x, w, b);
        };
        let bias = b.map(contiguous_f32).transpose()?;
        let pro = winograd::Prologue { up2: true, norm_silu: None };
        let out = with_f32(x, |x| with_f32(w, |w| conv::conv2d_with(x, w, bias.as_deref(), s, pro)))???;
        tensor(out, &[s.n, s.o, s.h, s.w])
    }

    fn upsample_nearest(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let d = x.dims();
        if d.len() < 2 {
            return Err(Error::Backend(format!("upsample_nearest of {d:?}")));
        }
        let (ih, iw) = (d[d.len() - 2], d[d.len() - 1]);
        let planes = d[..d.len() - 2].iter().product();
        let mut shape = d.to_vec();
        shape[d.len() - 2] = h;
        shape[d.len() - 1] = w;
        tensor(with_f32(x, |x| elementwise::upsample_nearest(x, planes, ih, iw, h, w))?, &shape)
    }

    fn group_norm(&self, x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        self.group_norm_act(x, groups, gamma, beta, eps, false)
    }

    fn group_norm_silu(&self, x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        self.group_norm_act(x, groups, gamma, beta, eps, true)
    }

    fn layer_norm(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        let d = *x.dims().last().ok_or_else(|| Error::Backend("layer_norm on a scalar".into()))?;
        let (g, b) = (contiguous_f32(gamma)?, contiguous_f32(beta)?);
        tensor(with_f32(x, |x| norm::layer_norm(x, d, &g, &b, eps))??, x.dims())
    }

    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor> {
        let rows = table.dims()[0];
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= rows) {
            return Err(Error::InvalidArgument(format!("token id {bad} is outside the embedding table of {rows} rows")));
        }
        let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu)?;
        Ok(table.index_select(&idx, 0)?)
    }

    fn vq_nearest(&self, z: &Tensor, codebook: &Tensor) -> Result<Tensor> {
        let (zd, cd) = (z.dims(), codebook.dims());
        if zd.len() != 2 || cd.len() != 2 || zd[1] != cd[1] {
            return Err(Error::Backend(format!("vq_nearest of {zd:?} with codebook {cd:?}")));
        }
        tensor(with_f32(z, |z| with_f32(codebook, |cb| vq::nearest(z, cb, zd[1])))???, zd)
    }

    fn attention_heads(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f32) -> Result<Tensor> {
        let (qd, kd) = (q.dims(), k.dims());
        if qd.len() != 3 || kd.len() != 3 || v.dims() != kd || qd[0] != kd[0] || qd[2] != kd[2] || heads == 0 || qd[2] % heads != 0 {
            return Err(Error::Backend(format!("attention of {qd:?} over {kd:?} with {heads} heads")));
        }
        let (b, lq, lk, d) = (qd[0], qd[1], kd[1], qd[2] / heads);
        let out = with_f32(q, |q| with_f32(k, |k| with_f32(v, |v| attention::attention(q, k, v, b, lq, lk, heads, d, scale))))????;
        tensor(out, qd)
    }
}

impl Cpu {
    /// A linear layer and what follows it: in the product's own pass for an f32 weight packed
    /// by [`linear::pack`], else as a step of its own after the product.
    fn linear_then(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, after: After<'_>) -> Result<Tensor> {
        if w.dtype() == DType::F32 && w.rank() == 3 {
            return linear_packed(x, w, b, after);
        }
        let out = if w.dtype() == DType::BF16 { linear_bf16(x, w, b)? } else { linear_gemm(x, w, b)? };
        match after {
            After::Nothing => Ok(out),
            After::Gelu => self.gelu(&out),
            After::Add(r) => self.add(r, &out),
        }
    }

    /// The shape of a convolution of `x` (upsampled 2x when `up2`) by the f32 weight `w` where
    /// it is done by Winograd's method, which can make its input as it reads it
    /// ([`winograd::Prologue`]); `None` where it is not (it then needs its input whole).
    fn winograd_shape(&self, x: &Tensor, w: &Tensor, stride: usize, padding: usize, up2: bool) -> Option<(conv::ConvShape, &'static winograd::Tiling)> {
        let (xd, wd) = (x.dims(), w.dims());
        if w.dtype() != DType::F32 || xd.len() != 4 || wd.len() != 4 || xd[1] != wd[1] {
            return None;
        }
        let f = if up2 { 2 } else { 1 };
        let s = conv::ConvShape { n: xd[0], c: xd[1], h: f * xd[2], w: f * xd[3], o: wd[0], kh: wd[2], kw: wd[3], stride, padding };
        winograd::choose(s).map(|t| (s, t))
    }

    fn group_norm_act(&self, x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 2 {
            return Err(Error::Backend(format!("group_norm: {groups} groups for shape {dims:?}")));
        }
        let (n, c, spatial) = (dims[0], dims[1], dims[2..].iter().product());
        let (g, b) = (contiguous_f32(gamma)?, contiguous_f32(beta)?);
        tensor(with_f32(x, |x| norm::group_norm(x, n, c, spatial, groups, &g, &b, eps, silu))??, dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_linear_layers_equal_the_two_steps() {
        // a packed weight (32 outputs), one that cannot be packed (40) and bf16 weights
        for (be, out_dim) in [(Cpu::new(), 32), (Cpu::new(), 40), (Cpu::with_bf16_weights(), 32)] {
            let vals = |n: usize, k: usize| (0..n).map(|i| ((i * k) % 89) as f32 / 44.0 - 1.0).collect::<Vec<f32>>();
            let x = be.upload(vals(3 * 5 * 24, 7), &[3, 5, 24]).unwrap();
            let w = be.upload_linear_weight(vals(out_dim * 24, 11), out_dim, 24).unwrap();
            let b = be.upload(vals(out_dim, 13), &[out_dim]).unwrap();
            let r = be.upload(vals(3 * 5 * out_dim, 17), &[3, 5, out_dim]).unwrap();
            let plain = be.linear(&x, &w, Some(&b)).unwrap();
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let fused = be.linear_gelu(&x, &w, Some(&b)).unwrap();
            assert_eq!(bits(&fused), bits(&be.gelu(&plain).unwrap()), "gelu, {out_dim} outputs");
            let fused = be.linear_add(&x, &w, Some(&b), &r).unwrap();
            assert_eq!(bits(&fused), bits(&be.add(&r, &plain).unwrap()), "add, {out_dim} outputs");
            assert_eq!(fused.dims(), &[3, 5, out_dim]);
        }
        let be = Cpu::new();
        let w = be.upload_linear_weight(vec![0.5; 32 * 4], 32, 4).unwrap();
        let x = be.upload(vec![1.0; 8], &[2, 4]).unwrap();
        let e = be.linear_add(&x, &w, None, &be.upload(vec![0.0; 32], &[1, 32]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("residual of [1, 32]"), "{e}");
    }

    #[test]
    fn fused_norm_and_upsampling_convolutions_equal_the_two_steps() {
        let be = Cpu::new();
        let t = |n: usize, shape: &[usize], k: usize| {
            let v: Vec<f32> = (0..n).map(|i| ((i * k) % 97) as f32 / 24.0 - 2.0).collect();
            be.upload(v, shape).unwrap()
        };
        // 64x64 and 48x48: Winograd (fused); 8x8: im2col (the two steps inside the backend)
        for (n, c, side, o) in [(2, 8, 64, 6), (1, 6, 48, 4), (2, 4, 8, 3)] {
            let x = t(n * c * side * side, &[n, c, side, side], 7919);
            let w = t(o * c * 9, &[o, c, 3, 3], 104729);
            let b = t(o, &[o], 31);
            let (gamma, beta) = (t(c, &[c], 13), t(c, &[c], 17));
            let want = be.conv2d(&be.group_norm_silu(&x, 2, &gamma, &beta, 1e-6).unwrap(), &w, Some(&b), 1, 1).unwrap();
            let got = be.group_norm_silu_conv2d(&x, (2, &gamma, &beta, 1e-6), &w, Some(&b), 1, 1).unwrap();
            assert_eq!(got.dims(), want.dims());
            let (got, want) = (be.download(&got).unwrap(), be.download(&want).unwrap());
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err <= 1e-6, "norm, {n}x{c}x{side}x{side} -> {o}: {err}");

            let half = t(n * c * side * side / 4, &[n, c, side / 2, side / 2], 7919);
            let up = be.upsample_nearest(&half, side, side).unwrap();
            let want = be.download(&be.conv2d(&up, &w, Some(&b), 1, 1).unwrap()).unwrap();
            let got = be.upsample2x_conv3x3(&half, &w, Some(&b)).unwrap();
            assert_eq!(got.dims(), [n, o, side, side]);
            let got = be.download(&got).unwrap();
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err <= 1e-6, "upsampling, {n}x{c}x{side}x{side} -> {o}: {err}");
        }
    }

    #[test]
    fn convolutions_reusing_their_input_equal_conv2d() {
        let be = Cpu::new();
        let t = |shape: &[usize], k: usize| {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i * k) % 97) as f32 / 24.0 - 2.0).collect();
            be.upload(v, shape).unwrap()
        };
        // (x, weight): 1x1 to fewer, as many and (not in place) more channels, over 1 to 3
        // blocks of positions; two images (not in place); a 3x3 (not in place)
        for (xs, ws) in [
            ([1, 8, 20, 30], [3, 8, 1, 1]),
            ([1, 6, 9, 7], [6, 6, 1, 1]),
            ([1, 5, 40, 33], [2, 5, 1, 1]),
            ([1, 3, 8, 8], [5, 3, 1, 1]),
            ([2, 8, 8, 8], [3, 8, 1, 1]),
            ([1, 4, 8, 8], [2, 4, 3, 3]),
        ] {
            let (x, w, b) = (t(&xs, 7919), t(&ws, 104729), t(&ws[..1], 31));
            let pad = ws[2] / 2;
            let want = be.download(&be.conv2d(&x, &w, Some(&b), 1, pad).unwrap()).unwrap();
            let got = be.conv2d_reusing(x, &w, Some(&b), 1, pad).unwrap();
            assert_eq!(got.dims(), [xs[0], ws[0], xs[2], xs[3]]);
            let got = be.download(&got).unwrap();
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err <= 1e-5, "{xs:?} with {ws:?}: {err}");
        }
        // a view of part of a storage (here a narrowed map) is not taken: computed aside
        let whole = t(&[1, 8, 10, 10], 7919);
        let part = whole.narrow(1, 0, 4).unwrap();
        let (w, b) = (t(&[2, 4, 1, 1], 104729), t(&[2], 31));
        let want = be.download(&be.conv2d(&part, &w, Some(&b), 1, 0).unwrap()).unwrap();
        let before = be.download(&whole).unwrap();
        let got = be.download(&be.conv2d_reusing(part, &w, Some(&b), 1, 0).unwrap()).unwrap();
        assert_eq!(got, want);
        assert_eq!(be.download(&whole).unwrap(), before, "the map a view came from was changed");
    }

    #[test]
    fn linear_reads_transposed_and_row_major_weights_alike() {
        for out in [70, 48] {
            linear_weights_alike(out);
        }
    }

    /// 70 outputs stay a transposed (in, out) weight; 48 are packed in panels ([`linear`]).
    fn linear_weights_alike(out: usize) {
        let (rows, inner) = (5, 37);
        let x: Vec<f32> = (0..rows * inner).map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0).collect();
        let w: Vec<f32> = (0..out * inner).map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0).collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.1).collect();
        let be = Cpu;
        let xt = be.upload(x.clone(), &[rows, inner]).unwrap();
        let plain = be.upload(w.clone(), &[out, inner]).unwrap();
        let prepared = be.upload_linear_weight(w.clone(), out, inner).unwrap();
        if out == 70 {
            assert_eq!(prepared.dims(), &[out, inner]);
            assert_eq!(be.download(&prepared).unwrap(), w, "the prepared weight holds the same values");
        } else {
            assert_eq!(prepared.dims(), &[out / linear::NR, inner, linear::NR]);
        }
        let bt = be.upload(b.clone(), &[out]).unwrap();
        let a = be.download(&be.linear(&xt, &plain, Some(&bt)).unwrap()).unwrap();
        let c = be.download(&be.linear(&xt, &prepared, Some(&bt)).unwrap()).unwrap();
        for r in 0..rows {
            for o in 0..out {
                let want = b[o] as f64 + (0..inner).map(|k| x[r * inner + k] as f64 * w[o * inner + k] as f64).sum::<f64>();
                for (name, got) in [("row-major", &a), ("prepared", &c)] {
                    let err = (got[r * out + o] as f64 - want).abs();
                    assert!(err < 1e-4, "{name} weight at ({r}, {o}): {err}");
                }
            }
        }
        let wrong = be.upload(x.clone(), &[inner, rows]).unwrap();
        assert!(be.linear(&wrong, &prepared, None).is_err(), "an input of the wrong width");
        assert!(be.upload_linear_weight(w, out, inner + 1).unwrap_err().to_string().contains("linear weight"));
    }

    #[test]
    fn bf16_linear_weights_are_packed_where_they_can_be() {
        let (rows, inner) = (7, 40);
        let x: Vec<f32> = (0..rows * inner).map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0).collect();
        let be = Cpu::with_bf16_weights();
        for out in [64, 70] {
            let w: Vec<f32> = (0..out * inner).map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0).collect();
            let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.1).collect();
            let prepared = be.upload_linear_weight(w.clone(), out, inner).unwrap();
            // 70 outputs are not a multiple of the panel width: that weight stays f32
            assert_eq!(prepared.dtype() == DType::BF16, out == 64, "{out}");
            let xt = be.upload(x.clone(), &[1, rows, inner]).unwrap();
            let bt = be.upload(b.clone(), &[out]).unwrap();
            let y = be.linear(&xt, &prepared, Some(&bt)).unwrap();
            assert_eq!(y.dims(), &[1, rows, out]);
            let y = be.download(&y).unwrap();
            let round = |v: f32| if out == 64 { f32::from_bits((bf16::round(v) as u32) << 16) } else { v };
            for r in 0..rows {
                for o in 0..out {
                    let want = b[o] as f64
                        + (0..inner).map(|k| round(x[r * inner + k]) as f64 * round(w[o * inner + k]) as f64).sum::<f64>();
                    assert!((y[r * out + o] as f64 - want).abs() < 1e-4, "({r}, {o}) of {out}");
                }
            }
            let wrong = be.upload(x.clone(), &[rows, inner / 2, 2]).unwrap();
            assert!(be.linear(&wrong, &prepared, None).is_err());
        }
    }

    #[test]
    fn bf16_convolution_weights_are_packed_on_amx_only() {
        let be = Cpu::with_bf16_weights();
        let amx = bf16::kernel() == bf16::Kernel::Amx;
        let round = |v: f32| f32::from_bits((bf16::round(v) as u32) << 16);
        // 64 input channels: packed on AMX; 4 (as a UNet's conv_in): f32 everywhere
        for (c, o, k, pad) in [(64, 32, 3, 1), (4, 32, 3, 1), (32, 64, 1, 0)] {
            let (n, h, w) = (2, 6, 5);
            let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0).collect();
            let wt: Vec<f32> = (0..o * c * k * k).map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0).collect();
            let b: Vec<f32> = (0..o).map(|i| i as f32 * 0.1).collect();
            let packed = be.upload_conv_weight(wt.clone(), [o, c, k, k]).unwrap();
            let is_bf16 = packed.dtype() == DType::BF16;
            assert_eq!(is_bf16, amx && c % 32 == 0, "{c} channels");
            let xt = be.upload(x.clone(), &[n, c, h, w]).unwrap();
            let bt = be.upload(b.clone(), &[o]).unwrap();
            let got = be.download(&be.conv2d(&xt, &packed, Some(&bt), 1, pad).unwrap()).unwrap();
            let r = |v: &[f32]| -> Vec<f32> { v.iter().map(|&v| if is_bf16 { round(v) } else { v }).collect() };
            let s = conv::ConvShape { n, c, h, w, o, kh: k, kw: k, stride: 1, padding: pad };
            let want = conv::conv2d(&r(&x), &r(&wt), Some(&b), s).unwrap();
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-3, "{c} channels: {err}");
            if is_bf16 {
                let wrong = be.upload(vec![0.0; n * 2 * c * h * w], &[n, 2 * c, h, w]).unwrap();
                assert!(be.conv2d(&wrong, &packed, None, 1, pad).unwrap_err().to_string().contains("bf16 weight"));
            }
        }
    }
}
