//! Vector quantisation: each row of `z` replaced by its nearest codebook row, without the
//! `rows x codes` distance matrix (4096 x 8192 floats, 128 MiB, for a 256x256 super-resolution
//! output, several times over as candle's broadcasts built it).

use rayon::prelude::*;

use crate::{Error, Result};

/// Rows of `z` per parallel task.
const ROWS_PER_TASK: usize = 64;

/// `z (n, d)` against `codebook (k, d)`: the `(n, d)` matrix of nearest codebook rows. The
/// distance is the full `(|z|^2 + |e|^2) - 2 z.e`, each sum taken in index order, and ties go to
/// the first code, as torch.argmin (and the WebGPU kernel) do.
pub fn nearest(z: &[f32], codebook: &[f32], d: usize) -> Result<Vec<f32>> {
    if d == 0 || z.len() % d != 0 || codebook.len() % d != 0 || codebook.is_empty() {
        return Err(Error::Backend(format!(
            "vq_nearest: {} latent values and {} codebook values for vectors of {d}",
            z.len(),
            codebook.len()
        )));
    }
    let e2: Vec<f32> = codebook.chunks_exact(d).map(sum_sq).collect();
    let mut out = vec![0f32; z.len()];
    out.par_chunks_mut(ROWS_PER_TASK * d).zip(z.par_chunks(ROWS_PER_TASK * d)).for_each(|(o, zs)| {
        for (orow, zrow) in o.chunks_exact_mut(d).zip(zs.chunks_exact(d)) {
            let z2 = sum_sq(zrow);
            let mut best = (0, f32::INFINITY);
            for (c, (e, &e2)) in codebook.chunks_exact(d).zip(&e2).enumerate() {
                let ze = zrow.iter().zip(e).fold(0.0f32, |acc, (&a, &b)| acc + a * b);
                let dist = (z2 + e2) - 2.0 * ze;
                if c == 0 || dist < best.1 {
                    best = (c, dist);
                }
            }
            orow.copy_from_slice(&codebook[best.0 * d..(best.0 + 1) * d]);
        }
    });
    Ok(out)
}

fn sum_sq(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |acc, &x| acc + x * x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_codes_are_found_with_the_first_on_ties() {
        let d = 3;
        let codebook: Vec<f32> = (0..50 * d).map(|i| ((i * 7919) % 61) as f32 / 30.0 - 1.0).collect();
        let z: Vec<f32> = (0..200 * d).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
        let got = nearest(&z, &codebook, d).unwrap();
        for (zrow, grow) in z.chunks(d).zip(got.chunks(d)) {
            // the nearest by exact (f64) distance; the chosen code is within rounding of it
            let dist = |e: &[f32]| zrow.iter().zip(e).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>();
            let best = codebook.chunks(d).map(dist).fold(f64::INFINITY, f64::min);
            assert!(dist(grow) - best < 1e-5, "{zrow:?}: chose {grow:?} at {} for a best of {best}", dist(grow));
        }
        // two identical codes: the first is taken
        let cb = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(nearest(&[0.9, 0.9], &cb, 2).unwrap(), vec![1.0, 1.0]);
        let twin = [5.0, 5.0, 1.0, 2.0, 1.0, 2.0];
        let first = nearest(&[1.0, 2.0], &twin, 2).unwrap();
        assert_eq!(first, vec![1.0, 2.0]);
        assert!(nearest(&[1.0, 2.0, 3.0], &twin, 2).unwrap_err().to_string().contains("vectors of 2"));
    }
}
