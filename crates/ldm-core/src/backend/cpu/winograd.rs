//! 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016). Each `a x a` input tile and each 3x3
//! kernel are transformed to `a x a`; the `a^2` positions are then independent matrix products
//! `(O x C) (C x tiles)`, and the inverse transform gives an `m x m` output tile.
//!
//! Two sizes: F(2x2, 3x3) (`a = 4`, 2.25 times fewer multiplications than the direct product,
//! transforms that only add, subtract and halve) and F(4x4, 3x3) (`a = 6`, 4 times fewer, with
//! coefficients up to 8 and 1/24, so it rounds a few times more: the super-resolution cases
//! against diffusers went from 1.5e-6 to 5.1e-6 at most, against the 1e-4 they allow). The larger
//! is used where there are enough tiles for its products to be wide; its kernel transform is 4
//! times the size of the weight (37 MiB for a 512-channel convolution), made on each call and
//! freed after it.
//!
//! The transforms take 16 tiles at a time, their `a x a` values each a vector over the tiles,
//! so that every input is read once and every output written once.
//!
//! The input transform reads its rows through a [`Prologue`]: a nearest-neighbour 2x upsampling
//! and a group norm with SiLU can be applied to each row as it is read, so that the upsampled or
//! normalised map (as large as the output, or larger) is never held whole.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv::ConvShape;
use super::gemm::{gemm, Mat, MatMut, Par};
use crate::Result;

/// One Winograd size: output tiles `m x m` from input tiles `a x a`, `a = m + 2`.
pub struct Tiling {
    pub(super) m: usize,
    a: usize,
    /// `B^T`, `a x a`, row-major. This and `at` are what the explicit transforms ([`bt4`],
    /// [`bt6`], [`at4`], [`at6`]) compute; the tests hold them to it.
    #[cfg_attr(not(test), allow(dead_code))]
    bt: &'static [f32],
    /// `G`, `a x 3`.
    g: &'static [f64],
    /// `A^T`, `m x a`.
    #[cfg_attr(not(test), allow(dead_code))]
    at: &'static [f32],
    /// [`input_lanes`] and [`output_lanes`] compiled for this tiling.
    input_row: InputRow,
    output_row: OutputRow,
}

type InputRow = fn(&[f32], usize, &mut [f32], usize, usize, usize);
type OutputRow = fn(&[f32], usize, usize, usize, f32, &mut [f32]);

/// F(2x2, 3x3).
pub static F2: Tiling = Tiling {
    m: 2,
    a: 4,
    #[rustfmt::skip]
    bt: &[
        1.0, 0.0, -1.0, 0.0,
        0.0, 1.0, 1.0, 0.0,
        0.0, -1.0, 1.0, 0.0,
        0.0, 1.0, 0.0, -1.0,
    ],
    #[rustfmt::skip]
    g: &[
        1.0, 0.0, 0.0,
        0.5, 0.5, 0.5,
        0.5, -0.5, 0.5,
        0.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    at: &[
        1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, -1.0,
    ],
    input_row: input_row_f2,
    output_row: output_row_f2,
};

/// F(4x4, 3x3), interpolating at 0, 1, -1, 2, -2 and infinity.
pub static F4: Tiling = Tiling {
    m: 4,
    a: 6,
    #[rustfmt::skip]
    bt: &[
        4.0, 0.0, -5.0, 0.0, 1.0, 0.0,
        0.0, -4.0, -4.0, 1.0, 1.0, 0.0,
        0.0, 4.0, -4.0, -1.0, 1.0, 0.0,
        0.0, -2.0, -1.0, 2.0, 1.0, 0.0,
        0.0, 2.0, -1.0, -2.0, 1.0, 0.0,
        0.0, 4.0, 0.0, -5.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    g: &[
        1.0 / 4.0, 0.0, 0.0,
        -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0,
        -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0,
        1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0,
        1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0,
        0.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    at: &[
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, 2.0, -2.0, 0.0,
        0.0, 1.0, 1.0, 4.0, 4.0, 0.0,
        0.0, 1.0, -1.0, 8.0, -8.0, 1.0,
    ],
    input_row: input_row_f4,
    output_row: output_row_f4,
};

/// The fewest output tiles (over the batch) for which a tiling is used: below that the products
/// are too thin and the kernel transform (made on every call, `a^2 / 9` times the weight's size)
/// dominates. Measured on 2 threads: 128 tiles of F(4x4) take about 0.65x the time of 512 of
/// F(2x2) on the UNet's 320-channel 32x32 batch of two, and 128 tiles of F(2x2) 0.8x the time of
/// the im2col product on its 640-channel 16x16 one; 32 tiles of F(2x2) take 3x the im2col time.
const MIN_TILES: usize = 128;

/// F(4x4) is also used from half [`MIN_TILES`] where its kernel transform is at most this many
/// values (16 MiB, which stays in a server's last-level cache between being made and read).
/// Measured on 2 threads (AMD EPYC, 32 MiB L3), 64 tiles of F(4x4) against 256 of F(2x2): 0.82x
/// the time for 320 to 320 channels (14.7 MiB transformed), 0.94x for 640 to 320 (29.5 MiB),
/// 1.6x for 512 to 512 (37.7 MiB).
const F4_SMALL_KERNELS: usize = 1 << 22;

/// The tiling for a convolution, if one applies and pays.
pub fn choose(s: ConvShape) -> Option<&'static Tiling> {
    if s.kh != 3 || s.kw != 3 || s.stride != 1 || s.padding != 1 || s.c == 0 || s.o == 0 {
        return None;
    }
    let tiles = |m: usize| s.n * s.h.div_ceil(m) * s.w.div_ceil(m);
    let f4_kernels = s.o.saturating_mul(s.c).saturating_mul(F4.a * F4.a);
    if tiles(F4.m) >= MIN_TILES || (tiles(F4.m) >= MIN_TILES / 2 && f4_kernels <= F4_SMALL_KERNELS) {
        Some(&F4)
    } else {
        (tiles(F2.m) >= MIN_TILES).then_some(&F2)
    }
}

impl Tiling {
    /// `U = G g G^T` for every `(o, c)`, stored `(o, a^2, c)`: position `xi`'s `o x c` matrix
    /// has rows `a^2 c` apart. Each output channel's block is contiguous, so they are made in
    /// parallel, each position a weighted sum of the nine taps ([`kernel_positions`]). Every
    /// value is written once: the buffer is not zeroed first.
    fn kernels(&self, weight: &[f32], o: usize, c: usize) -> Vec<f32> {
        let a = self.a;
        // coef[xi * 9 + 3 r + s] = G[i][r] G[j][s] for position xi = (i, j)
        let coef: Vec<f32> = (0..a * a * 9)
            .map(|t| {
                let (i, j, r, s) = (t / 9 / a, t / 9 % a, t % 9 / 3, t % 3);
                (self.g[3 * i + r] * self.g[3 * j + s]) as f32
            })
            .collect();
        let mut u = Vec::with_capacity(o * a * a * c);
        u.spare_capacity_mut()[..o * a * a * c]
            .par_chunks_mut(a * a * c)
            .zip(weight.par_chunks(9 * c))
            .for_each_init(
                || vec![0f32; 9 * c],
                |wt, (uo, wo)| {
                    // this output channel's kernels, tap-major: wt[tap * c + ci]
                    for (ci, k) in wo.chunks_exact(9).enumerate() {
                        for (tap, &val) in k.iter().enumerate() {
                            wt[tap * c + ci] = val;
                        }
                    }
                    kernel_positions(uo, &coef, wt, c);
                },
            );
        // SAFETY: kernel_positions wrote all a^2 c values of each output channel's block
        unsafe { u.set_len(o * a * a * c) };
        u
    }
}

/// `x (n, c, h, w)` convolved with the 3x3 `weight (o, c, 3, 3)`, padding 1, plus `bias`, into
/// `out (n, o, h, w)`; the transformed tiles of at most about `band_elems` values at a time.
pub fn conv3x3(
    t: &Tiling,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: ConvShape,
    pro: Prologue<'_>,
    out: &mut [f32],
    band_elems: usize,
) -> Result<()> {
    let (c, o, h, w) = (s.c, s.o, s.h, s.w);
    // the stored input plane: half the size each way when upsampled on the fly
    let (sh, sw) = if pro.up2 { (h / 2, w / 2) } else { (h, w) };
    let (m, a) = (t.m, t.a);
    let aa = a * a;
    let u = t.kernels(weight, o, c);
    let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
    // tile rows per band: the transformed input (c, a^2, tiles) and products (a^2, o, tiles)
    let band = (band_elems / (aa * c.max(o) * tw).max(1)).clamp(1, th);
    let mut v = vec![0f32; c * aa * band * tw];
    let mut prod = vec![0f32; o * aa * band * tw];
    // the a padded input rows of a tile row, each split into m phases (split_phases)
    let phase_len = tw + 1;
    for (ii, (img, dst)) in x.chunks(c * sh * sw).zip(out.chunks_mut(o * h * w)).enumerate() {
        let mut ty0 = 0;
        while ty0 < th {
            let rows = band.min(th - ty0);
            let tiles = rows * tw;
            // V = B^T d B for every (c, tile), stored (c, a^2, tiles)
            v[..c * aa * tiles]
                .par_chunks_mut(aa * tiles)
                .zip(img.par_chunks(sh * sw))
                .enumerate()
                .for_each_init(
                    || (vec![0f32; a * m * phase_len], vec![0f32; w]),
                    |(phases, line), (ci, (vc, plane))| {
                        for ty in 0..rows {
                            for (i, row) in phases.chunks_exact_mut(m * phase_len).enumerate() {
                                // padded row iy is input row iy - 1
                                let iy = m * (ty0 + ty) + i;
                                let src = (iy >= 1 && iy <= h)
                                    .then(|| pro.row(plane, iy - 1, sw, ii * c + ci, line));
                                split_phases(row, src, m, phase_len);
                            }
                            (t.input_row)(phases, phase_len, vc, tiles, ty * tw, tw);
                        }
                    },
                );
            // M_xi = U_xi V_xi for the a^2 positions, stored (a^2, o, tiles): the positions'
            // products are independent, so they (and, on many threads, blocks of their output
            // channels) are the parallel tasks, each product on one thread
            let ob = o.div_ceil((2 * rayon::current_num_threads()).div_ceil(aa));
            prod[..aa * o * tiles].par_chunks_mut(o * tiles).enumerate().try_for_each(|(xi, pm)| {
                pm.par_chunks_mut(ob * tiles).enumerate().try_for_each(|(bi, dst)| {
                    // output channels bi ob .. bi ob + outs
                    let outs = dst.len() / tiles;
                    let lhs = Mat { data: &u[(bi * ob * aa + xi) * c..], rows: outs, cols: c, rs: aa * c, cs: 1 };
                    let rhs = Mat { data: &v[xi * tiles..c * aa * tiles], rows: c, cols: tiles, rs: aa * tiles, cs: 1 };
                    gemm(MatMut::rows(dst, outs, tiles), lhs, rhs, false, Par::Seq)
                })
            })?;
            // Y = A^T M A, plus the bias, into output rows m ty0 ..
            let prod = &prod[..aa * o * tiles];
            dst.par_chunks_mut(h * w)
                .enumerate()
                .for_each_init(
                    || vec![0f32; m * m * tw],
                    |out_rows, (oi, plane)| {
                        let b = bias.map_or(0.0, |b| b[oi]);
                        for ty in 0..rows {
                            let y0 = m * (ty0 + ty);
                            if w == m * tw && y0 + m <= h {
                                // the tile row's m output rows are whole rows of the plane,
                                // laid out as the transform writes them
                                let dst = &mut plane[y0 * w..(y0 + m) * w];
                                (t.output_row)(&prod[oi * tiles..], o * tiles, ty * tw, tw, b, dst);
                                continue;
                            }
                            (t.output_row)(&prod[oi * tiles..], o * tiles, ty * tw, tw, b, out_rows);
                            for i in 0..m {
                                let y = y0 + i;
                                if y < h {
                                    plane[y * w..(y + 1) * w]
                                        .copy_from_slice(&out_rows[i * m * tw..i * m * tw + w]);
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

/// What a convolution's input is made of, besides `x` itself: work that would otherwise be a
/// whole feature map of its own (as large as the convolution's output or larger), done on each
/// input row as the transform reads it. The result is exactly the convolution of the map that
/// the materialised steps would have made: the same float operations on the same values.
#[derive(Clone, Copy, Debug, Default)]
pub struct Prologue<'a> {
    /// `x` is the input at half its height and width: nearest-neighbour 2x upsampling
    /// (diffusers `Upsample2D` before its convolution). The height and width must be even.
    pub up2: bool,
    /// `silu(x * a + b)` with `(a, b)` per (image, channel), `n * c` of each: a group norm
    /// (as `norm::group_affine` gives it) and SiLU, as every resnet applies before its
    /// convolutions. The zero padding stays zero, as around a normalised map.
    pub norm_silu: Option<(&'a [f32], &'a [f32])>,
}

impl Prologue<'_> {
    /// Whether the input is `x` itself.
    pub fn is_identity(&self) -> bool {
        !self.up2 && self.norm_silu.is_none()
    }

    /// Row `y` of the input from a stored plane of rows `sw` wide, channel `k` of the batch;
    /// `line` (the input's width) holds it where it is not a row of the plane as stored.
    #[inline]
    fn row<'b>(&self, plane: &'b [f32], y: usize, sw: usize, k: usize, line: &'b mut [f32]) -> &'b [f32] {
        if self.is_identity() {
            return &plane[y * sw..(y + 1) * sw];
        }
        if self.up2 {
            let src = &plane[y / 2 * sw..(y / 2 + 1) * sw];
            for (pair, &v) in line.chunks_exact_mut(2).zip(src) {
                pair[0] = v;
                pair[1] = v;
            }
        } else {
            line.copy_from_slice(&plane[y * sw..(y + 1) * sw]);
        }
        if let Some((a, b)) = self.norm_silu {
            let (a, b) = (a[k], b[k]);
            for v in line.iter_mut() {
                *v = *v * a + b;
            }
            super::math::silu_seq(line);
        }
        line
    }

    /// The input map itself, `(n, c, h, w)` for a convolution of shape `s`, from `x`.
    pub fn apply(&self, x: &[f32], s: ConvShape) -> Vec<f32> {
        let (sh, sw) = if self.up2 { (s.h / 2, s.w / 2) } else { (s.h, s.w) };
        let mut out = vec![0f32; s.n * s.c * s.h * s.w];
        out.par_chunks_mut(s.h * s.w).zip(x.par_chunks(sh * sw)).enumerate().for_each(|(k, (dst, plane))| {
            let mut line = vec![0f32; s.w];
            for (y, d) in dst.chunks_exact_mut(s.w).enumerate() {
                let r = self.row(plane, y, sw, k, &mut line);
                d.copy_from_slice(r);
            }
        });
        out
    }
}

/// One padded input row (`None`: a padding row) split by column modulo `m` into `row`: phase `p`
/// holds padded columns `p, p + m, p + 2m, ...`, padded column `k` being input column `k - 1`.
fn split_phases(row: &mut [f32], src: Option<&[f32]>, m: usize, phase_len: usize) {
    row.fill(0.0);
    let Some(src) = src else { return };
    for (p, phase) in row.chunks_exact_mut(phase_len).enumerate() {
        let (skip, first) = if p == 0 { (m - 1, 1) } else { (p - 1, 0) };
        for (d, &val) in phase[first..]
            .iter_mut()
            .zip(src.iter().skip(skip).step_by(m))
        {
            *d = val;
        }
    }
}

/// `dst = src[..dst.len()]` for at most [`L`] values, in fixed-size copies of 16 and 8 (the
/// transforms' whole and half vectors: a row of 8 tiles is common) that compile to register
/// moves, not to a call to memcpy as a copy of unknown length does.
#[inline(always)]
fn copy_lanes(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    let src = &src[..n];
    let mut i = 0;
    while n - i >= 16 {
        copy_fixed::<16>(&mut dst[i..i + 16], &src[i..i + 16]);
        i += 16;
    }
    if n - i >= 8 {
        copy_fixed::<8>(&mut dst[i..i + 8], &src[i..i + 8]);
        i += 8;
    }
    for (d, &v) in dst[i..].iter_mut().zip(&src[i..]) {
        *d = v;
    }
}

/// `dst = src` for slices of exactly `N` values.
#[inline(always)]
fn copy_fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
    if let (Ok(d), Ok(s)) = (<&mut [f32; N]>::try_from(dst), <&[f32; N]>::try_from(src)) {
        *d = *s;
    }
}

/// Tiles per vector of the transforms: each transform runs on `L` tiles at once, its `a x a`
/// values in vectors of `L` lanes (a 512-bit register), so that every input is read once and
/// every output written once.
const L: usize = 16;
type V = [f32; L];

/// `B^T d` of F(2x2, 3x3), lane by lane.
#[inline(always)]
fn bt4(d: &[V; 4]) -> [V; 4] {
    let mut r = [[0.0; L]; 4];
    for l in 0..L {
        let [d0, d1, d2, d3] = [d[0][l], d[1][l], d[2][l], d[3][l]];
        r[0][l] = d0 - d2;
        r[1][l] = d1 + d2;
        r[2][l] = d2 - d1;
        r[3][l] = d1 - d3;
    }
    r
}

/// `A^T m` of F(2x2, 3x3).
#[inline(always)]
fn at4(m: &[V; 4]) -> [V; 2] {
    let mut y = [[0.0; L]; 2];
    for l in 0..L {
        let [m0, m1, m2, m3] = [m[0][l], m[1][l], m[2][l], m[3][l]];
        y[0][l] = m0 + m1 + m2;
        y[1][l] = m1 - m2 - m3;
    }
    y
}

/// `B^T d` of F(4x4, 3x3).
#[inline(always)]
fn bt6(d: &[V; 6]) -> [V; 6] {
    let mut r = [[0.0; L]; 6];
    for l in 0..L {
        let [d0, d1, d2, d3, d4, d5] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]];
        r[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        r[1][l] = (d3 + d4) - 4.0 * (d1 + d2);
        r[2][l] = (d4 - d3) + 4.0 * (d1 - d2);
        r[3][l] = (d4 - d2) + 2.0 * (d3 - d1);
        r[4][l] = (d4 - d2) + 2.0 * (d1 - d3);
        r[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    r
}

/// `A^T m` of F(4x4, 3x3).
#[inline(always)]
fn at6(m: &[V; 6]) -> [V; 4] {
    let mut y = [[0.0; L]; 4];
    for l in 0..L {
        let (sum, diff) = (m[1][l] + m[2][l], m[1][l] - m[2][l]);
        let (sum2, diff2) = (m[3][l] + m[4][l], m[3][l] - m[4][l]);
        y[0][l] = m[0][l] + sum + sum2;
        y[1][l] = diff + 2.0 * diff2;
        y[2][l] = sum + 4.0 * sum2;
        y[3][l] = diff + 8.0 * diff2 + m[5][l];
    }
    y
}

/// The input transform of one row of `tw` tiles. `phases` holds the tile row's `A` padded input
/// rows, each split into `M` phases of `phase_len` values. Writes `V[xi][tx]` to
/// `v[xi * tiles + toff + tx]`.
#[inline(always)]
fn input_lanes<const M: usize, const A: usize>(
    bt: impl Fn(&[V; A]) -> [V; A],
    phases: &[f32],
    phase_len: usize,
    v: &mut [f32],
    tiles: usize,
    toff: usize,
    tw: usize,
) {
    let mut tx0 = 0;
    while tx0 < tw {
        let n = L.min(tw - tx0);
        // r[j] = B^T of tap column j: r[j][i] is (B^T d)[i][j]
        let mut r = [[[0f32; L]; A]; A];
        for (j, rj) in r.iter_mut().enumerate() {
            let mut col = [[0f32; L]; A];
            for (i, ci) in col.iter_mut().enumerate() {
                let start = (i * M + j % M) * phase_len + j / M + tx0;
                copy_lanes(&mut ci[..n], &phases[start..start + n]);
            }
            *rj = bt(&col);
        }
        // V[i][.] = B^T of row i of (B^T d)
        for i in 0..A {
            let row: [V; A] = std::array::from_fn(|j| r[j][i]);
            for (l, vl) in bt(&row).iter().enumerate() {
                let at = (i * A + l) * tiles + toff + tx0;
                copy_lanes(&mut v[at..at + n], &vl[..n]);
            }
        }
        tx0 += L;
    }
}

/// The output transform of one row of `tw` tiles: `out` receives the `M` output rows (`M tw`
/// values each), `A^T P A + bias` of the products `P[xi][tx]` at `prod[xi * stride + toff + tx]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_lanes<const M: usize, const A: usize>(
    at: impl Fn(&[V; A]) -> [V; M],
    prod: &[f32],
    stride: usize,
    toff: usize,
    tw: usize,
    bias: f32,
    out: &mut [f32],
) {
    let mut tx0 = 0;
    while tx0 < tw {
        let n = L.min(tw - tx0);
        // p[j][i] is (A^T P)[i][j]
        let mut p = [[[0f32; L]; M]; A];
        for (j, pj) in p.iter_mut().enumerate() {
            let col: [V; A] = std::array::from_fn(|k| {
                let mut c = [0f32; L];
                let start = (k * A + j) * stride + toff + tx0;
                copy_lanes(&mut c[..n], &prod[start..start + n]);
                c
            });
            *pj = at(&col);
        }
        for i in 0..M {
            let row: [V; A] = std::array::from_fn(|j| p[j][i]);
            let y = at(&row);
            let dst = &mut out[i * M * tw + tx0 * M..i * M * tw + (tx0 + n) * M];
            for (lane, px) in dst.chunks_exact_mut(M).enumerate() {
                for (l, d) in px.iter_mut().enumerate() {
                    *d = y[l][lane] + bias;
                }
            }
        }
        tx0 += L;
    }
}

macro_rules! per_tiling {
    ($($input:ident, $output:ident, $m:literal, $a:literal, $bt:ident, $at:ident;)*) => {$(
        crate::backend::cpu::math::dispatch! {
            fn $input(phases: &[f32], phase_len: usize, v: &mut [f32], tiles: usize, toff: usize, tw: usize) {
                input_lanes::<$m, $a>($bt, phases, phase_len, v, tiles, toff, tw)
            }
        }
        crate::backend::cpu::math::dispatch! {
            fn $output(prod: &[f32], stride: usize, toff: usize, tw: usize, bias: f32, out: &mut [f32]) {
                output_lanes::<$m, $a>($at, prod, stride, toff, tw, bias, out)
            }
        }
    )*};
}

per_tiling! {
    input_row_f2, output_row_f2, 2, 4, bt4, at4;
    input_row_f4, output_row_f4, 4, 6, bt6, at6;
}

crate::backend::cpu::math::dispatch! {
    /// One output channel's transformed kernels, `dst[xi c + ci] = sum_tap coef[9 xi + tap]
    /// wt[tap c + ci]` for every position `xi` (`coef` holds nine per position) and input
    /// channel `ci`, writing each value once. Eight channels at a time: their nine taps are read
    /// once for all the positions, each sum kept in registers.
    fn kernel_positions(dst: &mut [MaybeUninit<f32>], coef: &[f32], wt: &[f32], c: usize) {
        const W: usize = 8;
        assert!(dst.len() == coef.len() / 9 * c && wt.len() >= 9 * c);
        for c0 in (0..c).step_by(W) {
            let n = W.min(c - c0);
            let mut taps = [[0f32; W]; 9];
            for (tap, t) in taps.iter_mut().enumerate() {
                copy_lanes(&mut t[..n], &wt[tap * c + c0..][..n]);
            }
            for (cf, row) in coef.chunks_exact(9).zip(dst.chunks_exact_mut(c)) {
                let mut acc = [0f32; W];
                for (&k, t) in cf.iter().zip(&taps) {
                    for (s, &v) in acc.iter_mut().zip(t) {
                        *s += k * v;
                    }
                }
                // (a whole chunk is written with a fixed-size copy: one of unknown length
                // would be a call to memcpy)
                if let Ok(whole) = <&mut [MaybeUninit<f32>; W]>::try_from(&mut row[c0..c0 + n]) {
                    *whole = acc.map(MaybeUninit::new);
                } else {
                    for (d, &v) in row[c0..c0 + n].iter_mut().zip(&acc) {
                        d.write(v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The explicit transforms are the tilings' matrices.
    #[test]
    fn transforms_are_the_matrices() {
        fn check<const A: usize, const M: usize>(
            t: &Tiling,
            bt: fn(&[V; A]) -> [V; A],
            at: fn(&[V; A]) -> [V; M],
        ) {
            for k in 0..A {
                // the unit vector e_k in lane 0 picks column k of each matrix
                let mut e = [[0f32; L]; A];
                e[k][0] = 1.0;
                let (b, y) = (bt(&e), at(&e));
                for i in 0..A {
                    assert_eq!(b[i][0], t.bt[i * A + k], "B^T[{i}][{k}] of F({}, 3)", t.m);
                }
                for i in 0..M {
                    assert_eq!(y[i][0], t.at[i * A + k], "A^T[{i}][{k}] of F({}, 3)", t.m);
                }
            }
        }
        check::<4, 2>(&F2, bt4, at4);
        check::<6, 4>(&F4, bt6, at6);
    }
}

