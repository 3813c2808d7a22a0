//! [`Backend`] for [`Gpu`]: each operation runs its kernel when its operands and result fit in one
//! buffer, and otherwise splits itself into pieces that do (see the module docs of `wgpu`).

use std::sync::Arc;

use super::kernels::{unary_op, Kernel, TILE, WG};
use super::{Chunk, Gpu, GpuTensor, Storage};
use crate::backend::Backend;
use crate::{Error, Result};

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Left-pads to the kernels' six dimensions (extent 1, stride 0).
fn six(v: &[usize], fill: usize) -> Result<[u32; 6]> {
    if v.len() > 6 {
        return Err(Error::Backend(format!("the GPU kernels handle at most 6 dimensions, got {}", v.len())));
    }
    let mut out = [fill as u32; 6];
    for (i, &x) in v.iter().enumerate() {
        out[6 - v.len() + i] = u32::try_from(x).map_err(|_| Error::Backend(format!("size {x} exceeds 32 bits")))?;
    }
    Ok(out)
}

/// "No source" in the tables of `plane_op`: the output is zero there.
const NONE: u32 = u32::MAX;

fn bits(x: f32) -> u32 {
    x.to_bits()
}

fn u(x: usize) -> u32 {
    x as u32
}

impl Gpu {
    fn fits(&self, n: usize) -> bool {
        n <= self.ctx.chunk
    }

    fn buf(t: &GpuTensor) -> &::wgpu::Buffer {
        &t.st.chunks[0].buf
    }

    fn single(t: &GpuTensor) -> bool {
        t.st.chunks.len() == 1
    }

    fn groups_for(&self, n: usize) -> [u32; 3] {
        self.grid(n.div_ceil(WG as usize))
    }

    /// The tensor as f32 (converting an f16 weight chunk by chunk).
    pub(crate) fn to_f32(&self, t: &GpuTensor) -> Result<GpuTensor> {
        if !t.st.f16 {
            return Ok(t.clone());
        }
        self.unary(t, unary_op::COPY, 0.0, 0.0)
    }

    /// An elementwise map, chunk by chunk (the result has the input's chunks).
    fn unary(&self, t: &GpuTensor, op: u32, a: f32, b: f32) -> Result<GpuTensor> {
        let mut chunks = Vec::with_capacity(t.st.chunks.len());
        for c in &t.st.chunks {
            let out = self.new_buffer(super::bytes_for(c.len, false));
            self.run(
                Kernel::Unary(t.st.f16),
                &[u(c.len), op, bits(a), bits(b)],
                &[&c.buf, &out],
                self.groups_for(c.len),
            )?;
            chunks.push(Chunk { buf: out, start: c.start, len: c.len });
        }
        Ok(GpuTensor { st: Arc::new(Storage { chunks, f16: false, len: t.st.len }), shape: t.shape.clone() })
    }

    /// The pieces of `out_shape[d]` when a result is split `parts` ways along `d`, computed by
    /// `f(start, len)` and joined.
    fn split_cat(
        &self,
        out_shape: &[usize],
        d: usize,
        parts: usize,
        f: impl Fn(usize, usize) -> Result<GpuTensor>,
    ) -> Result<GpuTensor> {
        let size = out_shape[d];
        let step = size.div_ceil(parts.clamp(2, size.max(2)));
        let mut pieces = Vec::new();
        let mut s = 0;
        while s < size {
            let len = step.min(size - s);
            pieces.push(f(s, len)?);
            s += len;
        }
        let refs: Vec<&GpuTensor> = pieces.iter().collect();
        self.cat_impl(&refs, d)
    }

    /// How many pieces bring `n` elements within one buffer.
    fn parts(&self, n: usize) -> usize {
        n.div_ceil(self.ctx.chunk).max(2)
    }

    /// The blocks of whole first-dimension rows of `t`, with the first row of each: the chunks
    /// themselves where they hold whole rows (no copy), else narrowed pieces.
    fn row_blocks(&self, t: &GpuTensor) -> Result<Vec<(usize, GpuTensor)>> {
        let row: usize = numel(&t.shape[1..]);
        if t.st.chunks.iter().all(|c| row > 0 && c.start.is_multiple_of(row) && c.len.is_multiple_of(row)) {
            return Ok(t
                .st
                .chunks
                .iter()
                .map(|c| {
                    let mut shape = t.shape.clone();
                    shape[0] = c.len / row;
                    let st = Storage {
                        chunks: vec![Chunk { buf: c.buf.clone(), start: 0, len: c.len }],
                        f16: t.st.f16,
                        len: c.len,
                    };
                    (c.start / row, GpuTensor { st: Arc::new(st), shape })
                })
                .collect());
        }
        if row > self.ctx.chunk {
            return Err(self.too_big("one row of a weight", row));
        }
        let per = (self.ctx.chunk / row.max(1)).max(1);
        let mut out = Vec::new();
        let mut s = 0;
        while s < t.shape[0] {
            let len = per.min(t.shape[0] - s);
            out.push((s, self.narrow_impl(t, 0, s, len)?));
            s += len;
        }
        Ok(out)
    }

    fn too_big(&self, what: &str, n: usize) -> Error {
        Error::Backend(format!(
            "{what} holds {n} values, more than one GPU buffer may hold ({} values: the adapter's \
             maxStorageBufferBindingSize/maxBufferSize or GpuOptions::max_binding_bytes), and it cannot be split further",
            self.ctx.chunk
        ))
    }

    fn narrow_impl(&self, t: &GpuTensor, dim: usize, start: usize, len: usize) -> Result<GpuTensor> {
        let dims = &t.shape;
        if dim >= dims.len() || start + len > dims[dim] {
            return Err(Error::Backend(format!(
                "narrow: {start}..{} of dimension {dim} of shape {dims:?}",
                start + len
            )));
        }
        let t = self.to_f32(t)?;
        let mut shape = dims.clone();
        shape[dim] = len;
        let out = self.alloc(&shape);
        let outer = numel(&dims[..dim]);
        let inner = numel(&dims[dim + 1..]);
        if len * inner == 0 {
            return Ok(out);
        }
        if outer <= 16 || !Self::single(&t) || !Self::single(&out) {
            for o in 0..outer {
                self.copy(&t.st, (o * dims[dim] + start) * inner, &out.st, o * len * inner, len * inner)?;
            }
        } else {
            let n = numel(&shape);
            let mut p = vec![u(n), u(start * inner), 0];
            p.extend(six(&shape, 1)?);
            p.extend(six(&strides(dims), 0)?);
            p.extend(six(&strides(&shape), 0)?);
            self.run(Kernel::StridedCopy, &p, &[Self::buf(&t), Self::buf(&out)], self.groups_for(n))?;
        }
        Ok(out)
    }

    fn cat_impl(&self, ts: &[&GpuTensor], dim: usize) -> Result<GpuTensor> {
        let first = ts.first().ok_or_else(|| Error::Backend("cat of no tensors".into()))?;
        let rank = first.shape.len();
        if dim >= rank {
            return Err(Error::Backend(format!("cat along dimension {dim} of shape {:?}", first.shape)));
        }
        let mut shape = first.shape.clone();
        shape[dim] = 0;
        for t in ts {
            let ok = t.shape.len() == rank && (0..rank).all(|i| i == dim || t.shape[i] == first.shape[i]);
            if !ok {
                return Err(Error::Backend(format!(
                    "cat along {dim}: shapes {:?} and {:?} differ",
                    first.shape, t.shape
                )));
            }
            shape[dim] += t.shape[dim];
        }
        if ts.len() == 1 {
            return Ok(ts[0].clone());
        }
        let out = self.alloc(&shape);
        let outer = numel(&shape[..dim]);
        let inner = numel(&shape[dim + 1..]);
        let mut off = 0;
        for t in ts {
            let t = self.to_f32(t)?;
            let seg = t.shape[dim] * inner;
            if seg > 0 {
                if outer <= 16 || !Self::single(&t) || !Self::single(&out) {
                    for o in 0..outer {
                        self.copy(&t.st, o * seg, &out.st, (o * shape[dim] + off) * inner, seg)?;
                    }
                } else {
                    let n = t.st.len;
                    let mut p = vec![u(n), 0, u(off * inner)];
                    p.extend(six(&t.shape, 1)?);
                    p.extend(six(&strides(&t.shape), 0)?);
                    p.extend(six(&strides(&shape), 0)?);
                    self.run(Kernel::StridedCopy, &p, &[Self::buf(&t), Self::buf(&out)], self.groups_for(n))?;
                }
            }
            off += t.shape[dim];
        }
        Ok(out)
    }

    fn binary(&self, a: &GpuTensor, b: &GpuTensor, op: u32) -> Result<GpuTensor> {
        let (a, b) = (self.to_f32(a)?, self.to_f32(b)?);
        let r = a.shape.len().max(b.shape.len());
        let pad = |s: &[usize]| -> Vec<usize> {
            let mut v = vec![1; r - s.len()];
            v.extend_from_slice(s);
            v
        };
        let (pa, pb) = (pad(&a.shape), pad(&b.shape));
        let mut shape = Vec::with_capacity(r);
        for i in 0..r {
            let (x, y) = (pa[i], pb[i]);
            if x != y && x != 1 && y != 1 {
                return Err(Error::Backend(format!("cannot broadcast shapes {:?} and {:?}", a.shape, b.shape)));
            }
            shape.push(if x == 1 { y } else { x });
        }
        let n = numel(&shape);
        let same_chunks = a.shape == b.shape
            && a.st.chunks.len() == b.st.chunks.len()
            && a.st.chunks.iter().zip(&b.st.chunks).all(|(x, y)| x.start == y.start && x.len == y.len);
        if same_chunks {
            let mut chunks = Vec::new();
            for (x, y) in a.st.chunks.iter().zip(&b.st.chunks) {
                let out = self.new_buffer(super::bytes_for(x.len, false));
                let mut p = vec![u(x.len), op, 1];
                p.extend([0u32; 18]);
                self.run(Kernel::Binary, &p, &[&x.buf, &y.buf, &out], self.groups_for(x.len))?;
                chunks.push(Chunk { buf: out, start: x.start, len: x.len });
            }
            return Ok(GpuTensor { st: Arc::new(Storage { chunks, f16: false, len: n }), shape });
        }
        if Self::single(&a) && Self::single(&b) && self.fits(n) {
            let bstr = |ps: &[usize]| -> Vec<usize> {
                let st = strides(ps);
                ps.iter().zip(st).map(|(&d, s)| if d == 1 { 0 } else { s }).collect()
            };
            let out = self.alloc(&shape);
            let mut p = vec![u(n), op, 0];
            p.extend(six(&shape, 1)?);
            p.extend(six(&bstr(&pa), 0)?);
            p.extend(six(&bstr(&pb), 0)?);
            self.run(Kernel::Binary, &p, &[Self::buf(&a), Self::buf(&b), Self::buf(&out)], self.groups_for(n))?;
            return Ok(out);
        }
        let d = shape.iter().position(|&x| x > 1).unwrap_or(0);
        let biggest = n.max(a.st.len).max(b.st.len);
        let piece = |t: &GpuTensor, s: usize, l: usize| -> Result<GpuTensor> {
            let off = r - t.shape.len();
            if d < off || t.shape[d - off] == 1 {
                Ok(t.clone())
            } else {
                self.narrow_impl(t, d - off, s, l)
            }
        };
        self.split_cat(&shape, d, self.parts(biggest), |s, l| self.binary(&piece(&a, s, l)?, &piece(&b, s, l)?, op))
    }

    fn permute_impl(&self, t: &GpuTensor, perm: &[usize]) -> Result<GpuTensor> {
        let r = t.shape.len();
        let mut seen = vec![false; r];
        if perm.len() != r || perm.iter().any(|&p| p >= r || std::mem::replace(&mut seen[p], true)) {
            return Err(Error::Backend(format!("permute {perm:?} of shape {:?}", t.shape)));
        }
        let t = self.to_f32(t)?;
        let shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
        let n = numel(&shape);
        if Self::single(&t) && self.fits(n) {
            let st = strides(&t.shape);
            let src: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            let out = self.alloc(&shape);
            let mut p = vec![u(n), 0, 0];
            p.extend(six(&shape, 1)?);
            p.extend(six(&src, 0)?);
            p.extend(six(&strides(&shape), 0)?);
            self.run(Kernel::StridedCopy, &p, &[Self::buf(&t), Self::buf(&out)], self.groups_for(n))?;
            return Ok(out);
        }
        let d = shape.iter().position(|&x| x > 1).unwrap_or(0);
        self.split_cat(&shape, d, self.parts(n), |s, l| self.permute_impl(&self.narrow_impl(&t, perm[d], s, l)?, perm))
    }

    /// `C[b] = alpha * A[b] B[b] (+ bias)`, A `(m, k)` and B `(k, n)` read through strides.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        a: &GpuTensor,
        a_str: [usize; 3],
        b: &GpuTensor,
        b_str: [usize; 3],
        (batch, m, n, k): (usize, usize, usize, usize),
        bias: Option<&GpuTensor>,
        alpha: f32,
        out_shape: &[usize],
    ) -> Result<GpuTensor> {
        let out = self.alloc(out_shape);
        let bias_buf = match bias {
            Some(t) => Self::buf(t),
            None => &self.ctx.dummy,
        };
        let p = [
            u(m),
            u(n),
            u(k),
            u(a_str[0]),
            u(a_str[1]),
            u(a_str[2]),
            u(b_str[0]),
            u(b_str[1]),
            u(b_str[2]),
            if bias.is_some() { 1 } else { 0 },
            bits(alpha),
        ];
        let t = TILE as usize;
        let tiled = m >= t;
        self.run(
            Kernel::Matmul(b.st.f16, tiled),
            &p,
            &[Self::buf(a), Self::buf(b), bias_buf, Self::buf(&out)],
            if tiled {
                [u(n.div_ceil(t)), u(m.div_ceil(t)), u(batch)]
            } else {
                [u(n.div_ceil(t)), u(m.div_ceil(4)), u(batch)]
            },
        )?;
        Ok(out)
    }

    fn matmul_impl(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        let (ra, rb) = (a.shape.len(), b.shape.len());
        if ra < 2 || ra != rb || a.shape[..ra - 2] != b.shape[..rb - 2] || a.shape[ra - 1] != b.shape[rb - 2] {
            return Err(Error::Backend(format!("matmul of shapes {:?} and {:?}", a.shape, b.shape)));
        }
        let a = self.to_f32(a)?;
        let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
        let batch = numel(&a.shape[..ra - 2]);
        let mut shape = a.shape[..ra - 2].to_vec();
        shape.extend([m, n]);
        if Self::single(&a) && Self::single(b) && self.fits(batch * m * n) {
            return self.gemm(&a, [m * k, k, 1], b, [k * n, n, 1], (batch, m, n, k), None, 1.0, &shape);
        }
        let big = numel(&shape).max(a.st.len).max(b.st.len);
        if let Some(d) = shape[..ra - 2].iter().position(|&x| x > 1) {
            return self.split_cat(&shape, d, self.parts(big), |s, l| {
                self.matmul_impl(&self.narrow_impl(&a, d, s, l)?, &self.narrow_impl(b, d, s, l)?)
            });
        }
        if (!Self::single(&a) || !self.fits(numel(&shape))) && m > 1 {
            return self.split_cat(&shape, ra - 2, self.parts(big), |s, l| {
                self.matmul_impl(&self.narrow_impl(&a, ra - 2, s, l)?, b)
            });
        }
        if n > 1 {
            return self.split_cat(&shape, ra - 1, self.parts(big), |s, l| {
                self.matmul_impl(&a, &self.narrow_impl(b, rb - 1, s, l)?)
            });
        }
        Err(self.too_big("a matmul operand", big))
    }

    fn linear_impl(&self, x: &GpuTensor, w: &GpuTensor, b: Option<&GpuTensor>) -> Result<GpuTensor> {
        let inner = *x.shape.last().ok_or_else(|| Error::Backend("linear on a scalar".into()))?;
        if w.shape.len() != 2 || w.shape[1] != inner || b.is_some_and(|b| b.shape != [w.shape[0]]) {
            return Err(Error::Backend(format!(
                "linear: input {:?}, weight {:?}, bias {:?}",
                x.shape,
                w.shape,
                b.map(|b| &b.shape)
            )));
        }
        let out_dim = w.shape[0];
        let rows = x.st.len / inner.max(1);
        let mut out_shape = x.shape.clone();
        *out_shape.last_mut().unwrap_or(&mut 0) = out_dim;
        let x = self.to_f32(x)?;
        let b = match b {
            Some(b) => Some(self.to_f32(b)?),
            None => None,
        };
        if !Self::single(w) {
            let blocks = self.row_blocks(w)?;
            let mut outs = Vec::new();
            for (r0, wb) in &blocks {
                let bb = match &b {
                    Some(b) => Some(self.narrow_impl(b, 0, *r0, wb.shape[0])?),
                    None => None,
                };
                outs.push(self.linear_impl(&x, wb, bb.as_ref())?);
            }
            let refs: Vec<&GpuTensor> = outs.iter().collect();
            return self.cat_impl(&refs, out_shape.len() - 1);
        }
        if !Self::single(&x) || !self.fits(rows * out_dim) {
            if rows <= 1 {
                return Err(self.too_big("one row of a linear layer", inner.max(out_dim)));
            }
            let x2 = self.reshape(&x, &[rows, inner])?;
            let y = self.split_cat(&[rows, out_dim], 0, self.parts(x.st.len.max(rows * out_dim)), |s, l| {
                self.linear_impl(&self.narrow_impl(&x2, 0, s, l)?, w, b.as_ref())
            })?;
            return self.reshape(&y, &out_shape);
        }
        // B = W^T: element (p, j) is W[j, p].
        self.gemm(&x, [0, inner, 1], w, [0, 1, inner], (1, rows, out_dim, inner), b.as_ref(), 1.0, &out_shape)
    }

    /// Convolution with separate top/left padding and an explicit output size, so that a band of
    /// output rows can be computed from the band of input rows it needs.
    #[allow(clippy::too_many_arguments)]
    fn conv_impl(
        &self,
        x: &GpuTensor,
        w: &GpuTensor,
        b: Option<&GpuTensor>,
        stride: usize,
        pad_top: usize,
        pad_left: usize,
        ho: usize,
        wo: usize,
    ) -> Result<GpuTensor> {
        let (n, c, h, wi) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let (o, kh, kw) = (w.shape[0], w.shape[2], w.shape[3]);
        let shape = [n, o, ho, wo];
        if !Self::single(w) {
            let mut outs = Vec::new();
            for (r0, wb) in &self.row_blocks(w)? {
                let bb = match b {
                    Some(b) => Some(self.narrow_impl(b, 0, *r0, wb.shape[0])?),
                    None => None,
                };
                outs.push(self.conv_impl(x, wb, bb.as_ref(), stride, pad_top, pad_left, ho, wo)?);
            }
            let refs: Vec<&GpuTensor> = outs.iter().collect();
            return self.cat_impl(&refs, 1);
        }
        let total = numel(&shape);
        if !Self::single(x) || !self.fits(total) {
            let big = total.max(x.st.len);
            if n > 1 {
                return self.split_cat(&shape, 0, self.parts(big), |s, l| {
                    self.conv_impl(&self.narrow_impl(x, 0, s, l)?, w, b, stride, pad_top, pad_left, ho, wo)
                });
            }
            // Bands of output rows, each from the band of input rows it needs.
            let band_fits = self.fits(c * kh.min(h) * wi);
            if ho > 1 && (band_fits || !self.fits(total)) {
                return self.split_cat(&shape, 2, self.parts(big), |o0, l| {
                    // Input rows o0*s - pad_top .. (o0+l-1)*s - pad_top + kh, clipped to the image.
                    let lo = (o0 * stride) as isize - pad_top as isize;
                    let hi = ((o0 + l - 1) * stride + kh) as isize - pad_top as isize;
                    let i0 = lo.clamp(0, h as isize) as usize;
                    let i1 = hi.clamp(0, h as isize) as usize;
                    let band = self.narrow_impl(x, 2, i0, i1.saturating_sub(i0))?;
                    let pt = (pad_top + i0) - o0 * stride;
                    self.conv_impl(&band, w, b, stride, pt, pad_left, l, wo)
                });
            }
            // One output row still too large: blocks of output channels.
            if !self.fits(total) && o > 1 {
                return self.split_cat(&shape, 1, self.parts(total), |s, l| {
                    let bb = match b {
                        Some(b) => Some(self.narrow_impl(b, 0, s, l)?),
                        None => None,
                    };
                    self.conv_impl(x, &self.narrow_impl(w, 0, s, l)?, bb.as_ref(), stride, pad_top, pad_left, ho, wo)
                });
            }
            // The input rows of one output row too large: blocks of input channels, summed (a
            // convolution is a sum over input channels), then the bias.
            if c > 1 {
                let parts = self.parts(x.st.len).min(c);
                let step = c.div_ceil(parts);
                let mut acc: Option<GpuTensor> = None;
                let mut c0 = 0;
                while c0 < c {
                    let cl = step.min(c - c0);
                    let y = self.conv_impl(
                        &self.narrow_impl(x, 1, c0, cl)?,
                        &self.narrow_impl(w, 1, c0, cl)?,
                        None,
                        stride,
                        pad_top,
                        pad_left,
                        ho,
                        wo,
                    )?;
                    acc = Some(match acc {
                        Some(a) => self.binary(&a, &y, 0)?,
                        None => y,
                    });
                    c0 += cl;
                }
                let acc = acc.ok_or_else(|| Error::Backend("conv2d with no input channels".into()))?;
                return match b {
                    Some(b) => self.binary(&acc, &self.reshape(b, &[1, o, 1, 1])?, 0),
                    None => Ok(acc),
                };
            }
            return Err(self.too_big("one output row of a convolution (or its input rows)", big));
        }
        let x = self.to_f32(x)?;
        let bias_buf = match b {
            Some(t) => Self::buf(t),
            None => &self.ctx.dummy,
        };
        if c >= 1 << 16 || kh >= 256 || kw >= 256 {
            return Err(Error::Backend(format!(
                "conv2d: {c} channels or a {kh}x{kw} kernel exceed the GPU kernel's table"
            )));
        }
        let ktab: Vec<u32> = (0..c as u32)
            .flat_map(|ci| (0..kh as u32).flat_map(move |ky| (0..kw as u32).map(move |kx| (ci << 16) | (ky << 8) | kx)))
            .collect();
        let ktab = self.buffer_with(bytemuck::cast_slice(&ktab));
        let out = self.alloc(&shape);
        let p = [
            u(o),
            u(ho * wo),
            u(c * kh * kw),
            u(c),
            u(h),
            u(wi),
            u(kh),
            u(kw),
            u(stride),
            u(pad_top),
            u(pad_left),
            u(wo),
            if b.is_some() { 2 } else { 0 },
            bits(1.0),
        ];
        let t = TILE as usize;
        let tiled = o >= t;
        self.run(
            Kernel::Conv2d(w.st.f16, tiled),
            &p,
            &[Self::buf(w), Self::buf(&x), bias_buf, Self::buf(&out), &ktab],
            if tiled {
                [u((ho * wo).div_ceil(t)), u(o.div_ceil(t)), u(n)]
            } else {
                [u((ho * wo).div_ceil(t)), u(o.div_ceil(4)), u(n)]
            },
        )?;
        Ok(out)
    }

    /// Padding or nearest upsampling of the last two dimensions, as a gather through tables of
    /// source rows and columns (`NONE`: zero), split over planes, then bands of rows, when needed.
    fn plane_op(&self, x: &GpuTensor, rows: &[u32], cols: &[u32]) -> Result<GpuTensor> {
        let r = x.shape.len();
        let x = self.to_f32(x)?;
        let (h, w) = (x.shape[r - 2], x.shape[r - 1]);
        let (ho, wo) = (rows.len(), cols.len());
        let planes = numel(&x.shape[..r - 2]);
        let mut shape = x.shape.clone();
        shape[r - 2] = ho;
        shape[r - 1] = wo;
        let n = numel(&shape);
        if Self::single(&x) && self.fits(n) {
            let out = self.alloc(&shape);
            let mut idx = rows.to_vec();
            idx.extend_from_slice(cols);
            let ib = self.buffer_with(bytemuck::cast_slice(&idx));
            let p = [u(n), u(h), u(w), u(ho), u(wo)];
            self.run(Kernel::PadUpsample, &p, &[Self::buf(&x), &ib, Self::buf(&out)], self.groups_for(n))?;
            return Ok(out);
        }
        let big = n.max(x.st.len);
        if planes > 1 {
            let x3 = self.reshape(&x, &[planes, h, w])?;
            let y = self.split_cat(&[planes, ho, wo], 0, self.parts(big), |s, l| {
                self.plane_op(&self.narrow_impl(&x3, 0, s, l)?, rows, cols)
            })?;
            return self.reshape(&y, &shape);
        }
        if ho > 1 {
            return self.split_cat(&shape, r - 2, self.parts(big), |s, l| {
                let part = &rows[s..s + l];
                let used = part.iter().copied().filter(|&v| v != NONE);
                let (lo, hi) = match (used.clone().min(), used.max()) {
                    (Some(lo), Some(hi)) => (lo as usize, hi as usize + 1),
                    _ => (0, 0),
                };
                let band = self.narrow_impl(&x, r - 2, lo, hi - lo)?;
                let rebased: Vec<u32> = part.iter().map(|&v| if v == NONE { NONE } else { v - lo as u32 }).collect();
                self.plane_op(&band, &rebased, cols)
            });
        }
        Err(self.too_big("one row of a pad/upsample", big))
    }

    /// A row kernel (softmax, layer norm) over the last dimension, split over rows when needed.
    fn rows_op(&self, x: &GpuTensor, k: Kernel, extra: &[&GpuTensor], eps: f32) -> Result<GpuTensor> {
        let d = *x.shape.last().ok_or_else(|| Error::Backend(format!("{k:?} on a scalar")))?;
        let x = self.to_f32(x)?;
        let rows = x.st.len / d.max(1);
        if Self::single(&x) {
            let out = self.alloc(&x.shape);
            let mut bufs = vec![Self::buf(&x)];
            bufs.extend(extra.iter().map(|t| Self::buf(t)));
            bufs.push(Self::buf(&out));
            self.run(k, &[u(rows), u(d), bits(eps)], &bufs, self.grid(rows))?;
            return Ok(out);
        }
        if rows <= 1 {
            return Err(self.too_big("one row of a softmax/layer norm", d));
        }
        let x2 = self.reshape(&x, &[rows, d])?;
        let y = self.split_cat(&[rows, d], 0, self.parts(x.st.len), |s, l| {
            self.rows_op(&self.narrow_impl(&x2, 0, s, l)?, k, extra, eps)
        })?;
        self.reshape(&y, &x.shape)
    }

    fn group_norm_impl(
        &self,
        x: &GpuTensor,
        groups: usize,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        eps: f64,
    ) -> Result<GpuTensor> {
        let dims = x.shape.clone();
        let (n, c) = (dims[0], dims[1]);
        let spatial = numel(&dims[2..]);
        let cpg = c / groups;
        let x = self.to_f32(x)?;
        if Self::single(&x) {
            let (g, bt) = (self.to_f32(gamma)?, self.to_f32(beta)?);
            let rows = n * groups;
            let stats = self.alloc(&[rows, 2]);
            self.run(
                Kernel::GroupNormStats,
                &[u(rows), u(cpg * spatial), bits(eps as f32)],
                &[Self::buf(&x), Self::buf(&stats)],
                self.grid(rows),
            )?;
            let out = self.alloc(&dims);
            let total = x.st.len;
            self.run(
                Kernel::GroupNormApply,
                &[u(total), u(c), u(spatial), u(cpg)],
                &[Self::buf(&x), Self::buf(&stats), Self::buf(&g), Self::buf(&bt), Self::buf(&out)],
                self.groups_for(total),
            )?;
            return Ok(out);
        }
        if n > 1 {
            return self.split_cat(&dims, 0, self.parts(x.st.len), |s, l| {
                self.group_norm_impl(&self.narrow_impl(&x, 0, s, l)?, groups, gamma, beta, eps)
            });
        }
        if groups > 1 {
            let per = (self.ctx.chunk / (cpg * spatial).max(1)).clamp(1, groups.div_ceil(2));
            let mut outs = Vec::new();
            let mut g0 = 0;
            while g0 < groups {
                let gl = per.min(groups - g0);
                let (c0, cl) = (g0 * cpg, gl * cpg);
                outs.push(self.group_norm_impl(
                    &self.narrow_impl(&x, 1, c0, cl)?,
                    gl,
                    &self.narrow_impl(gamma, 0, c0, cl)?,
                    &self.narrow_impl(beta, 0, c0, cl)?,
                    eps,
                )?);
                g0 += gl;
            }
            let refs: Vec<&GpuTensor> = outs.iter().collect();
            return self.cat_impl(&refs, 1);
        }
        Err(self.too_big("one group of a group norm", cpg * spatial))
    }

    fn embedding_impl(&self, ids: &[u32], table: &GpuTensor) -> Result<GpuTensor> {
        let d = table.shape[1];
        let per = (self.ctx.chunk / d.max(1)).max(1);
        if ids.len() > per {
            let mut outs = Vec::new();
            for part in ids.chunks(per) {
                outs.push(self.embedding_impl(part, table)?);
            }
            let refs: Vec<&GpuTensor> = outs.iter().collect();
            return self.cat_impl(&refs, 0);
        }
        let out = self.alloc(&[ids.len(), d]);
        let n = ids.len() * d;
        let ids_buf = self.buffer_with(bytemuck::cast_slice(ids));
        for (r0, block) in self.row_blocks(table)? {
            self.run(
                Kernel::Embedding(block.st.f16),
                &[u(n), u(d), u(r0), u(block.shape[0])],
                &[&ids_buf, Self::buf(&block), Self::buf(&out)],
                self.groups_for(n),
            )?;
        }
        Ok(out)
    }

    fn vq_impl(&self, z: &GpuTensor, codebook: &GpuTensor) -> Result<GpuTensor> {
        let (n, d) = (z.shape[0], z.shape[1]);
        let k = codebook.shape[0];
        let cb = self.to_f32(codebook)?;
        if !Self::single(&cb) {
            return Err(self.too_big("a VQ codebook", cb.st.len));
        }
        let z = self.to_f32(z)?;
        if !Self::single(&z) {
            return self.split_cat(&[n, d], 0, self.parts(z.st.len), |s, l| {
                self.vq_impl(&self.narrow_impl(&z, 0, s, l)?, &cb)
            });
        }
        let out = self.alloc(&[n, d]);
        self.run(
            Kernel::VqNearest,
            &[u(n), u(k), u(d)],
            &[Self::buf(&z), Self::buf(&cb), Self::buf(&out)],
            self.groups_for(n),
        )?;
        Ok(out)
    }
}

impl Backend for Gpu {
    type Tensor = GpuTensor;

    fn name(&self) -> &'static str {
        "webgpu"
    }

    fn dims(&self, t: &GpuTensor) -> Vec<usize> {
        t.shape.clone()
    }

    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<GpuTensor> {
        self.upload_as(&data, shape, false)
    }

    fn upload_weight(&self, data: Vec<f32>, shape: &[usize]) -> Result<GpuTensor> {
        self.upload_as(&data, shape, self.ctx.f16_weights && shape.len() >= 2)
    }

    /// Natively this waits for the GPU; in the browser it fails: use `download_async` there.
    fn download(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        crate::executor::block_on(self.read_async(t))
    }

    fn download_async(&self, t: &GpuTensor) -> impl std::future::Future<Output = Result<Vec<f32>>> {
        self.read_async(t)
    }

    fn reshape(&self, t: &GpuTensor, shape: &[usize]) -> Result<GpuTensor> {
        if numel(shape) != t.st.len {
            return Err(Error::Backend(format!("reshape of {:?} to {shape:?}", t.shape)));
        }
        Ok(GpuTensor { st: t.st.clone(), shape: shape.to_vec() })
    }

    fn permute(&self, t: &GpuTensor, perm: &[usize]) -> Result<GpuTensor> {
        self.permute_impl(t, perm)
    }

    fn narrow(&self, t: &GpuTensor, dim: usize, start: usize, len: usize) -> Result<GpuTensor> {
        self.narrow_impl(t, dim, start, len)
    }

    fn cat(&self, ts: &[&GpuTensor], dim: usize) -> Result<GpuTensor> {
        self.cat_impl(ts, dim)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.binary(a, b, 0)
    }

    fn mul(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.binary(a, b, 1)
    }

    fn affine(&self, t: &GpuTensor, mul: f32, add: f32) -> Result<GpuTensor> {
        self.unary(t, unary_op::AFFINE, mul, add)
    }

    fn clamp(&self, t: &GpuTensor, lo: f32, hi: f32) -> Result<GpuTensor> {
        self.unary(t, unary_op::CLAMP, lo, hi)
    }

    fn silu(&self, t: &GpuTensor) -> Result<GpuTensor> {
        self.unary(t, unary_op::SILU, 0.0, 0.0)
    }

    fn gelu(&self, t: &GpuTensor) -> Result<GpuTensor> {
        self.unary(t, unary_op::GELU, 0.0, 0.0)
    }

    fn softmax_last(&self, t: &GpuTensor) -> Result<GpuTensor> {
        self.rows_op(t, Kernel::Softmax, &[], 0.0)
    }

    fn matmul(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.matmul_impl(a, b)
    }

    fn linear(&self, x: &GpuTensor, w: &GpuTensor, b: Option<&GpuTensor>) -> Result<GpuTensor> {
        self.linear_impl(x, w, b)
    }

    fn conv2d(
        &self,
        x: &GpuTensor,
        w: &GpuTensor,
        b: Option<&GpuTensor>,
        stride: usize,
        padding: usize,
    ) -> Result<GpuTensor> {
        if x.shape.len() != 4 || w.shape.len() != 4 || w.shape[1] != x.shape[1] || stride == 0 {
            return Err(Error::Backend(format!(
                "conv2d of input {:?} with weight {:?}, stride {stride}",
                x.shape, w.shape
            )));
        }
        if b.is_some_and(|b| b.shape != [w.shape[0]]) {
            return Err(Error::Backend(format!("conv2d: bias {:?} for weight {:?}", b.map(|b| &b.shape), w.shape)));
        }
        let (h, wi, kh, kw) = (x.shape[2], x.shape[3], w.shape[2], w.shape[3]);
        if h + 2 * padding < kh || wi + 2 * padding < kw {
            return Err(Error::Backend(format!("conv2d: kernel {kh}x{kw} larger than the padded input {:?}", x.shape)));
        }
        let ho = (h + 2 * padding - kh) / stride + 1;
        let wo = (wi + 2 * padding - kw) / stride + 1;
        let b = match b {
            Some(b) => Some(self.to_f32(b)?),
            None => None,
        };
        self.conv_impl(x, w, b.as_ref(), stride, padding, padding, ho, wo)
    }

    fn pad2d(&self, x: &GpuTensor, pad: [usize; 4]) -> Result<GpuTensor> {
        let r = x.shape.len();
        if r < 2 {
            return Err(Error::Backend(format!("pad2d of shape {:?}", x.shape)));
        }
        let table = |n: usize, before: usize, after: usize| -> Vec<u32> {
            (0..before).map(|_| NONE).chain((0..n).map(|i| i as u32)).chain((0..after).map(|_| NONE)).collect()
        };
        self.plane_op(x, &table(x.shape[r - 2], pad[0], pad[1]), &table(x.shape[r - 1], pad[2], pad[3]))
    }

    fn upsample_nearest(&self, x: &GpuTensor, h: usize, w: usize) -> Result<GpuTensor> {
        let r = x.shape.len();
        if r < 2 || x.shape[r - 2] == 0 || x.shape[r - 1] == 0 {
            return Err(Error::Backend(format!("upsample of shape {:?}", x.shape)));
        }
        let (hi, wi) = (x.shape[r - 2], x.shape[r - 1]);
        // Source indices as candle computes them (f64 scale, truncated, clamped), so both
        // backends agree exactly, also for ratios that are not integers.
        let (sh, sw) = (hi as f64 / h as f64, wi as f64 / w as f64);
        let rows: Vec<u32> = (0..h).map(|i| ((i as f64 * sh) as usize).min(hi - 1) as u32).collect();
        let cols: Vec<u32> = (0..w).map(|j| ((j as f64 * sw) as usize).min(wi - 1) as u32).collect();
        self.plane_op(x, &rows, &cols)
    }

    fn group_norm(
        &self,
        x: &GpuTensor,
        groups: usize,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        eps: f64,
    ) -> Result<GpuTensor> {
        let dims = &x.shape;
        if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) || gamma.shape != [dims[1]] || beta.shape != [dims[1]]
        {
            return Err(Error::Backend(format!("group_norm: {groups} groups for shape {dims:?}")));
        }
        self.group_norm_impl(x, groups, gamma, beta, eps)
    }

    fn layer_norm(&self, x: &GpuTensor, gamma: &GpuTensor, beta: &GpuTensor, eps: f64) -> Result<GpuTensor> {
        let d = x.shape.last().copied().unwrap_or(0);
        if gamma.shape != [d] || beta.shape != [d] {
            return Err(Error::Backend(format!("layer_norm of {:?} with weight {:?}", x.shape, gamma.shape)));
        }
        let (g, b) = (self.to_f32(gamma)?, self.to_f32(beta)?);
        if !Self::single(&g) {
            return Err(self.too_big("a layer norm weight", d));
        }
        self.rows_op(x, Kernel::LayerNorm, &[&g, &b], eps as f32)
    }

    fn embedding(&self, ids: &[u32], table: &GpuTensor) -> Result<GpuTensor> {
        if table.shape.len() != 2 {
            return Err(Error::Backend(format!("embedding table of shape {:?}", table.shape)));
        }
        let rows = table.shape[0];
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= rows) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the embedding table of {rows} rows"
            )));
        }
        self.embedding_impl(ids, table)
    }

    fn vq_nearest(&self, z: &GpuTensor, codebook: &GpuTensor) -> Result<GpuTensor> {
        if z.shape.len() != 2 || codebook.shape.len() != 2 || z.shape[1] != codebook.shape[1] || codebook.shape[0] == 0
        {
            return Err(Error::Backend(format!("vq_nearest of {:?} with codebook {:?}", z.shape, codebook.shape)));
        }
        self.vq_impl(z, codebook)
    }

    fn attention(&self, q: &GpuTensor, k: &GpuTensor, v: &GpuTensor, scale: f32) -> Result<GpuTensor> {
        let ok = q.shape.len() == 4
            && k.shape.len() == 4
            && v.shape.len() == 4
            && q.shape[..2] == k.shape[..2]
            && k.shape[..3] == v.shape[..3]
            && q.shape[3] == k.shape[3];
        if !ok {
            return Err(Error::Backend(format!("attention of q {:?}, k {:?}, v {:?}", q.shape, k.shape, v.shape)));
        }
        let (b, h, l, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
        let s = k.shape[2];
        let (q, k) = (self.to_f32(q)?, self.to_f32(k)?);
        if Self::single(&q) && Self::single(&k) && self.fits(b * h * l * s) {
            // q k^T without transposing k: B element (p, j) is k[j, p].
            let scores =
                self.gemm(&q, [l * d, d, 1], &k, [s * d, 1, d], (b * h, l, s, d), None, scale, &[b, h, l, s])?;
            let probs = self.softmax_last(&scores)?;
            return self.matmul_impl(&probs, v);
        }
        let kt = self.permute_impl(&k, &[0, 1, 3, 2])?;
        let scores = self.affine(&self.matmul_impl(&q, &kt)?, scale, 0.0)?;
        self.matmul_impl(&self.softmax_last(&scores)?, v)
    }
}
