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
//! and decoders' work) are done by Winograd's minimal filtering instead ([`super::winograd`]).

use rayon::prelude::*;

use super::bf16::SendPtr;
use super::gemm::{gemm, Mat, MatMut, Par};
use super::winograd::{self, Prologue};
use crate::{Error, Result};

/// The most `cols` elements of one band, and of each of the Winograd transform's two band
/// buffers (4 MiB of float32: in 2-thread A/B runs of the UNet steps and decoders no slower than
/// 16 MiB, and 25 MiB less at the VQ decoder's peak).
const BAND_ELEMS: usize = 1 << 20;
/// Output planes smaller than this are done for all images in one product (the small feature
/// maps of a UNet's inner blocks have 16 or 64 positions per image: a product per image would
/// read the whole weight for each).
const BATCH_PLANE: usize = 1024;

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
    conv2d_banded(x, weight, bias, s, Prologue::default(), BAND_ELEMS)
}

/// [`conv2d`] of the input that `pro` makes from `x` (`s` is the shape of that input). The
/// Winograd path makes it a row at a time as it reads it; the others make the whole map first.
pub fn conv2d_with(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape, pro: Prologue<'_>) -> Result<Vec<f32>> {
    conv2d_banded(x, weight, bias, s, pro, BAND_ELEMS)
}

fn conv2d_banded(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: ConvShape,
    pro: Prologue<'_>,
    band_elems: usize,
) -> Result<Vec<f32>> {
    let (oh, ow) = s.out_hw()?;
    if s.c * s.h * s.w == 0 {
        return Err(Error::Backend(format!("conv2d: empty input planes in {s:?}")));
    }
    let k = s.c * s.kh * s.kw;
    let stored = if pro.up2 { (s.h / 2) * (s.w / 2) } else { s.h * s.w };
    if (pro.up2 && (!s.h.is_multiple_of(2) || !s.w.is_multiple_of(2))) || pro.norm_silu.is_some_and(|(a, b)| a.len() != s.n * s.c || b.len() != s.n * s.c) {
        return Err(Error::Backend(format!("conv2d: {pro:?} does not fit {s:?}")));
    }
    if x.len() != s.n * s.c * stored || weight.len() != s.o * k || bias.is_some_and(|b| b.len() != s.o) {
        return Err(Error::Backend(format!("conv2d: buffer sizes do not match {s:?}")));
    }
    let plane = oh * ow;
    let mut out = vec![0f32; s.n * s.o * plane];
    if let Some(tiling) = winograd::choose(s) {
        winograd::conv3x3(tiling, x, weight, bias, s, pro, &mut out, band_elems)?;
        return Ok(out);
    }
    let made;
    let x = if pro.is_identity() {
        x
    } else {
        made = pro.apply(x, s);
        &made[..]
    };
    let w = Mat::rows(weight, s.o, k);
    if s.n > 1 && plane < BATCH_PLANE && k * s.n * plane <= band_elems {
        // small feature maps: every image's columns side by side in one product
        let np = s.n * plane;
        let mut cols = vec![0f32; k * np];
        for (i, img) in x.chunks(s.c * s.h * s.w).enumerate() {
            im2col(img, &mut cols, np, i * plane, s, 0, oh, ow);
        }
        let mut prod = vec![0f32; s.o * np];
        gemm(MatMut::rows(&mut prod, s.o, np), w, Mat::rows(&cols, k, np), false, Par::Auto)?;
        out.par_chunks_mut(plane).enumerate().for_each(|(io, dst)| {
            let (i, oc) = (io / s.o, io % s.o);
            let b = bias.map_or(0.0, |b| b[oc]);
            for (d, &v) in dst.iter_mut().zip(&prod[oc * np + i * plane..][..plane]) {
                *d = v + b;
            }
        });
        return Ok(out);
    }
    if let Some(b) = bias {
        out.par_chunks_mut(plane.max(1)).enumerate().for_each(|(i, p)| p.fill(b[i % s.o]));
    }
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
            im2col(img, &mut cols[..k * p], p, 0, s, y0, rows, ow);
            let band = MatMut { data: &mut dst[y0 * ow..], rows: s.o, cols: p, rs: plane, cs: 1 };
            gemm(band, w, Mat::rows(&cols[..k * p], k, p), bias.is_some(), Par::Auto)?;
            y0 += rows;
        }
    }
    Ok(out)
}

/// Positions per task of [`conv1x1_in_place`].
const IN_PLACE_BLOCK: usize = 512;

/// A 1x1 convolution (stride 1, no padding) of one image to no more channels than it reads,
/// computed in the input's own buffer: `x` holds the `(c, p)` input planes on entry and the
/// `(o, p)` output planes (plus `bias`) in its first `o * p` values on return; the rest is left
/// unspecified, for the caller to release. The positions are split in blocks, each task
/// gathering every input channel of its block before writing that block's outputs, and writing
/// no other positions: no task reads what another writes.
pub fn conv1x1_in_place(x: &mut [f32], weight: &[f32], bias: Option<&[f32]>, c: usize, o: usize, p: usize) -> Result<()> {
    if o > c || x.len() != c * p || weight.len() != o * c || bias.is_some_and(|b| b.len() != o) {
        return Err(Error::Backend(format!("conv1x1_in_place: {c} -> {o} channels of {p} positions do not match the buffers")));
    }
    let w = Mat::rows(weight, o, c);
    // the tasks' reads and writes are disjoint (each touches its own positions only)
    let base = SendPtr(x.as_mut_ptr());
    (0..p.div_ceil(IN_PLACE_BLOCK)).into_par_iter().try_for_each_init(
        || (vec![0f32; c * IN_PLACE_BLOCK], vec![0f32; o * IN_PLACE_BLOCK]),
        |(cols, prod), bi| {
            let (p0, n) = (bi * IN_PLACE_BLOCK, IN_PLACE_BLOCK.min(p - bi * IN_PLACE_BLOCK));
            for (ci, dst) in cols[..c * n].chunks_exact_mut(n).enumerate() {
                // SAFETY: positions p0 .. p0 + n of plane ci lie inside x, and no other task
                // reads or writes them (each writes its own positions of the first o planes)
                dst.copy_from_slice(unsafe { std::slice::from_raw_parts(base.get().wrapping_add(ci * p + p0), n) });
            }
            let prod = &mut prod[..o * n];
            if let Some(b) = bias {
                prod.chunks_exact_mut(n).zip(b).for_each(|(row, &v)| row.fill(v));
            }
            gemm(MatMut::rows(prod, o, n), w, Mat::rows(&cols[..c * n], c, n), bias.is_some(), Par::Seq)?;
            for (oi, src) in prod.chunks_exact(n).enumerate() {
                // SAFETY: as above; this block's inputs were all read into cols first
                unsafe { std::slice::from_raw_parts_mut(base.get().wrapping_add(oi * p + p0), n) }.copy_from_slice(src);
            }
            Ok(())
        },
    )
}

/// The `cols` matrix of output rows `y0 .. y0 + rows`: row `(ci, ky, kx)` holds, for each output
/// position, the input value under kernel tap `(ky, kx)` of channel `ci` (0 in the padding).
/// Rows are `ld` apart in `cols`, and these positions' columns start at `off`.
#[allow(clippy::too_many_arguments)]
fn im2col(img: &[f32], cols: &mut [f32], ld: usize, off: usize, s: ConvShape, y0: usize, rows: usize, ow: usize) {
    let p = rows * ow;
    let taps = s.kh * s.kw;
    cols.par_chunks_mut(taps * ld).enumerate().for_each(|(ci, chunk)| {
        let plane = &img[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let row = &mut chunk[(ky * s.kw + kx) * ld + off..][..p];
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
    fn both_winograd_tilings_match_the_definition() {
        // sides that are and are not multiples of the tile, one band and several
        for (n, c, h, w, o) in [(1, 5, 8, 8, 3), (2, 6, 13, 10, 4), (1, 3, 22, 31, 7), (1, 9, 1, 6, 2)] {
            let s = ConvShape { n, c, h, w, o, kh: 3, kw: 3, stride: 1, padding: 1 };
            let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
            let wt: Vec<f32> = (0..o * c * 9).map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0).collect();
            let b: Vec<f32> = (0..o).map(|i| i as f32 * 0.25 - 0.5).collect();
            let want = naive(&x, &wt, &b, s);
            for (name, tiling) in [("F(2x2, 3x3)", &winograd::F2), ("F(4x4, 3x3)", &winograd::F4)] {
                // on many threads each position's product is split into blocks of output channels
                for threads in [1, 2, 24] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    for band in [BAND_ELEMS, 36 * c.max(o) * w.div_ceil(2)] {
                        let mut got = vec![0f32; want.len()];
                        pool.install(|| winograd::conv3x3(tiling, &x, &wt, Some(&b), s, Prologue::default(), &mut got, band)).unwrap();
                        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                        assert!(err < 1e-4, "{name}, {s:?}, {threads} threads, band {band}: {err}");
                    }
                }
            }
        }
        let big = ConvShape { n: 1, c: 4, h: 64, w: 64, o: 4, kh: 3, kw: 3, stride: 1, padding: 1 };
        assert!(std::ptr::eq(winograd::choose(big).unwrap(), &winograd::F4));
        // 64 tiles of F(4x4): while its kernel transform is small (16 MiB), else F(2x2)
        assert!(std::ptr::eq(winograd::choose(ConvShape { h: 32, w: 32, c: 320, o: 320, ..big }).unwrap(), &winograd::F4));
        assert!(std::ptr::eq(winograd::choose(ConvShape { h: 32, w: 32, c: 512, o: 512, ..big }).unwrap(), &winograd::F2));
        assert!(winograd::choose(ConvShape { h: 16, w: 16, ..big }).is_none());
        // no channels: the banded product (bias only), not a tiling
        // no channels, or empty planes: refused, not a panic
        assert!(winograd::choose(ConvShape { c: 0, ..big }).is_none());
        let e = conv2d(&[], &[], None, ConvShape { c: 0, ..big }).unwrap_err();
        assert!(e.to_string().contains("empty input"), "{e}");
        let e = conv2d(&[], &[0.0; 36], None, ConvShape { h: 0, padding: 2, ..big }).unwrap_err();
        assert!(e.to_string().contains("empty input"), "{e}");
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
                let got = conv2d_banded(&x, &wt, Some(&b), s, Prologue::default(), band).unwrap();
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(err < 1e-4, "{s:?}, band {band}: {err}");
            }
        }
    }

    #[test]
    fn prologues_give_the_convolution_of_the_map_they_stand_for() {
        // (n, c, stored h, stored w, o, up2, norm): the Winograd tilings (both sizes, several
        // bands) make the input a row at a time; the other paths make the whole map first
        for (n, c, h, w, o, up2, norm) in [
            (1, 3, 16, 12, 4, true, false),
            (1, 3, 24, 24, 2, true, true),
            (2, 5, 7, 9, 3, true, true),
            (1, 4, 40, 36, 5, false, true),
            (2, 3, 12, 12, 2, false, true),
            (1, 2, 3, 4, 3, true, true),
            (1, 3, 2, 2, 2, false, true),
        ] {
            let f = if up2 { 2 } else { 1 };
            let s = ConvShape { n, c, h: f * h, w: f * w, o, kh: 3, kw: 3, stride: 1, padding: 1 };
            let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 7919) % 101) as f32 / 25.0 - 2.0).collect();
            let wt: Vec<f32> = (0..o * c * 9).map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0).collect();
            let b: Vec<f32> = (0..o).map(|i| i as f32 * 0.25 - 0.5).collect();
            let a_: Vec<f32> = (0..n * c).map(|k| 0.5 + k as f32 * 0.3).collect();
            let b_: Vec<f32> = (0..n * c).map(|k| k as f32 * 0.2 - 0.7).collect();
            // the map by the definitions: nearest upsampling, then silu(x a + b) per (image, channel)
            let mut map = vec![0f32; n * c * s.h * s.w];
            for k in 0..n * c {
                for y in 0..s.h {
                    for xx in 0..s.w {
                        let mut v = x[(k * h + y / f) * w + xx / f] as f64;
                        if norm {
                            v = v * a_[k] as f64 + b_[k] as f64;
                            v /= 1.0 + (-v).exp();
                        }
                        map[(k * s.h + y) * s.w + xx] = v as f32;
                    }
                }
            }
            let want = naive(&map, &wt, &b, s);
            let pro = Prologue { up2, norm_silu: norm.then_some((&a_[..], &b_[..])) };
            let winograd = winograd::choose(s).map(|t| t.m);
            for band in [BAND_ELEMS, 36 * c.max(o) * s.w.div_ceil(2)] {
                let got = conv2d_banded(&x, &wt, Some(&b), s, pro, band).unwrap();
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(err < 1e-4, "{s:?} {pro:?} (winograd tile {winograd:?}), band {band}: {err}");
            }
        }
        // a prologue that does not fit the shape is refused
        let s = ConvShape { n: 1, c: 2, h: 5, w: 4, o: 1, kh: 3, kw: 3, stride: 1, padding: 1 };
        let up = Prologue { up2: true, norm_silu: None };
        assert!(conv2d_with(&[0.0; 10], &[0.0; 18], None, s, up).unwrap_err().to_string().contains("does not fit"));
        let short = [1.0f32; 1];
        let pro = Prologue { up2: false, norm_silu: Some((&short[..], &short[..])) };
        assert!(conv2d_with(&[0.0; 40], &[0.0; 18], None, s, pro).unwrap_err().to_string().contains("does not fit"));
    }
}
