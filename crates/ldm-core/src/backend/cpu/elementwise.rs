//! Element-wise arithmetic and the nearest-neighbour resize over plain buffers, in parallel:
//! the residual additions and upsamplings of the decoders touch tens of megabytes each, which one
//! thread would walk alone.

use rayon::prelude::*;

/// Buffers shorter than this are done on the calling thread.
const PAR_MIN: usize = 1 << 16;
const CHUNK: usize = 1 << 15;

/// `a op b` element by element (equal lengths).
pub fn zip(a: &[f32], b: &[f32], op: fn(f32, f32) -> f32) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    let body = |(o, (x, y)): (&mut [f32], (&[f32], &[f32]))| {
        for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
            *o = op(x, y);
        }
    };
    if a.len() < PAR_MIN {
        body((&mut out, (a, b)));
    } else {
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(body);
    }
    out
}

/// `a op b[i]` for each run `i` of `run` elements of `a` (`b` broadcast over the trailing
/// dimensions, as a `(B, C, 1, 1)` bias over `(B, C, H, W)`).
pub fn zip_runs(a: &[f32], b: &[f32], run: usize, op: fn(f32, f32) -> f32) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    let body = |(i, (o, x)): (usize, (&mut [f32], &[f32]))| {
        let y = b[i];
        for (o, &x) in o.iter_mut().zip(x) {
            *o = op(x, y);
        }
    };
    if a.len() < PAR_MIN {
        out.chunks_mut(run).zip(a.chunks(run)).enumerate().for_each(body);
    } else {
        out.par_chunks_mut(run).zip(a.par_chunks(run)).enumerate().for_each(body);
    }
    out
}

/// `x * mul + add`.
pub fn affine(x: &[f32], mul: f32, add: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    let body = |o: &mut [f32]| o.iter_mut().for_each(|v| *v = *v * mul + add);
    if out.len() < PAR_MIN {
        body(&mut out);
    } else {
        out.par_chunks_mut(CHUNK).for_each(body);
    }
    out
}

/// Nearest-neighbour resize of `planes` planes of `h x w` to `oh x ow`, as
/// `F.interpolate(mode="nearest")`: source index `floor(dst * in / out)`.
pub fn upsample_nearest(x: &[f32], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let mut out = vec![0f32; planes * oh * ow];
    if out.is_empty() || h == 0 || w == 0 {
        return out;
    }
    // torch computes the source index in float32 as floor(dst * (in / out))
    let (sy, sx) = (h as f32 / oh as f32, w as f32 / ow as f32);
    let cols: Vec<usize> = (0..ow).map(|j| ((j as f32 * sx) as usize).min(w - 1)).collect();
    out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(o, src)| {
        for (i, orow) in o.chunks_mut(ow).enumerate() {
            let r = ((i as f32 * sy) as usize).min(h - 1);
            let srow = &src[r * w..(r + 1) * w];
            for (v, &c) in orow.iter_mut().zip(&cols) {
                *v = srow[c];
            }
        }
    });
    out
}

/// The transpose of the row-major `rows x cols` matrix `a`, in blocks (so that reads and writes
/// both stay within a few cache lines), each task `B` rows of the result.
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    // out is cols x rows; each task fills B of its rows (B columns of a)
    out.par_chunks_mut(B * rows).enumerate().for_each(|(bj, dst)| {
        let c0 = bj * B;
        let nc = dst.len() / rows;
        // 16 rows of a at a time: each output row gets a contiguous run of 16 (one cache line),
        // read from a 16 x B block that stays in L1
        for r0 in (0..rows).step_by(16) {
            let nr = 16.min(rows - r0);
            for j in 0..nc {
                for (i, v) in dst[j * rows + r0..j * rows + r0 + nr].iter_mut().enumerate() {
                    *v = a[(r0 + i) * cols + c0 + j];
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn transposes_are_exact_at_block_edges() {
        for (rows, cols) in [(1, 1), (3, 70), (65, 33), (32, 64)] {
            let a: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::transpose(&a, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], a[r * cols + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }
}
