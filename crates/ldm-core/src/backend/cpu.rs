//! The CPU backend on candle.

use candle_core::{DType, Device, Tensor, D};

use super::Backend;
use crate::{Error, Result};

/// candle on the CPU. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

fn contiguous_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Backend for Cpu {
    type Tensor = Tensor;

    fn name(&self) -> &'static str {
        "cpu"
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
        if a.dims() == b.dims() {
            return Ok((a + b)?);
        }
        Ok(a.broadcast_add(b)?)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if a.dims() == b.dims() {
            return Ok((a * b)?);
        }
        Ok(a.broadcast_mul(b)?)
    }

    fn affine(&self, t: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
        Ok(t.affine(mul as f64, add as f64)?)
    }

    fn clamp(&self, t: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
        Ok(t.clamp(lo, hi)?)
    }

    fn silu(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.silu()?)
    }

    fn gelu(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.gelu_erf()?)
    }

    fn softmax_last(&self, t: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax_last_dim(&t.contiguous()?)?)
    }

    fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.contiguous()?.matmul(&b.contiguous()?)?)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims();
        let inner = *dims.last().ok_or_else(|| Error::Backend("linear on a scalar".into()))?;
        let rows = x.elem_count() / inner.max(1);
        let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims.to_vec();
        *out.last_mut().unwrap_or(&mut 0) = w.dims()[0];
        Ok(y.reshape(out)?)
    }

    fn conv2d(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
        let y = x.contiguous()?.conv2d(w, padding, stride, 1, 1)?;
        match b {
            Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?),
            None => Ok(y),
        }
    }

    fn pad2d(&self, x: &Tensor, pad: [usize; 4]) -> Result<Tensor> {
        let r = x.rank();
        let x = x.pad_with_zeros(r - 2, pad[0], pad[1])?;
        Ok(x.pad_with_zeros(r - 1, pad[2], pad[3])?)
    }

    fn upsample_nearest(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        Ok(x.upsample_nearest2d(h, w)?)
    }

    fn group_norm(&self, x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
            return Err(Error::Backend(format!("group_norm: {groups} groups for shape {dims:?}")));
        }
        let (n, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let mut data = contiguous_f32(x)?;
        let g = contiguous_f32(gamma)?;
        let bt = contiguous_f32(beta)?;
        let cpg = c / groups;
        let group_len = cpg * spatial;
        for (gi, chunk) in data.chunks_mut(group_len).enumerate().take(n * groups) {
            let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / group_len as f64;
            let var = chunk.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / group_len as f64;
            let inv = 1.0 / (var + eps).sqrt();
            let c0 = (gi % groups) * cpg;
            for (ci, plane) in chunk.chunks_mut(spatial.max(1)).enumerate() {
                let (s, o) = (g[c0 + ci] as f64 * inv, bt[c0 + ci] as f64);
                for v in plane.iter_mut() {
                    *v = ((*v as f64 - mean) * s + o) as f32;
                }
            }
        }
        Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
    }

    fn layer_norm(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, gamma, beta, eps as f32)?)
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
        // |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 does not change the argmin, but diffusers
        // computes the full distance (torch.cdist), and ties are then broken identically.
        let z2 = z.sqr()?.sum_keepdim(D::Minus1)?;
        let e2 = codebook.sqr()?.sum_keepdim(D::Minus1)?.t()?;
        let ze = z.matmul(&codebook.t()?)?;
        let dist = z2.broadcast_add(&e2)?.broadcast_sub(&ze.affine(2.0, 0.0)?)?;
        let idx = dist.argmin(D::Minus1)?.to_dtype(DType::U32)?;
        Ok(codebook.index_select(&idx, 0)?)
    }
}
