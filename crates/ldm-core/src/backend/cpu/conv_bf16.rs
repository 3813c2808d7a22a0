//! Convolutions with bf16 weights, on Intel AMX only (elsewhere the f32 convolutions of
//! [`super::conv`] are faster than bf16 products).
//!
//! The weight `(O, C, kh, kw)` is reordered to `(O, kh, kw, C)` and packed by [`bf16::pack`] as
//! the `O x (kh kw C)` matrix of a linear layer. The input is turned once into zero-padded
//! channels-last bf16 pairs, `(N, H + 2p, W + 2p, C / 2)`, so that the matrix row of an output
//! position is `kh kw` contiguous runs of `C / 2` pairs copied side by side. The rows of all
//! images go through the bf16 products together (the small feature maps of a UNet's inner
//! blocks have only 16 or 64 positions per image: batching them halves how often the weight is
//! read), a band of positions at a time, and the channels-last products are transposed back
//! into NCHW.
//!
//! Where F(4x4, 3x3) Winograd applies (large feature maps), its f32 products on a quarter of the
//! multiplications are faster still: those convolutions unpack the weight and run in f32.

use half::bf16;
use rayon::prelude::*;

use super::bf16 as b16;
use super::conv::{self, ConvShape};
use super::winograd;
use crate::{Error, Result};

/// The most input pairs of one band of positions (16 MiB).
const BAND_PAIRS: usize = 1 << 22;

/// Whether a weight `(o, c, kh, kw)` is kept as bf16: on AMX, with `c` a multiple of 32 (so that
/// every run of a row is whole tiles) and `o` of the panel width.
pub fn packable(o: usize, c: usize, kh: usize, kw: usize) -> bool {
    b16::kernel() == b16::Kernel::Amx && kh * kw > 0 && c.is_multiple_of(32) && b16::packable(o, c * kh * kw)
}

/// The weight `(o, c, kh, kw)`, row-major, reordered and packed as described above.
pub fn pack(w: &[f32], o: usize, c: usize, kh: usize, kw: usize) -> Result<Vec<bf16>> {
    let taps = kh * kw;
    if w.len() != o * c * taps {
        return Err(Error::Backend(format!("a {o}x{c}x{kh}x{kw} convolution weight of {} values", w.len())));
    }
    let mut r = vec![0f32; w.len()];
    r.par_chunks_mut(c * taps).zip(w.par_chunks(c * taps)).for_each(|(dst, src)| {
        for ci in 0..c {
            for t in 0..taps {
                dst[t * c + ci] = src[ci * taps + t];
            }
        }
    });
    b16::pack(&r, o, c * taps)
}

/// The f32 weight `(o, c, kh, kw)` (its values rounded to bf16) of a [`pack`]ed one.
pub fn unpack(packed: &[bf16], o: usize, c: usize, kh: usize, kw: usize) -> Vec<f32> {
    let taps = kh * kw;
    let r = b16::unpack(packed, o, c * taps);
    let mut w = vec![0f32; r.len()];
    w.par_chunks_mut(c * taps).zip(r.par_chunks(c * taps)).for_each(|(dst, src)| {
        for ci in 0..c {
            for t in 0..taps {
                dst[ci * taps + t] = src[t * c + ci];
            }
        }
    });
    w
}

/// `x (n, c, h, w)` convolved with a [`pack`]ed weight plus `bias`: `(n, o, oh, ow)`.
pub fn conv2d(x: &[f32], packed: &[bf16], bias: Option<&[f32]>, s: ConvShape) -> Result<Vec<f32>> {
    let (oh, ow) = s.out_hw()?;
    let (taps, cp) = (s.kh * s.kw, s.c / 2);
    if x.len() != s.n * s.c * s.h * s.w || packed.len() != s.o * s.c * taps || !s.c.is_multiple_of(2) || s.c * s.h * s.w == 0 {
        return Err(Error::Backend(format!("bf16 conv2d: buffer sizes do not match {s:?}")));
    }
    if winograd::choose(s).is_some_and(|t| std::ptr::eq(t, &winograd::F4)) {
        return conv::conv2d(x, &unpack(packed, s.o, s.c, s.kh, s.kw), bias, s);
    }
    let (hp, wp) = (s.h + 2 * s.padding, s.w + 2 * s.padding);
    let xin = channels_last_pairs(x, s);
    let plane = oh * ow;
    let positions = s.n * plane;
    let kp = taps * cp;
    let band = (BAND_PAIRS / kp).min(positions.next_multiple_of(32)).max(32) / 32 * 32;
    let mut out = vec![0f32; s.n * s.o * plane];
    let mut prod = vec![0f32; band.min(positions) * s.o];
    let mut g0 = 0;
    while g0 < positions {
        let rows = band.min(positions - g0);
        let mut a = Vec::with_capacity(rows.next_multiple_of(32) * kp);
        a.resize(rows * kp, 0u32);
        a.par_chunks_mut(kp).enumerate().for_each(|(r, row)| {
            let g = g0 + r;
            let (img, p) = (g / plane, g % plane);
            let (oy, ox) = (p / ow, p % ow);
            for ky in 0..s.kh {
                let y = oy * s.stride + ky;
                for kx in 0..s.kw {
                    let at = ((img * hp + y) * wp + ox * s.stride + kx) * cp;
                    row[(ky * s.kw + kx) * cp..][..cp].copy_from_slice(&xin[at..at + cp]);
                }
            }
        });
        b16::linear_pairs(&mut prod[..rows * s.o], a, packed, bias, s.c * taps, s.o)?;
        scatter(&prod[..rows * s.o], &mut out, g0, rows, s.o, plane);
        g0 += rows;
    }
    Ok(out)
}

/// `x (n, c, h, w)` as bf16 channel pairs `(n, h + 2p, w + 2p, c / 2)` with zero padding.
fn channels_last_pairs(x: &[f32], s: ConvShape) -> Vec<u32> {
    let (hp, wp, cp, p) = (s.h + 2 * s.padding, s.w + 2 * s.padding, s.c / 2, s.padding);
    let mut xin = vec![0u32; s.n * hp * wp * cp];
    xin.par_chunks_mut(wp * cp).enumerate().for_each(|(row, dst)| {
        let (img, y) = (row / hp, row % hp);
        if y < p || y >= p + s.h {
            return;
        }
        let img = &x[img * s.c * s.h * s.w..][..s.c * s.h * s.w];
        let at = (y - p) * s.w;
        for q in 0..cp {
            let (lo, hi) = (&img[2 * q * s.h * s.w + at..][..s.w], &img[(2 * q + 1) * s.h * s.w + at..][..s.w]);
            for (xx, (&l, &h)) in lo.iter().zip(hi).enumerate() {
                dst[(xx + p) * cp + q] = b16::pair(l, h);
            }
        }
    });
    xin
}

/// Positions `g0 .. g0 + rows` (over all images, `plane` per image) of the channels-last `prod
/// (rows, o)` into `out (n, o, plane)`, 16 channels (one cache line of a row) per task.
fn scatter(prod: &[f32], out: &mut [f32], g0: usize, rows: usize, o: usize, plane: usize) {
    const B: usize = 16; // `o` is a multiple of the panel width, so of this
    out.par_chunks_mut(B * plane).enumerate().for_each(|(blk, dst)| {
        let (img, oc0) = (blk * B / o, blk * B % o);
        // this image's positions inside the band, B at a time through a B x B block
        let (lo, hi) = ((img * plane).max(g0), ((img + 1) * plane).min(g0 + rows));
        let mut t = [[0f32; B]; B];
        for g in (lo..hi).step_by(B) {
            let len = B.min(hi - g);
            for (i, row) in t.iter_mut().enumerate().take(len) {
                row.copy_from_slice(&prod[(g + i - g0) * o + oc0..][..B]);
            }
            let p = g - img * plane;
            for (j, col) in dst.chunks_exact_mut(plane).enumerate() {
                for (i, d) in col[p..p + len].iter_mut().enumerate() {
                    *d = t[i][j];
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_convolutions_are_those_of_the_rounded_operands() {
        if b16::kernel() != b16::Kernel::Amx {
            assert!(!packable(32, 32, 3, 3), "bf16 convolutions only on AMX");
            return;
        }
        let round = |v: f32| f32::from_bits((b16::round(v) as u32) << 16);
        // 3x3 with padding (several images, a band that splits them), stride 2, 1x1, and a size
        // F(4x4, 3x3) takes (f32 products of the rounded weight)
        for (n, c, h, w, o, k, stride, padding) in
            [(2, 64, 5, 7, 32, 3, 1, 1), (3, 32, 9, 8, 64, 3, 2, 1), (2, 96, 4, 4, 32, 1, 1, 0), (1, 32, 64, 64, 32, 3, 1, 1)]
        {
            let s = ConvShape { n, c, h, w, o, kh: k, kw: k, stride, padding };
            assert!(packable(o, c, k, k));
            let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
            let wt: Vec<f32> = (0..o * c * k * k).map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0).collect();
            let b: Vec<f32> = (0..o).map(|i| i as f32 * 0.25 - 0.5).collect();
            let packed = pack(&wt, o, c, k, k).unwrap();
            let rounded: Vec<f32> = wt.iter().map(|&v| round(v)).collect();
            assert_eq!(unpack(&packed, o, c, k, k), rounded);
            let winograd = winograd::choose(s).is_some_and(|t| std::ptr::eq(t, &winograd::F4));
            let xr: Vec<f32> = if winograd { x.clone() } else { x.iter().map(|&v| round(v)).collect() };
            let want = conv::conv2d(&xr, &rounded, Some(&b), s).unwrap();
            let got = conv2d(&x, &packed, Some(&b), s).unwrap();
            assert_eq!(got.len(), want.len());
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-3, "{s:?}: {err}");
        }
        assert!(conv2d(&[0.0; 10], &pack(&[0.0; 32 * 32 * 9], 32, 32, 3, 3).unwrap(), None,
            ConvShape { n: 1, c: 32, h: 4, w: 4, o: 32, kh: 3, kw: 3, stride: 1, padding: 1 }).is_err());
    }
}
