//! Group and layer normalisation, in parallel over groups (rows), with the statistics summed in
//! float64 (two passes: the mean, then the variance about it, as `torch` computes them, without
//! its float32 rounding), and optionally SiLU fused into the same pass over the output.

use rayon::prelude::*;

use super::math;
use crate::{Error, Result};

/// `torch.nn.GroupNorm` over `x (n, c, spatial)`, then SiLU when `silu`.
pub fn group_norm(
    x: &[f32],
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
) -> Result<Vec<f32>> {
    check_groups(x.len(), n, c, spatial, groups, gamma.len(), beta.len())?;
    let cpg = c / groups;
    let len = cpg * spatial;
    let mut out = vec![0f32; x.len()];
    if len == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(len).zip(x.par_chunks(len)).enumerate().for_each(|(gi, (o, src))| {
        let (mean, var) = moments(src);
        let inv = 1.0 / (var + eps).sqrt();
        let c0 = (gi % groups) * cpg;
        for (ci, (op, sp)) in o.chunks_mut(spatial.max(1)).zip(src.chunks(spatial.max(1))).enumerate() {
            let (a, b) = channel_affine(mean, inv, gamma[c0 + ci], beta[c0 + ci]);
            for (y, &v) in op.iter_mut().zip(sp) {
                *y = v * a + b;
            }
            if silu {
                math::silu_inplace(op);
            }
        }
    });
    Ok(out)
}

/// The sizes a group norm over `(n, c, spatial)` needs: `groups` dividing `c`, and `c` values
/// of `gamma` and `beta`.
fn check_groups(len: usize, n: usize, c: usize, spatial: usize, groups: usize, gamma: usize, beta: usize) -> Result<()> {
    if groups == 0 || c % groups != 0 || len != n * c * spatial || gamma != c || beta != c {
        return Err(Error::Backend(format!("group_norm: {groups} groups over ({n}, {c}, {spatial})")));
    }
    Ok(())
}

/// A channel's norm as `y = x * a + b` in float32: `a = gamma / std`, `b = beta - mean * a`
/// (`inv` is `1 / std`).
fn channel_affine(mean: f64, inv: f64, gamma: f32, beta: f32) -> (f32, f32) {
    let a = gamma as f64 * inv;
    let b = beta as f64 - mean * a;
    (a as f32, b as f32)
}

/// The `(a, b)` of [`group_norm`]'s `x * a + b` for every (image, channel) of `x (n, c, spatial)`,
/// `n * c` of each: the norm for a caller that applies it as it reads `x` (a convolution's
/// `winograd::Prologue`), bit for bit what [`group_norm`] computes.
#[allow(clippy::too_many_arguments)]
pub fn group_affine(
    x: &[f32],
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_groups(x.len(), n, c, spatial, groups, gamma.len(), beta.len())?;
    let cpg = c / groups;
    let stats: Vec<(f64, f64)> = if spatial == 0 { vec![(0.0, 1.0); n * groups] } else { x.par_chunks(cpg * spatial).map(moments).collect() };
    Ok((0..n * c)
        .map(|k| {
            let (mean, var) = stats[k / cpg];
            channel_affine(mean, 1.0 / (var + eps).sqrt(), gamma[k % c], beta[k % c])
        })
        .unzip())
}

/// The mean and the (biased) variance about it of `x`, in float64. The sums run in [`LANES`]
/// interleaved accumulators (vector lanes) rather than one chain of dependent additions, which
/// changes only float64 rounding, far below float32's.
fn moments(x: &[f32]) -> (f64, f64) {
    fn sum(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
        let mut acc = [0f64; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        acc.iter().sum::<f64>() + tail
    }
    let n = x.len().max(1) as f64;
    let mean = sum(x, |v| v as f64) / n;
    (mean, sum(x, |v| (v as f64 - mean).powi(2)) / n)
}

/// Accumulators of [`moments`]: two AVX-512 registers of float64.
const LANES: usize = 16;

/// `torch.nn.LayerNorm` over rows of `d` values.
pub fn layer_norm(x: &[f32], d: usize, gamma: &[f32], beta: &[f32], eps: f64) -> Result<Vec<f32>> {
    if d == 0 || x.len() % d != 0 || gamma.len() != d || beta.len() != d {
        return Err(Error::Backend(format!("layer_norm: rows of {d} over {} values", x.len())));
    }
    let mut out = vec![0f32; x.len()];
    let per_task = ((1 << 14) / d).max(1) * d;
    out.par_chunks_mut(per_task).zip(x.par_chunks(per_task)).for_each(|(o, src)| {
        for (orow, row) in o.chunks_mut(d).zip(src.chunks(d)) {
            let (mean, var) = moments(row);
            let inv = 1.0 / (var + eps).sqrt();
            for ((y, &v), (&g, &b)) in orow.iter_mut().zip(row).zip(gamma.iter().zip(beta)) {
                *y = ((v as f64 - mean) * inv) as f32 * g + b;
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_normalises_each_group() {
        let (n, c, sp, g) = (2, 6, 5, 3);
        let x: Vec<f32> = (0..n * c * sp).map(|i| ((i * 37) % 23) as f32 * 0.5 - 3.0).collect();
        let gamma: Vec<f32> = (0..c).map(|i| 1.0 + i as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..c).map(|i| i as f32 * -0.2).collect();
        let y = group_norm(&x, n, c, sp, g, &gamma, &beta, 1e-5, false).unwrap();
        let ys = group_norm(&x, n, c, sp, g, &gamma, &beta, 1e-5, true).unwrap();
        for (k, chunk) in x.chunks(2 * sp).enumerate() {
            let m = chunk.iter().map(|&v| v as f64).sum::<f64>() / chunk.len() as f64;
            let v = chunk.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / chunk.len() as f64;
            for (j, &xv) in chunk.iter().enumerate() {
                let ch = (k % g) * 2 + j / sp;
                let want = (xv as f64 - m) / (v + 1e-5).sqrt() * gamma[ch] as f64 + beta[ch] as f64;
                let i = k * 2 * sp + j;
                assert!((y[i] as f64 - want).abs() < 1e-5, "{} vs {want}", y[i]);
                let silu = want / (1.0 + (-want).exp());
                assert!((ys[i] as f64 - silu).abs() < 1e-5);
            }
        }
        assert!(group_norm(&x, n, c, sp, 4, &gamma, &beta, 1e-5, false).is_err());
    }

    #[test]
    fn layer_norm_normalises_each_row() {
        let x: Vec<f32> = (0..12).map(|i| (i * i) as f32).collect();
        let y = layer_norm(&x, 4, &[1.0, 2.0, 1.0, 1.0], &[0.0, 0.0, 1.0, 0.0], 1e-5).unwrap();
        for (r, row) in x.chunks(4).enumerate() {
            let m = row.iter().sum::<f32>() as f64 / 4.0;
            let v = row.iter().map(|&a| (a as f64 - m).powi(2)).sum::<f64>() / 4.0;
            let want = (row[1] as f64 - m) / (v + 1e-5).sqrt() * 2.0;
            assert!((y[r * 4 + 1] as f64 - want).abs() < 1e-5);
        }
    }
}
