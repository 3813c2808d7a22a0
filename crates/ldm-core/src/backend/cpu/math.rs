//! Element-wise float math for the CPU kernels: exp, SiLU, GELU and softmax over slices, written
//! as plain loops that LLVM vectorises, compiled three times (baseline x86-64, AVX2+FMA and AVX-512) and chosen
//! at run time, since a portable build cannot assume AVX2.
//!
//! `exp` is the Cephes single-precision polynomial (relative error about 1e-7 over the range
//! that does not underflow); `erf` is Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7, 5e-7 with float32 rounding).
//! Both are well inside the 1e-4 the parity tests allow against diffusers.

use rayon::prelude::*;

/// Slices longer than this are split over the thread pool.
const PAR_CHUNK: usize = 1 << 15;

#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * ln2 is exact in its high part (Cody-Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // 2^n from the bits of 2^23 + 127 + n, whose low mantissa bits are the integer 127 + n
    // (2 ..= 254 here): a float-to-int cast would not vectorise (Rust's casts saturate).
    let biased = (n + (8_388_608.0 + 127.0)).to_bits().wrapping_sub(0x4b00_0000);
    y * f32::from_bits(biased << 23)
}

#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4f32;
    p = p * t - 1.453_152;
    p = p * t + 1.421_413_8;
    p = p * t - 0.284_496_74;
    p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Defines `$name(args)` that runs `$body` compiled for AVX-512 or AVX2+FMA where the processor
/// has them (the baseline build otherwise).
macro_rules! dispatch_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the processor has the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the processor has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use dispatch_fn as dispatch;

dispatch! {
    /// SiLU in place on this thread ([`silu_inplace`] spreads a long slice over the pool).
    pub(super) fn silu_seq(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = silu(*x);
        }
    }
}

dispatch! {
    /// The exact GELU in place on this thread ([`gelu_inplace`] spreads a long slice over the
    /// pool).
    pub(super) fn gelu_seq(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = gelu(*x);
        }
    }
}

dispatch! {
    /// `out = hidden * gelu(gate)`, element by element.
    fn geglu_seq(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
        for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
            *o = h * gelu(g);
        }
    }
}

/// Lanes of the reductions below: a float sum or maximum only vectorises when it is kept as
/// this many independent partial results (the compiler may not reorder float additions itself).
const LANES: usize = 16;

dispatch! {
    /// The largest of `xs` and `init`.
    pub fn row_max(xs: &[f32], init: f32, out: &mut f32) {
        let mut m = [init; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                m[i] = if c[i] > m[i] { c[i] } else { m[i] };
            }
        }
        let mut best = chunks.remainder().iter().fold(init, |a, &b| a.max(b));
        for v in m {
            best = best.max(v);
        }
        *out = best;
    }
}

dispatch! {
    /// `xs = exp(xs - shift)`, returning the sum of the results.
    pub fn exp_shifted(xs: &mut [f32], shift: f32, sum: &mut f32) {
        let mut acc = [0f32; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                c[i] = exp(c[i] - shift);
                acc[i] += c[i];
            }
        }
        let mut total = 0.0;
        for x in chunks.into_remainder() {
            *x = exp(*x - shift);
            total += *x;
        }
        *sum = total + acc.iter().sum::<f32>();
    }
}

/// `xs = softmax(scale * xs)` over one row.
pub fn softmax_row(xs: &mut [f32], scale: f32) {
    if scale != 1.0 {
        xs.iter_mut().for_each(|x| *x *= scale);
    }
    let mut max = f32::NEG_INFINITY;
    row_max(xs, f32::NEG_INFINITY, &mut max);
    let mut sum = 0.0;
    exp_shifted(xs, max, &mut sum);
    let inv = 1.0 / sum;
    xs.iter_mut().for_each(|x| *x *= inv);
}

fn par_map(xs: &mut [f32], f: fn(&mut [f32])) {
    if xs.len() > PAR_CHUNK {
        xs.par_chunks_mut(PAR_CHUNK).for_each(f);
    } else {
        f(xs);
    }
}

/// SiLU in place: `x * sigmoid(x)`.
pub fn silu_inplace(xs: &mut [f32]) {
    par_map(xs, silu_seq)
}

/// GELU with the exact erf (`torch.nn.functional.gelu`'s default) in place.
pub fn gelu_inplace(xs: &mut [f32]) {
    par_map(xs, gelu_seq)
}

/// GEGLU of rows of `2 * inner` values (`hidden`, then `gate`): rows of `inner` values
/// `hidden * gelu(gate)`.
pub fn geglu(h: &[f32], inner: usize) -> Vec<f32> {
    let rows = if inner == 0 { 0 } else { h.len() / (2 * inner) };
    let mut out = vec![0.0; rows * inner];
    let per_task = (PAR_CHUNK / inner.max(1)).max(1);
    out.par_chunks_mut(per_task * inner).zip(h.par_chunks(per_task * 2 * inner)).for_each(|(o, hh)| {
        for (orow, hrow) in o.chunks_mut(inner).zip(hh.chunks(2 * inner)) {
            let (hidden, gate) = hrow.split_at(inner);
            geglu_seq(orow, hidden, gate);
        }
    });
    out
}

/// Softmax over each row of `cols` values, in place.
pub fn softmax_rows(xs: &mut [f32], cols: usize) {
    if cols == 0 {
        return;
    }
    let per_task = (PAR_CHUNK / cols).max(1) * cols;
    xs.par_chunks_mut(per_task).for_each(|c| c.chunks_mut(cols).for_each(|r| softmax_row(r, 1.0)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst_exp = 0.0f64;
        let mut worst_erf = 0.0f64;
        for i in 0..=200_000 {
            let x = (-80.0 + 160.0 * i as f64 / 200_000.0) as f32;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst_exp = worst_exp.max(rel);
            let y = -6.0 + 12.0 * i as f64 / 200_000.0;
            worst_erf = worst_erf.max((erf(y as f32) as f64 - libm_erf(y)).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 1e-6, "erf absolute error {worst_erf}");
        assert_eq!(exp(-1000.0).max(0.0) < 1e-37, true);
        // the ends of the clamp, and NaN passed through
        for x in [-87.0f32, 88.0] {
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            assert!(rel < 3e-7, "exp({x}): relative error {rel}");
        }
        assert!(exp(1000.0).is_finite() && exp(f32::NAN).is_nan());
    }

    /// erf by its Maclaurin series / continued fraction in f64, as the reference.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let mut sum = 0.0f64;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 5.0 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction
            let a = x.abs();
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
            (1.0 - erfc) * x.signum()
        }
    }

    #[test]
    fn silu_gelu_geglu_softmax_match_their_definitions() {
        let xs: Vec<f32> = (0..100_003).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let mut s = xs.clone();
        silu_inplace(&mut s);
        let mut g = xs.clone();
        gelu_inplace(&mut g);
        for (i, &x) in xs.iter().enumerate() {
            let x64 = x as f64;
            let want = x64 / (1.0 + (-x64).exp());
            assert!((s[i] as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "silu({x})");
            let want = 0.5 * x64 * (1.0 + libm_erf(x64 / 2f64.sqrt()));
            assert!((g[i] as f64 - want).abs() < 2e-6 * x64.abs().max(1.0), "gelu({x}) = {} vs {want}", g[i]);
        }
        let h: Vec<f32> = xs[..6 * 10].to_vec();
        let out = geglu(&h, 5);
        for r in 0..6 {
            for j in 0..5 {
                let want = h[r * 10 + j] * gelu(h[r * 10 + 5 + j]);
                assert_eq!(out[r * 5 + j], want);
            }
        }
        let mut rows = xs[..7 * 13].to_vec();
        softmax_rows(&mut rows, 13);
        for (r, row) in rows.chunks(13).enumerate() {
            let src = &xs[r * 13..(r + 1) * 13];
            let m = src.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let sum: f64 = src.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (j, &p) in row.iter().enumerate() {
                assert!((p as f64 - (src[j] as f64 - m).exp() / sum).abs() < 1e-6);
            }
        }
    }
}
