//! 2D convolution on NCHW float32 as matrix products, with the weights in their stored layout.
//!
//! `torch.nn.Conv2d`'s weight `(O, C, kh, kw)` is already the `O x (C kh kw)` matrix of the
//! product, so a convolution is, per image, `out (O x P) = W (O x K) cols (K x P)` with `cols` the
//! shifted input planes (im2col, built row by row from contiguous runs of the NCHW input) and
//! `P` the output positions. The output comes out in NCHW directly. Large images are done a
//! band of output rows at a time, so the `cols` buffer stays small (and in cache) however large
//! the image. A 1x1 convolution needs no `cols` at all: the input planes are the matrix.
//!
//! 3x3 convolutions with stride 1 and padding 1 on large feature maps (nearly all of the UNets'
//! and decoders' work) use Winograd's minimal filtering F(2x2, 3x3) instead (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each 4x4 input tile and each 3x3
//! kernel are transformed to 4x4, and the 16 positions are 16 independent matrix products, 2.25
//! times fewer multiplications than the direct product. Its transforms only add, subtract and
//! halve, so the rounding is that of the direct product's.

use rayon::prelude::*;

use super::gemm::{gemm, Mat, MatMut, Par};
use crate::{Error, Result};

/// The most `cols` elements of one band (16 MiB of float32).
const BAND_ELEMS: usize = 1 << 22;

/// The shape of a convolution: input `(n, c, h, w)`, weight `(o, c, kh, kw)`.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_hw(&self) -> Result<(usize, usize)> {
        let (hp, wp) = (self.h + 2 * self.padding, self.w + 2 * self.padding);
        if self.stride == 0 || hp < self.kh || wp < self.kw {
            return Err(Error::Backend(format!("conv2d: kernel {}x{} does not fit the padded input {hp}x{wp}", self.kh, self.kw)));
        }
        Ok(((hp - self.kh) / self.stride + 1, (wp - self.kw) / self.stride + 1))
    }
}

/// `x (n, c, h, w)` convolved with `weight (o, c, kh, kw)` plus `bias (o)`: `(n, o, oh, ow)`.
pub fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Result<Vec<f32>> {
    conv2d_banded(x, weight, bias, s, BAND_ELEMS)
}

fn conv2d_banded(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape, band_elems: usize) -> Result<Vec<f32>> {
    let (oh, ow) = s.out_hw()?;
    let k = s.c * s.kh * s.kw;
    if x.len() != s.n * s.c * s.h * s.w || weight.len() != s.o * k || bias.is_some_and(|b| b.len() != s.o) {
        return Err(Error::Backend(format!("conv2d: buffer sizes do not match {s:?}")));
    }
    let plane = oh * ow;
    let mut out = vec![0f32; s.n * s.o * plane];
    if winograd_fits(s) {
        winograd(x, weight, bias, s, &mut out, band_elems)?;
        return Ok(out);
    }
    if let Some(b) = bias {
        out.par_chunks_mut(plane.max(1)).enumerate().for_each(|(i, p)| p.fill(b[i % s.o]));
    }
    let w = Mat::rows(weight, s.o, k);
    let direct = s.kh == 1 && s.kw == 1 && s.stride == 1 && s.padding == 0;
    let band_rows = (band_elems / (k * ow).max(1)).clamp(1, oh.max(1));
    let mut cols = if direct { Vec::new() } else { vec![0f32; k * band_rows * ow] };
    for (img, dst) in x.chunks(s.c * s.h * s.w).zip(out.chunks_mut(s.o * plane)) {
        if direct {
            gemm(MatMut::rows(dst, s.o, plane), w, Mat::rows(img, s.c, s.h * s.w), bias.is_some(), Par::Auto)?;
            continue;
        }
        let mut y0 = 0;
        while y0 < oh {
            let rows = band_rows.min(oh - y0);
            let p = rows * ow;
            im2col(img, &mut cols[..k * p], s, y0, rows, ow);
            let band = MatMut { data: &mut dst[y0 * ow..], rows: s.o, cols: p, rs: plane, cs: 1 };
            gemm(band, w, Mat::rows(&cols[..k * p], k, p), bias.is_some(), Par::Auto)?;
            y0 += rows;
        }
    }
    Ok(out)
}

/// The `cols` matrix of output rows `y0 .. y0 + rows`: row `(ci, ky, kx)` holds, for each output
/// position, the input value under kernel tap `(ky, kx)` of channel `ci` (0 in the padding).
fn im2col(img: &[f32], cols: &mut [f32], s: ConvShape, y0: usize, rows: usize, ow: usize) {
    let p = rows * ow;
    let taps = s.kh * s.kw;
    cols.par_chunks_mut(taps * p).enumerate().for_each(|(ci, chunk)| {
        let plane = &img[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let row = &mut chunk[(ky * s.kw + kx) * p..(ky * s.kw + kx + 1) * p];
                for oy in 0..rows {
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    let iy = ((y0 + oy) * s.stride + ky) as isize - s.padding as isize;
                    if iy < 0 || iy >= s.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                    // output columns whose input column kx - pad + ox * stride lies inside
                    let shift = kx as isize - s.padding as isize;
                    if s.stride == 1 {
                        let lo = (-shift).clamp(0, ow as isize) as usize;
                        let hi = (s.w as isize - shift).clamp(lo as isize, ow as isize) as usize;
                        dst[..lo].fill(0.0);
                        dst[lo..hi].copy_from_slice(&src[(lo as isize + shift) as usize..(hi as isize + shift) as usize]);
                        dst[hi..].fill(0.0);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let ix = (ox * s.stride) as isize + shift;
                            *d = if ix >= 0 && ix < s.w as isize { src[ix as usize] } else { 0.0 };
                        }
                    }
                }
            }
        }
    });
}

/// Whether F(2x2, 3x3) applies and pays: below a few hundred tiles the products are too thin and
/// the kernel transform (read once per call) dominates.
fn winograd_fits(s: ConvShape) -> bool {
    s.kh == 3 && s.kw == 3 && s.stride == 1 && s.padding == 1 && s.n * s.h.div_ceil(2) * s.w.div_ceil(2) >= WINOGRAD_MIN_TILES
}

/// The fewest output tiles (2x2 each, over the batch) for which Winograd is used.
const WINOGRAD_MIN_TILES: usize = 256;

/// Winograd F(2x2, 3x3) for a 3x3 kernel, stride 1, padding 1; output `(n, o, h, w)`.
fn winograd(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape, out: &mut [f32], band_elems: usize) -> Result<()> {
    let (c, o, h, w) = (s.c, s.o, s.h, s.w);
    // U = G g G^T for every (o, c), stored (16, o, c): one o x c matrix per tile position
    let mut u = vec![0f32; 16 * o * c];
    for (oc, g) in weight.chunks_exact(9).enumerate() {
        let mut t = [[0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            t[0][j] = g0;
            t[1][j] = 0.5 * (g0 + g1 + g2);
            t[2][j] = 0.5 * (g0 - g1 + g2);
            t[3][j] = g2;
        }
        for (i, r) in t.iter().enumerate() {
            let row = [r[0], 0.5 * (r[0] + r[1] + r[2]), 0.5 * (r[0] - r[1] + r[2]), r[2]];
            for (j, v) in row.into_iter().enumerate() {
                u[(i * 4 + j) * o * c + oc] = v;
            }
        }
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // tile rows per band: the transformed input (c, 16, tiles) and products (o, 16, tiles) bounded
    let band = (band_elems / (16 * c.max(o) * tw).max(1)).clamp(1, th);
    let mut v = vec![0f32; c * 16 * band * tw];
    let mut m = vec![0f32; o * 16 * band * tw];
    for (img, dst) in x.chunks(c * h * w).zip(out.chunks_mut(o * h * w)) {
        let mut ty0 = 0;
        while ty0 < th {
            let rows = band.min(th - ty0);
            let t = rows * tw;
            // V = B^T d B for every (c, tile), stored (c, 16, tiles)
            v[..c * 16 * t].par_chunks_mut(16 * t).zip(img.par_chunks(h * w)).for_each_init(
                || (vec![0f32; 4 * 2 * (tw + 1)], vec![0f32; 16 * tw]),
                |(rows_buf, tmp), (vc, plane)| {
                    for ty in 0..rows {
                        // the tile row's four input rows, zero-padded (padded column k is input
                        // column k - 1) and split into even and odd columns
                        for i in 0..4 {
                            let (even, odd) = rows_buf[i * 2 * (tw + 1)..(i + 1) * 2 * (tw + 1)].split_at_mut(tw + 1);
                            even.fill(0.0);
                            odd.fill(0.0);
                            let iy = 2 * (ty0 + ty) + i;
                            if iy >= 1 && iy <= h {
                                for (x, &val) in plane[(iy - 1) * w..iy * w].iter().enumerate() {
                                    let k = x + 1;
                                    if k % 2 == 0 {
                                        even[k / 2] = val;
                                    } else {
                                        odd[k / 2] = val;
                                    }
                                }
                            }
                        }
                        input_transform_row(rows_buf, vc, t, ty * tw, tw, tmp);
                    }
                },
            );
            // M_xi = U_xi V_xi for the 16 positions
            for xi in 0..16 {
                let lhs = Mat { data: &u[xi * o * c..(xi + 1) * o * c], rows: o, cols: c, rs: c, cs: 1 };
                let rhs = Mat { data: &v[xi * t..c * 16 * t], rows: c, cols: t, rs: 16 * t, cs: 1 };
                let dstm = MatMut { data: &mut m[xi * t..o * 16 * t], rows: o, cols: t, rs: 16 * t, cs: 1 };
                gemm(dstm, lhs, rhs, false, Par::Auto)?;
            }
            // Y = A^T M A, plus the bias, into output rows 2 ty0 ..
            dst.par_chunks_mut(h * w).zip(m[..o * 16 * t].par_chunks(16 * t)).enumerate().for_each_init(
                || (vec![0f32; 2 * 2 * tw], vec![0f32; 10 * tw]),
                |(out_rows, tmp), (oi, (plane, mo))| {
                    let b = bias.map_or(0.0, |b| b[oi]);
                    for ty in 0..rows {
                        output_transform_row(mo, t, ty * tw, tw, b, out_rows, tmp);
                        for i in 0..2 {
                            let y = 2 * (ty0 + ty) + i;
                            if y < h {
                                plane[y * w..(y + 1) * w].copy_from_slice(&out_rows[i * 2 * tw..i * 2 * tw + w]);
                            }
                        }
                    }
                },
            );
            ty0 += rows;
        }
    }
    Ok(())
}

/// `o = a + sa * b` element by element (`sa` is 1 or -1).
#[inline(always)]
fn axpy(o: &mut [f32], a: &[f32], b: &[f32], sa: f32) {
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        *o = a + sa * b;
    }
}

crate::backend::cpu::math::dispatch! {
    /// The input transform of one row of `tw` tiles. `rows` holds the four zero-padded input rows
    /// de-interleaved: row `i` is `2 (tw + 1)` values, its even then its odd columns (padded
    /// column `2 k` is `even[k]`). Writes `V[xi][tx]` to `v[xi * t + toff + tx]`; `tmp` holds
    /// `16 tw` values.
    fn input_transform_row(rows: &[f32], v: &mut [f32], t: usize, toff: usize, tw: usize, tmp: &mut [f32]) {
        let n = tw + 1;
        // d[i][j]: tap column j of every tile of input row i, contiguous over the tiles
        let d = |i: usize, j: usize| -> &[f32] {
            let row = &rows[i * 2 * n..(i + 1) * 2 * n];
            let (even, odd) = row.split_at(n);
            match j {
                0 => &even[..tw],
                1 => &odd[..tw],
                2 => &even[1..=tw],
                _ => &odd[1..=tw],
            }
        };
        // R = B^T d, row by row: d0 - d2, d1 + d2, d2 - d1, d1 - d3
        for j in 0..4 {
            let base = j * 4 * tw;
            let (a, b) = tmp[base..base + 4 * tw].split_at_mut(2 * tw);
            let (r0, r1) = a.split_at_mut(tw);
            let (r2, r3) = b.split_at_mut(tw);
            axpy(r0, d(0, j), d(2, j), -1.0);
            axpy(r1, d(1, j), d(2, j), 1.0);
            axpy(r2, d(2, j), d(1, j), -1.0);
            axpy(r3, d(1, j), d(3, j), -1.0);
        }
        // V = R B, column by column: r0 - r2, r1 + r2, r2 - r1, r1 - r3
        let r = |i: usize, j: usize| &tmp[(j * 4 + i) * tw..(j * 4 + i + 1) * tw];
        for i in 0..4 {
            let at = |k: usize| (4 * i + k) * t + toff;
            axpy(&mut v[at(0)..at(0) + tw], r(i, 0), r(i, 2), -1.0);
            axpy(&mut v[at(1)..at(1) + tw], r(i, 1), r(i, 2), 1.0);
            axpy(&mut v[at(2)..at(2) + tw], r(i, 2), r(i, 1), -1.0);
            axpy(&mut v[at(3)..at(3) + tw], r(i, 1), r(i, 3), -1.0);
        }
    }
}

crate::backend::cpu::math::dispatch! {
    /// The output transform of one row of `tw` tiles: `out` receives the two output rows
    /// (`2 tw` values each), `A^T M A + bias`; `tmp` holds `10 tw` values.
    fn output_transform_row(m: &[f32], t: usize, toff: usize, tw: usize, bias: f32, out: &mut [f32], tmp: &mut [f32]) {
        let mk = |k: usize| &m[k * t + toff..k * t + toff + tw];
        // A^T M: rows m0 + m1 + m2 and m1 - m2 - m3 (each of four columns)
        let (a, y) = tmp.split_at_mut(8 * tw);
        for j in 0..4 {
            let (top, bottom) = a[j * 2 * tw..(j + 1) * 2 * tw].split_at_mut(tw);
            for (((o, &x0), &x1), &x2) in top.iter_mut().zip(mk(j)).zip(mk(4 + j)).zip(mk(8 + j)) {
                *o = x0 + x1 + x2;
            }
            for (((o, &x1), &x2), &x3) in bottom.iter_mut().zip(mk(4 + j)).zip(mk(8 + j)).zip(mk(12 + j)) {
                *o = x1 - x2 - x3;
            }
        }
        // (A^T M) A: columns a0 + a1 + a2 and a1 - a2 - a3, then the bias, interleaved
        let col = |i: usize, j: usize| &a[(j * 2 + i) * tw..(j * 2 + i + 1) * tw];
        let (top, bottom) = out.split_at_mut(2 * tw);
        for (i, dst) in [top, bottom].into_iter().enumerate() {
            let (y0, y1) = y[..2 * tw].split_at_mut(tw);
            for (((o, &x0), &x1), &x2) in y0.iter_mut().zip(col(i, 0)).zip(col(i, 1)).zip(col(i, 2)) {
                *o = x0 + x1 + x2 + bias;
            }
            for (((o, &x1), &x2), &x3) in y1.iter_mut().zip(col(i, 1)).zip(col(i, 2)).zip(col(i, 3)) {
                *o = x1 - x2 - x3 + bias;
            }
            for ((pair, &e), &odd) in dst.chunks_exact_mut(2).zip(y0.iter()).zip(y1.iter()) {
                pair[0] = e;
                pair[1] = odd;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], b: &[f32], s: ConvShape) -> Vec<f32> {
        let (oh, ow) = s.out_hw().unwrap();
        let mut out = vec![0f32; s.n * s.o * oh * ow];
        for n in 0..s.n {
            for o in 0..s.o {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut acc = b[o] as f64;
                        for c in 0..s.c {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy = (y * s.stride + ky) as isize - s.padding as isize;
                                    let ix = (xx * s.stride + kx) as isize - s.padding as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w {
                                        acc += x[((n * s.c + c) * s.h + iy as usize) * s.w + ix as usize] as f64
                                            * w[((o * s.c + c) * s.kh + ky) * s.kw + kx] as f64;
                                    }
                                }
                            }
                        }
                        out[((n * s.o + o) * oh + y) * ow + xx] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn convolutions_match_the_definition() {
        let shapes = [
            (2, 5, 9, 7, 6, 3, 1, 1),
            (1, 4, 8, 8, 3, 3, 2, 1),
            (1, 3, 9, 10, 4, 3, 2, 0),
            (2, 6, 5, 4, 7, 1, 1, 0),
            (1, 2, 4, 6, 3, 3, 1, 2),
            (1, 3, 300, 5, 2, 3, 1, 1),
            // Winograd: even and odd sides, several bands
            (2, 5, 31, 33, 6, 3, 1, 1),
            (1, 7, 40, 26, 3, 3, 1, 1),
        ];
        for (n, c, h, w, o, k, stride, padding) in shapes {
            let s = ConvShape { n, c, h, w, o, kh: k, kw: k, stride, padding };
            let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
            let wt: Vec<f32> = (0..o * c * k * k).map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0).collect();
            let b: Vec<f32> = (0..o).map(|i| i as f32 * 0.25 - 0.5).collect();
            let want = naive(&x, &wt, &b, s);
            // whole images, and bands of a few rows (the large-image path)
            for band in [BAND_ELEMS, 3 * c * k * k * w] {
                let got = conv2d_banded(&x, &wt, Some(&b), s, band).unwrap();
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(err < 1e-4, "{s:?}, band {band}: {err}");
            }
        }
    }
}
