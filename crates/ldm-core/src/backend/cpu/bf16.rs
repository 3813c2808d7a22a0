//! Linear layers with bfloat16 weights: `x W^T` with both operands rounded to bf16 and the
//! products summed in f32, on Intel AMX (`tdpbf16ps`, [`super::amx`]) where the CPU has it, on
//! AVX512-BF16 (`vdpbf16ps`, two products per f32 lane per instruction) else, and on a portable
//! loop with the same arithmetic elsewhere ([`Kernel`]).
//!
//! A weight `w (out, in)` is packed once, at load, into panels of [`NR`] output columns: for
//! each pair of input positions `(2q, 2q + 1)`, the panel holds the [`NR`] columns' two values
//! side by side, which is the operand order `vdpbf16ps` multiplies. The packed weight is a bf16
//! tensor of shape `(out / NR, in / 2, 2 NR)`, so a weight is packed only when `out` is a multiple
//! of [`NR`] and `in` is even (every linear layer of the LDM models is); others stay f32.

use half::bf16;
use rayon::prelude::*;

use crate::{Error, Result};

/// Output columns per panel (two AVX-512 registers of f32).
pub const NR: usize = 32;
/// Rows of `x` per micro-kernel call (12 x 2 accumulators of the 32 registers).
const MR: usize = 12;
/// Input pairs per block: one block of a panel is 16 KiB, read from L1 by every row block.
const KC: usize = 128;
/// Rows of `x` per parallel task.
const MC: usize = 8 * MR;
/// Products smaller than this many multiply-adds run on the calling thread.
const PARALLEL_MIN: usize = 1 << 18;

/// `x` rounded to the nearest bf16, ties to even; NaN stays NaN.
pub fn round(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Whether a `(out, in)` weight can be packed.
pub fn packable(out_dim: usize, in_dim: usize) -> bool {
    out_dim > 0 && in_dim > 0 && out_dim.is_multiple_of(NR) && in_dim.is_multiple_of(2)
}

/// The packed form of `w (out, in)`, row-major, in the layout described above.
pub fn pack(w: &[f32], out_dim: usize, in_dim: usize) -> Result<Vec<bf16>> {
    if !packable(out_dim, in_dim) || w.len() != out_dim * in_dim {
        return Err(Error::Backend(format!(
            "a {out_dim}x{in_dim} weight of {} values cannot be packed as bf16",
            w.len()
        )));
    }
    let pairs = in_dim / 2;
    let mut packed = vec![bf16::ZERO; w.len()];
    packed
        .par_chunks_mut(pairs * 2 * NR)
        .enumerate()
        .for_each(|(p, panel)| {
            for j in 0..NR {
                let row = &w[(p * NR + j) * in_dim..][..in_dim];
                for q in 0..pairs {
                    panel[(q * NR + j) * 2] = bf16::from_bits(round(row[2 * q]));
                    panel[(q * NR + j) * 2 + 1] = bf16::from_bits(round(row[2 * q + 1]));
                }
            }
        });
    Ok(packed)
}

/// The rows of `x (rows, in)` as bf16 pairs ([`pair`]), with room for the AMX kernel's padding.
fn pairs_of(x: &[f32], in_dim: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity((x.len() / in_dim.max(1)).next_multiple_of(32) * (in_dim / 2));
    out.resize(x.len() / 2, 0u32);
    out.par_chunks_mut((in_dim / 2).max(1))
        .zip(x.par_chunks(in_dim.max(1)))
        .for_each(|(o, r)| {
            for (o, p) in o.iter_mut().zip(r.chunks_exact(2)) {
                *o = pair(p[0], p[1]);
            }
        });
    out
}

/// The f32 values of a weight [`pack`] made, row-major `(out, in)` again (rounded to bf16).
pub fn unpack(packed: &[bf16], out_dim: usize, in_dim: usize) -> Vec<f32> {
    let pairs = in_dim / 2;
    let mut w = vec![0f32; out_dim * in_dim];
    w.par_chunks_mut(NR * in_dim).zip(packed.par_chunks(pairs * 2 * NR)).for_each(|(rows, panel)| {
        for (j, row) in rows.chunks_exact_mut(in_dim).enumerate() {
            for q in 0..pairs {
                row[2 * q] = panel[(q * NR + j) * 2].to_f32();
                row[2 * q + 1] = panel[(q * NR + j) * 2 + 1].to_f32();
            }
        }
    });
    w
}

/// `out (rows, out_dim) = x w^T + bias` for `w` as [`pack`] made it.
pub fn linear(
    out: &mut [f32],
    x: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    in_dim: usize,
    out_dim: usize,
) -> Result<()> {
    if !packable(out_dim, in_dim) || !x.len().is_multiple_of(in_dim) {
        return Err(Error::Backend(format!(
            "bf16 linear: {} inputs of width {in_dim} for a {out_dim}x{in_dim} weight",
            x.len()
        )));
    }
    linear_pairs(out, pairs_of(x, in_dim), w, bias, in_dim, out_dim)
}

/// Which instructions the products run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX tiles (`tdpbf16ps`), for inputs whose width is a multiple of 32; others on
    /// [`Kernel::Avx512`].
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`).
    Avx512,
    /// Plain loops.
    Portable,
}

/// The fastest kernel this CPU (and OS, for AMX) allows.
pub fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if native() {
        return if super::amx::available() { Kernel::Amx } else { Kernel::Avx512 };
    }
    Kernel::Portable
}

/// The kernels this machine can run, fastest first (tests run each).
pub fn kernels() -> Vec<Kernel> {
    match kernel() {
        Kernel::Amx => vec![Kernel::Amx, Kernel::Avx512, Kernel::Portable],
        Kernel::Avx512 => vec![Kernel::Avx512, Kernel::Portable],
        Kernel::Portable => vec![Kernel::Portable],
    }
}

/// [`linear`] on a chosen kernel, which must be one of [`kernels`] (the tests run each).
#[cfg(test)]
fn linear_on(
    kernel: Kernel,
    out: &mut [f32],
    x: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    in_dim: usize,
    out_dim: usize,
) {
    products_on(kernel, out, pairs_of(x, in_dim), w, bias, in_dim, out_dim);
}

/// Two values as one bf16 pair, the low half holding the first: the input form of the products.
pub fn pair(lo: f32, hi: f32) -> u32 {
    round(lo) as u32 | (round(hi) as u32) << 16
}

/// [`linear`] for an input already made of bf16 pairs ([`pair`]), `in_dim / 2` per row, given
/// as a vector so that the AMX kernel can pad it to whole blocks in place (reserve capacity for
/// rows up to a multiple of 32 to spare it a copy).
pub fn linear_pairs(out: &mut [f32], a: Vec<u32>, w: &[bf16], bias: Option<&[f32]>, in_dim: usize, out_dim: usize) -> Result<()> {
    let pairs = in_dim / 2;
    if !packable(out_dim, in_dim) || w.len() != out_dim * in_dim || !a.len().is_multiple_of(pairs) {
        return Err(Error::Backend(format!("bf16 linear: {} input pairs of width {in_dim} for a {out_dim}x{in_dim} weight", a.len())));
    }
    if out.len() != a.len() / pairs * out_dim || bias.is_some_and(|b| b.len() != out_dim) {
        return Err(Error::Backend(format!("bf16 linear: an output of {} values for {} rows of {out_dim}", out.len(), a.len() / pairs)));
    }
    products_on(kernel(), out, a, w, bias, in_dim, out_dim);
    Ok(())
}

/// The products of [`linear_pairs`] on a chosen kernel.
fn products_on(
    kernel: Kernel,
    out: &mut [f32],
    a: Vec<u32>,
    w: &[bf16],
    bias: Option<&[f32]>,
    in_dim: usize,
    out_dim: usize,
) {
    let pairs = in_dim / 2;
    let rows = a.len() / pairs;
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Amx && in_dim.is_multiple_of(2 * super::amx::PAIRS) {
        linear_amx(out, a, w, bias, in_dim, out_dim);
        return;
    }
    // SAFETY (of the raw writes below): every task writes its own rows x columns rectangle.
    let dst = SendPtr(out.as_mut_ptr());
    let panels = out_dim / NR;
    let row_tasks = rows.div_ceil(MC);
    let native = kernel != Kernel::Portable;
    let task = |t: usize| {
        let (p, rc) = (t % panels, t / panels);
        let panel = &w[p * pairs * 2 * NR..][..pairs * 2 * NR];
        let bias = bias.map(|b| &b[p * NR..][..NR]);
        let (r0, r1) = (rc * MC, (rc * MC + MC).min(rows));
        for q0 in (0..pairs).step_by(KC) {
            let kc = KC.min(pairs - q0);
            for i in (r0..r1).step_by(MR) {
                let block = Block {
                    // rows i..i+mr and columns p*NR..p*NR+NR lie inside `out` (checked above)
                    // and belong to this task alone
                    c: dst.get().wrapping_add(i * out_dim + p * NR),
                    ldc: out_dim,
                    a: &a[i * pairs + q0..],
                    lda: pairs,
                    b: &panel[q0 * 2 * NR..][..kc * 2 * NR],
                    kc,
                    mr: MR.min(r1 - i),
                    init: if q0 == 0 { Init::Bias(bias) } else { Init::Accumulate },
                };
                // SAFETY: `c` as said where it is formed.
                unsafe { block.run(native) };
            }
        }
    };
    run_tasks(panels * row_tasks, rows * out_dim * in_dim, task);
}

/// Tasks `0..tasks` on the thread pool, or on this thread for small products (also the f32
/// linear layers' [`super::linear`]).
pub(super) fn run_tasks(tasks: usize, work: usize, task: impl Fn(usize) + Sync + Send) {
    if work >= PARALLEL_MIN && rayon::current_num_threads() > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Row blocks of [`super::amx::ROWS`] per AMX task: a task reads its panel once for up to 192 rows.
#[cfg(target_arch = "x86_64")]
const AMX_BLOCKS: usize = 6;

/// [`linear`] on AMX tiles, for `in_dim` a multiple of 32: the input is padded with zero rows to
/// whole blocks, each block's 32 x 32 sums land in a scratch tile and are copied out with the bias.
#[cfg(target_arch = "x86_64")]
fn linear_amx(out: &mut [f32], mut a: Vec<u32>, w: &[bf16], bias: Option<&[f32]>, in_dim: usize, out_dim: usize) {
    use super::amx::{Tiles, PAIRS, ROWS};
    let pairs = in_dim / 2;
    let rows = a.len() / pairs;
    let blocks = rows.div_ceil(ROWS);
    a.resize(blocks * ROWS * pairs, 0);
    let dst = SendPtr(out.as_mut_ptr());
    let panels = out_dim / NR;
    let task = |t: usize| {
        let (p, rc) = (t % panels, t / panels);
        let panel = &w[p * pairs * 2 * NR..][..pairs * 2 * NR];
        let Some(mut tiles) = Tiles::new() else {
            unreachable!("the AMX kernel is chosen only where `amx::available`")
        };
        let mut sums = [0f32; ROWS * NR];
        for blk in rc * AMX_BLOCKS..(rc * AMX_BLOCKS + AMX_BLOCKS).min(blocks) {
            let i = blk * ROWS;
            tiles.block(&a[i * pairs..], pairs, panel, pairs / PAIRS, &mut sums);
            for r in 0..ROWS.min(rows - i) {
                // SAFETY: row i + r < rows and columns p NR.. p NR + NR lie inside `out` (checked
                // by `linear`) and belong to this task alone.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.get().add((i + r) * out_dim + p * NR), NR) };
                let s = &sums[r * NR..][..NR];
                match bias {
                    Some(b) => row.iter_mut().zip(s).zip(&b[p * NR..][..NR]).for_each(|((o, s), b)| *o = s + b),
                    None => row.copy_from_slice(s),
                }
            }
        }
    };
    run_tasks(panels * blocks.div_ceil(AMX_BLOCKS), rows * out_dim * in_dim, task);
}

/// Whether this CPU has AVX512-BF16, which the fast kernel needs.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The output of parallel tasks that write disjoint blocks of it (also [`super::linear`] and
/// [`super::conv::conv1x1_in_place`]).
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: the tasks write disjoint parts of the one buffer through it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// What a block's sums start from (also in [`super::linear`]).
#[derive(Clone, Copy)]
pub(super) enum Init<'a> {
    /// The bias (or zero): the first block of the input positions.
    Bias(Option<&'a [f32]>),
    /// The values already in the output.
    Accumulate,
}

/// One micro-kernel call: `c[r][0..NR] (=|+=) sum over q < kc of pair(a[r lda + q]) . b[q]`, for
/// `r < mr`. The output is a raw pointer because the rows of one block interleave with other
/// tasks' columns.
struct Block<'a> {
    c: *mut f32,
    ldc: usize,
    a: &'a [u32],
    lda: usize,
    b: &'a [bf16],
    kc: usize,
    mr: usize,
    init: Init<'a>,
}

impl Block<'_> {
    /// Runs the block on the AVX512-BF16 kernel when `native` (which must be [`native()`]),
    /// else on the portable loop.
    ///
    /// # Safety
    /// `c` must be valid for writes of `NR` values at `c + r ldc` for every `r < mr`, and no
    /// other thread may touch them meanwhile.
    unsafe fn run(&self, native: bool) {
        let ok = (1..=MR).contains(&self.mr)
            && self.a.len() >= (self.mr - 1) * self.lda + self.kc
            && self.b.len() >= self.kc * 2 * NR;
        assert!(ok, "bf16 block of {} rows outside its operands", self.mr);
        #[cfg(target_arch = "x86_64")]
        if native {
            // SAFETY: `native` says the processor has the kernel's features; the extents of
            // `a` and `b` were checked above, those of `c` are the caller's promise.
            unsafe { simd::block(self) };
            return;
        }
        let _ = native;
        // SAFETY: as above.
        unsafe { self.portable() };
    }

    /// The same sums as the AVX512-BF16 kernel: the products of bf16 values are exact in f32.
    unsafe fn portable(&self) {
        for r in 0..self.mr {
            let mut acc = [0f32; NR];
            for q in 0..self.kc {
                let pair = self.a[r * self.lda + q];
                let (lo, hi) = (widen(pair as u16), widen((pair >> 16) as u16));
                let b = &self.b[q * 2 * NR..][..2 * NR];
                for j in 0..NR {
                    acc[j] += lo * b[2 * j].to_f32() + hi * b[2 * j + 1].to_f32();
                }
            }
            // SAFETY: the caller's promise on `c`.
            let row = unsafe { std::slice::from_raw_parts_mut(self.c.add(r * self.ldc), NR) };
            for j in 0..NR {
                row[j] = acc[j]
                    + match self.init {
                        Init::Bias(Some(b)) => b[j],
                        Init::Bias(None) => 0.0,
                        Init::Accumulate => row[j],
                    };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Block, Init, NR};

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn block(k: &Block<'_>) {
        // SAFETY: the caller checked the extents of `a` and `b` and promises those of `c`.
        unsafe {
            match k.mr {
                12 => rows::<12>(k),
                11 => rows::<11>(k),
                10 => rows::<10>(k),
                9 => rows::<9>(k),
                8 => rows::<8>(k),
                7 => rows::<7>(k),
                6 => rows::<6>(k),
                5 => rows::<5>(k),
                4 => rows::<4>(k),
                3 => rows::<3>(k),
                2 => rows::<2>(k),
                _ => rows::<1>(k),
            }
        }
    }

    /// `R` rows by `NR` columns, accumulated in 2R registers over the block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows<const R: usize>(k: &Block<'_>) {
        let (a, b, c, lda, ldc) = (k.a.as_ptr(), k.b.as_ptr() as *const u16, k.c, k.lda, k.ldc);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // SAFETY: the caller checked that R rows of `a` hold kc pairs each, `b` kc pairs of NR
        // columns, and `c` R rows of NR values.
        unsafe {
            for q in 0..k.kc {
                let bq = b.add(q * 2 * NR);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq as *const _));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(NR) as *const _));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda + q) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (h, &v) in acc.iter().enumerate() {
                    let p = c.add(r * ldc + 16 * h);
                    let start = match k.init {
                        Init::Bias(Some(bias)) => _mm512_loadu_ps(bias.as_ptr().add(16 * h)),
                        Init::Bias(None) => _mm512_setzero_ps(),
                        Init::Accumulate => _mm512_loadu_ps(p),
                    };
                    _mm512_storeu_ps(p, _mm512_add_ps(v, start));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i * 7919 + seed * 104729) % 1999) as f32 / 999.5 - 1.0) * (1.0 + (i % 7) as f32)
            })
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even_and_keeps_nan() {
        assert_eq!(round(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: to the even one, 1
        assert_eq!(round(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(round(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(round(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(round(-2.5), 0xc020);
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(widen(round(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn products_are_those_of_the_rounded_operands() {
        // rows that are not a multiple of MR or MC, pairs that are not a multiple of KC
        for (rows, in_dim, out_dim) in [(1, 2, 32), (13, 300, 64), (154, 262, 96), (97, 40, 32), (1, 32, 32), (154, 320, 96), (64, 1024, 64)] {
            let (x, w, bias) = (
                values(rows * in_dim, 1),
                values(out_dim * in_dim, 2),
                values(out_dim, 3),
            );
            let packed = pack(&w, out_dim, in_dim).unwrap();
            for (kernel, b) in kernels().into_iter().flat_map(|k| [(k, None), (k, Some(&bias[..]))]) {
                let mut out = vec![f32::NAN; rows * out_dim];
                linear_on(kernel, &mut out, &x, &packed, b, in_dim, out_dim);
                for r in 0..rows {
                    for o in 0..out_dim {
                        let want: f64 = (0..in_dim)
                            .map(|i| {
                                widen(round(x[r * in_dim + i])) as f64
                                    * widen(round(w[o * in_dim + i])) as f64
                            })
                            .sum::<f64>()
                            + b.map_or(0.0, |b| b[o] as f64);
                        let scale: f64 = (0..in_dim)
                            .map(|i| (x[r * in_dim + i] * w[o * in_dim + i]).abs() as f64)
                            .sum();
                        let got = out[r * out_dim + o] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * scale + 1e-6,
                            "{kernel:?} {rows}x{in_dim}x{out_dim} ({r}, {o}): {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn unpackable_shapes_and_wrong_sizes_are_refused() {
        assert!(!packable(33, 4) && !packable(32, 3) && !packable(0, 2) && packable(64, 2));
        assert!(pack(&[0.0; 33 * 4], 33, 4).is_err());
        let packed = pack(&[0.0; 32 * 4], 32, 4).unwrap();
        let mut out = vec![0.0; 32];
        assert!(linear(&mut out, &[0.0; 5], &packed, None, 4, 32)
            .unwrap_err()
            .to_string()
            .contains("bf16 linear"));
        assert!(linear(&mut out, &[0.0; 8], &packed, None, 4, 32).is_err());
        assert!(linear(&mut out, &[0.0; 4], &packed, Some(&[0.0; 3]), 4, 32).is_err());
        linear(&mut out, &[1.0; 4], &packed, Some(&[0.5; 32]), 4, 32).unwrap();
        assert!(out.iter().all(|&v| v == 0.5));
    }
}
