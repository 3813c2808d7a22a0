//! Scaled dot-product attention on sequences laid out `(B, L, H*D)`, the heads side by side as
//! the projections produce them (so no head split or merge is copied).
//!
//! The keys are taken in blocks with a running softmax (the "online softmax" of Milakov &
//! Gimelshein 2018, as flash attention computes it): for each block of query rows, each key block
//! gives scores `S = Q K^T`, the row maxima and sums are updated, and `O` is rescaled and
//! accumulated with `P V`. Memory is one score block per thread whatever the sequence length, so
//! attention over the 65,536 positions of a 1024x1024 super-resolution input fits as easily as
//! over 1,024. The query blocks of each image are the parallel tasks: as large as still gives
//! every thread two of them, since each key and value block is packed for the products once per
//! query block (on 2 threads, blocks of 256 rows run 1.1-1.5x as fast as blocks of 64).

use rayon::prelude::*;

use super::gemm::{gemm, Mat, MatMut, Par};
use super::math;
use crate::{Error, Result};

/// Query rows per task, the largest first ([`block_rows`]).
const BLOCK_Q: [usize; 3] = [256, 128, 64];
/// Keys per score block.
const BLOCK_K: usize = 1024;

/// `softmax(q k^T * scale) v` per head: `q (b, lq, heads*d)`, `k` and `v (b, lk, heads*d)`,
/// the result `(b, lq, heads*d)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(q: &[f32], k: &[f32], v: &[f32], b: usize, lq: usize, lk: usize, heads: usize, d: usize, scale: f32) -> Result<Vec<f32>> {
    let hd = heads * d;
    if q.len() != b * lq * hd || k.len() != b * lk * hd || v.len() != b * lk * hd || lk == 0 {
        return Err(Error::Backend(format!("attention: ({b}, {lq}|{lk}, {heads}x{d}) does not match the buffers")));
    }
    let mut out = vec![0f32; b * lq * hd];
    if out.is_empty() {
        return Ok(out);
    }
    let bq = block_rows(b, lq);
    out.par_chunks_mut(lq * hd).enumerate().try_for_each(|(bi, ob)| {
        let (qb, kb, vb) = (&q[bi * lq * hd..], &k[bi * lk * hd..(bi + 1) * lk * hd], &v[bi * lk * hd..(bi + 1) * lk * hd]);
        ob.par_chunks_mut(bq * hd).enumerate().try_for_each_init(
            || Scratch::new(bq.min(lq), BLOCK_K.min(lk), d),
            |scratch, (blk, o)| {
                let rows = o.len() / hd;
                let qrows = &qb[blk * bq * hd..(blk * bq + rows) * hd];
                for h in 0..heads {
                    block(scratch, qrows, kb, vb, o, rows, lk, hd, h * d, d, scale)?;
                }
                Ok::<(), Error>(())
            },
        )
    })?;
    Ok(out)
}

/// The query rows per task for `b` sequences of `lq` queries: the largest block that makes at
/// least two tasks per thread (the smallest where none does).
fn block_rows(b: usize, lq: usize) -> usize {
    let tasks = 2 * rayon::current_num_threads();
    BLOCK_Q.into_iter().find(|&bq| b * lq.div_ceil(bq) >= tasks).unwrap_or(BLOCK_Q[BLOCK_Q.len() - 1])
}

/// A task's buffers, reused across its blocks.
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl Scratch {
    fn new(rows: usize, keys: usize, d: usize) -> Self {
        Self {
            q: vec![0.0; rows * d],
            s: vec![0.0; rows * keys],
            o: vec![0.0; rows * d],
            max: vec![0.0; rows],
            sum: vec![0.0; rows],
        }
    }
}

/// One head of one block of `rows` query rows: columns `col .. col + d` of `q` and `out`.
#[allow(clippy::too_many_arguments)]
fn block(sc: &mut Scratch, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], rows: usize, lk: usize, hd: usize, col: usize, d: usize, scale: f32) -> Result<()> {
    // the scaled query rows of this head, contiguous
    for r in 0..rows {
        for (dst, &x) in sc.q[r * d..(r + 1) * d].iter_mut().zip(&q[r * hd + col..r * hd + col + d]) {
            *dst = x * scale;
        }
    }
    let qm = Mat::rows(&sc.q[..rows * d], rows, d);
    sc.max[..rows].fill(f32::NEG_INFINITY);
    sc.sum[..rows].fill(0.0);
    sc.o[..rows * d].fill(0.0);
    let mut k0 = 0;
    while k0 < lk {
        let n = BLOCK_K.min(lk - k0);
        // S = Q K^T for keys k0 .. k0 + n
        let kt = Mat { data: &k[k0 * hd + col..], rows: d, cols: n, rs: 1, cs: hd };
        gemm(MatMut::rows(&mut sc.s[..rows * n], rows, n), qm, kt, false, Par::Seq)?;
        for r in 0..rows {
            let srow = &mut sc.s[r * n..(r + 1) * n];
            let m_old = sc.max[r];
            let mut m_new = m_old;
            math::row_max(srow, m_old, &mut m_new);
            let mut block_sum = 0.0;
            math::exp_shifted(srow, m_new, &mut block_sum);
            if m_old > f32::NEG_INFINITY && m_old != m_new {
                let c = (m_old - m_new).exp();
                sc.sum[r] *= c;
                sc.o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= c);
            }
            sc.sum[r] += block_sum;
            sc.max[r] = m_new;
        }
        // O += P V
        let vm = Mat { data: &v[k0 * hd + col..], rows: n, cols: d, rs: hd, cs: 1 };
        gemm(MatMut::rows(&mut sc.o[..rows * d], rows, d), Mat::rows(&sc.s[..rows * n], rows, n), vm, true, Par::Seq)?;
        k0 += n;
    }
    for r in 0..rows {
        let inv = 1.0 / sc.sum[r];
        for (dst, &x) in out[r * hd + col..r * hd + col + d].iter_mut().zip(&sc.o[r * d..(r + 1) * d]) {
            *dst = x * inv;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], k: &[f32], v: &[f32], b: usize, lq: usize, lk: usize, h: usize, d: usize, scale: f32) -> Vec<f32> {
        let hd = h * d;
        let mut out = vec![0f32; b * lq * hd];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..lq {
                    let s: Vec<f64> = (0..lk)
                        .map(|j| (0..d).map(|t| q[(bi * lq + i) * hd + hi * d + t] as f64 * k[(bi * lk + j) * hd + hi * d + t] as f64).sum::<f64>() * scale as f64)
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for t in 0..d {
                        out[(bi * lq + i) * hd + hi * d + t] =
                            ((0..lk).map(|j| e[j] * v[(bi * lk + j) * hd + hi * d + t] as f64).sum::<f64>() / z) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn blocked_attention_matches_the_definition() {
        // key counts below, at and across the key block; query counts across the query blocks
        // of each size (the thread count picks the size)
        let cases = [(2, 5, 7, 3, 4), (1, 130, 77, 2, 8), (1, 70, 2500, 2, 5), (2, 64, 1024, 1, 3), (1, 600, 300, 2, 6)];
        for ((b, lq, lk, h, d), threads) in cases.into_iter().flat_map(|c| [(c, 1), (c, 2), (c, 8)]) {
            let n = |l: usize| b * l * h * d;
            let q: Vec<f32> = (0..n(lq)).map(|i| ((i * 7919) % 101) as f32 / 25.0 - 2.0).collect();
            let k: Vec<f32> = (0..n(lk)).map(|i| ((i * 104729) % 97) as f32 / 24.0 - 2.0).collect();
            let v: Vec<f32> = (0..n(lk)).map(|i| ((i * 15485863) % 89) as f32 / 44.0 - 1.0).collect();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let got = pool.install(|| attention(&q, &k, &v, b, lq, lk, h, d, 0.7)).unwrap();
            let want = naive(&q, &k, &v, b, lq, lk, h, d, 0.7);
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-5, "({b}, {lq}, {lk}, {h}, {d}), {threads} threads: {err}");
        }
    }
}
