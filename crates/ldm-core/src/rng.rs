//! torch-compatible random numbers.
//!
//! `--seed S` means what it means in diffusers: the noise of
//! `torch.randn(shape, generator=torch.Generator().manual_seed(S))` on the CPU, in float32, drawn
//! in the same order. [`TorchGenerator`] reproduces PyTorch's CPU generator and its `normal_`
//! kernel (ATen `native/cpu/DistributionTemplates.h`):
//!
//! - the engine is MT19937 seeded with the low 32 bits of the seed;
//! - a float32 uniform is the low 24 bits of one 32-bit draw times 2^-24; a float64 uniform is
//!   the low 53 bits of a 64-bit draw made of two 32-bit draws, the first one high;
//! - for n >= 16 all n float32 uniforms are drawn first, then every block of 16 becomes 8
//!   Box-Muller pairs; when n is not a multiple of 16, 16 fresh uniforms are drawn over the last
//!   16 slots and those slots are computed again (so the tail overlaps the last full block);
//! - for n < 16 each value comes from torch's float64 `normal_distribution`: Box-Muller on two
//!   float64 uniforms, whose second value is cached on the generator and handed out by the next
//!   n < 16 draw, even one in a later call. The n >= 16 path neither uses nor clears that cache.
//!
//! On x86-64 torch runs the n >= 16 Box-Muller in AVX2 with the polynomial `log`/`sincos` of
//! `avx_mathfun.h` (Cephes single-precision approximations), compiled with floating-point
//! contraction, i.e. fused multiply-adds. [`TorchGenerator`] evaluates the same polynomials in the
//! same order, one lane at a time, with the same fused multiply-adds, which gives torch's float32
//! values bit for bit. (torch's portable kernel, used on ARM machines, calls `logf`/`cosf`/`sinf`
//! instead; its values differ from the x86-64 ones by up to about 2e-6.)

use crate::schedulers::NoiseSource;

/// The Mersenne Twister MT19937 (Matsumoto and Nishimura, 1998), as `at::mt19937`.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;

    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for j in 1..Self::N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 {
            state,
            next: Self::N,
        }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..Self::N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % Self::N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + Self::M) % Self::N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= Self::N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.Generator()` on the CPU, for `torch.randn`.
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    engine: Mt19937,
    /// The second value of the last float64 Box-Muller pair, not yet handed out
    /// (`CPUGeneratorImpl::next_double_normal_sample_`).
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator().manual_seed(seed)`. Only the low 32 bits seed the engine, as in torch:
    /// seeds that differ only above bit 31 give the same numbers.
    pub fn new(seed: u64) -> Self {
        TorchGenerator {
            seed,
            engine: Mt19937::new(seed as u32),
            next_double_normal: None,
        }
    }

    /// The seed this generator was made with (`Generator.initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// `torch.randn(n, generator=self)`: `n` standard normal float32 values. A tensor of any
    /// shape with `n` elements gets the same values in C order.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        self.randn_into(&mut out);
        out
    }

    /// [`TorchGenerator::randn`] into a buffer: `out.len()` values.
    pub fn randn_into(&mut self, out: &mut [f32]) {
        let n = out.len();
        if n < 16 {
            for v in out.iter_mut() {
                *v = self.normal_f64() as f32;
            }
            return;
        }
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        for block in out.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        let rest = n % 16;
        if rest != 0 {
            let tail = &mut out[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
    }

    /// One raw 32-bit draw of the engine (`CPUGeneratorImpl::random()`).
    pub fn next_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// `CPUGeneratorImpl::random64()`: two draws, the first one the high half.
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: in [0, 1), 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: in [0, 1), 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `normal_distribution<double>(0, 1)` with the generator's cache.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }
}

impl NoiseSource for TorchGenerator {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        TorchGenerator::randn(self, n)
    }
}

/// torch's `NormalFill16` (AVX2): 16 uniforms in [0, 1) become 8 Box-Muller pairs in place,
/// `d[j] = r cos(2 pi d[j+8])`, `d[j+8] = r sin(2 pi d[j+8])` with `r = sqrt(-2 ln(1 - d[j]))`.
fn box_muller_16(d: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2 pi rounded once, from double.
    let two_pi = std::f64::consts::TAU as f32;
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * cephes_log(u1)).sqrt();
        let (sin, cos) = cephes_sincos(two_pi * u2);
        d[j] = radius * cos;
        d[j + 8] = radius * sin;
    }
}

/// `a * b + c` rounded once, as the fused multiply-adds that the compiler makes of
/// avx_mathfun's separate multiplies and adds.
#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// `log256_ps` of avx_mathfun (Cephes `logf`) for one lane, for `x` in (0, 1] as Box-Muller
/// gives it (NaN for x <= 0 like the original). The constants are Cephes' decimals, rounded to
/// float32 as the C compiler rounds them.
#[allow(clippy::excessive_precision)]
fn cephes_log(x: f32) -> f32 {
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const P: [f32; 9] = [
        7.037_683_629_2E-2,
        -1.151_461_031_0E-1,
        1.167_699_874_0E-1,
        -1.242_014_084_6E-1,
        1.424_932_278_7E-1,
        -1.666_805_766_5E-1,
        2.000_071_476_5E-1,
        -2.499_999_399_3E-1,
        3.333_333_117_4E-1,
    ];
    const Q1: f32 = -2.121_944_40e-4;
    const Q2: f32 = 0.693_359_375;
    if x.is_nan() || x <= 0.0 {
        return f32::NAN;
    }
    // Cut off denormals, then split x = m * 2^e with m in [0.5, 1).
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    // m in [sqrt(1/2), sqrt(2)) - 1, exactly.
    if m < SQRTHF {
        e -= 1.0;
        m = (m - 1.0) + m;
    } else {
        m -= 1.0;
    }
    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = fma(y, m, p);
    }
    y *= m;
    y = fma(y, z, e * Q1);
    y -= z * 0.5;
    fma(e, Q2, m + y)
}

/// `sincos256_ps` of avx_mathfun (Cephes `sinf`/`cosf`) for one lane: (sin x, cos x).
#[allow(clippy::excessive_precision)]
fn cephes_sincos(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.273_239_544_735_16; // 4 / pi
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.418_756_484_985_351_562_5e-4;
    const DP3: f32 = -3.774_894_977_445_941_08e-8;
    const SIN_P: [f32; 3] = [-1.951_529_589_1E-4, 8.332_160_873_6E-3, -1.666_665_461_1E-1];
    const COS_P: [f32; 3] = [
        2.443_315_711_809_948E-005,
        -1.388_731_625_493_765E-003,
        4.166_664_568_298_827E-002,
    ];

    let sign_in = x.to_bits() & 0x8000_0000;
    let ax = x.abs();
    // Octant j, rounded up to even (`_mm256_cvttps_epi32` truncates; out of range gives i32::MIN).
    let t = ax * FOPI;
    let mut j = if t < 2_147_483_648.0 {
        t as i32
    } else {
        i32::MIN
    };
    j = j.wrapping_add(1) & !1;
    let y = j as f32;
    let sin_swap = ((j & 4) as u32) << 29;
    let cos_sign = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    let use_sin_poly_for_sin = (j & 2) == 0;
    // Extended-precision reduction: x - y * pi/4 in three parts.
    let mut r = fma(y, DP1, ax);
    r = fma(y, DP2, r);
    r = fma(y, DP3, r);
    let z = r * r;
    // cos polynomial on [-pi/4, pi/4]
    let mut c = fma(COS_P[0], z, COS_P[1]);
    c = fma(c, z, COS_P[2]);
    c *= z;
    c = fma(c, z, -(z * 0.5));
    c += 1.0;
    // sin polynomial on [-pi/4, pi/4]
    let mut s = fma(SIN_P[0], z, SIN_P[1]);
    s = fma(s, z, SIN_P[2]);
    s *= z;
    s = fma(s, r, r);
    let (sin_abs, cos_abs) = if use_sin_poly_for_sin { (s, c) } else { (c, s) };
    let sin = f32::from_bits(sin_abs.to_bits() ^ sign_in ^ sin_swap);
    let cos = f32::from_bits(cos_abs.to_bits() ^ cos_sign);
    (sin, cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_output() {
        // The 10000th output of std::mt19937 with the default seed 5489 is 4123659995 (C++11).
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn cephes_functions_are_close_to_libm() {
        let mut worst_log = 0f64;
        let mut worst_trig = 0f64;
        for i in 1..=100_000u32 {
            let u = i as f32 / 100_000.0;
            worst_log = worst_log.max((cephes_log(u) as f64 - (u as f64).ln()).abs());
            let t = u * std::f32::consts::TAU;
            let (s, c) = cephes_sincos(t);
            worst_trig = worst_trig.max((s as f64 - (t as f64).sin()).abs());
            worst_trig = worst_trig.max((c as f64 - (t as f64).cos()).abs());
        }
        assert!(worst_log < 1e-6, "log error {worst_log}");
        assert!(worst_trig < 1e-6, "sincos error {worst_trig}");
        assert!(cephes_log(0.0).is_nan() && cephes_log(-1.0).is_nan());
    }
}
