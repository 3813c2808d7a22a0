//! Matrix products on the `gemm` crate (the one candle uses), behind views whose extents are
//! checked against their slices before any pointer is formed.

use crate::{Error, Result};

/// A strided matrix view: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// The mutable counterpart of [`Mat`].
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

impl<'a> MatMut<'a> {
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }
}

/// The number of elements a view reaches from its first one.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Products smaller than this many multiply-adds run on one thread: spreading them costs more
/// than it saves.
const PARALLEL_MIN: usize = 1 << 18;

/// Whether to spread a product over the current rayon pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// On the calling thread (the caller is already one of many parallel tasks).
    Seq,
    /// Over the current pool when the product is large enough.
    Auto,
}

/// `dst = a b` (or `dst += a b` with `accumulate`).
pub fn gemm(dst: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool, par: Par) -> Result<()> {
    if a.rows != dst.rows || b.cols != dst.cols || a.cols != b.rows {
        return Err(Error::Backend(format!(
            "gemm: {}x{} times {}x{} into {}x{}",
            a.rows, a.cols, b.rows, b.cols, dst.rows, dst.cols
        )));
    }
    for (what, len, ext) in [
        ("dst", dst.data.len(), extent(dst.rows, dst.cols, dst.rs, dst.cs)),
        ("lhs", a.data.len(), extent(a.rows, a.cols, a.rs, a.cs)),
        ("rhs", b.data.len(), extent(b.rows, b.cols, b.rs, b.cs)),
    ] {
        if ext > len {
            return Err(Error::Backend(format!("gemm: the {what} view reaches {ext} elements of {len}")));
        }
    }
    if dst.rows == 0 || dst.cols == 0 {
        return Ok(());
    }
    // Distinct output elements must not alias, or threads would race on them.
    if dst.rows > 1 && dst.cols > 1 && (dst.rs == 0 || dst.cs == 0) {
        return Err(Error::Backend("gemm: the destination view repeats elements".into()));
    }
    if a.cols == 0 {
        if !accumulate {
            for r in 0..dst.rows {
                for c in 0..dst.cols {
                    dst.data[r * dst.rs + c * dst.cs] = 0.0;
                }
            }
        }
        return Ok(());
    }
    let work = dst.rows.saturating_mul(dst.cols).saturating_mul(a.cols);
    let parallelism = if par == Par::Auto && work >= PARALLEL_MIN && rayon::current_num_threads() > 1 {
        ::gemm::Parallelism::Rayon(0)
    } else {
        ::gemm::Parallelism::None
    };
    // SAFETY: the three views were checked to lie within their slices above, the destination is
    // borrowed mutably (so it aliases neither input) and does not repeat elements.
    unsafe {
        ::gemm::gemm(
            dst.rows,
            dst.cols,
            a.cols,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn products_match_a_naive_loop_in_every_layout() {
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 89) as f32 / 45.0 - 1.0).collect();
        let want = naive(&a, &b, m, k, n);
        let mut out = vec![0.0; m * n];
        gemm(MatMut::rows(&mut out, m, n), Mat::rows(&a, m, k), Mat::rows(&b, k, n), false, Par::Auto).unwrap();
        let err = out.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(err < 1e-4, "{err}");
        // b given transposed, and accumulation onto the previous result
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        gemm(MatMut::rows(&mut out, m, n), Mat::rows(&a, m, k), Mat::rows(&bt, n, k).t(), true, Par::Seq).unwrap();
        let err = out.iter().zip(&want).map(|(x, y)| (x - 2.0 * y).abs()).fold(0.0, f32::max);
        assert!(err < 2e-4, "{err}");
    }

    #[test]
    fn views_outside_their_slices_are_refused() {
        let a = vec![0.0; 6];
        let mut out = vec![0.0; 4];
        let e = gemm(MatMut::rows(&mut out, 2, 2), Mat::rows(&a, 2, 3), Mat::rows(&a, 3, 2), false, Par::Seq);
        assert!(e.is_ok());
        let e = gemm(MatMut::rows(&mut out, 2, 2), Mat::rows(&a, 2, 4), Mat::rows(&a, 4, 2), false, Par::Seq);
        assert!(e.unwrap_err().to_string().contains("reaches"));
    }
}
