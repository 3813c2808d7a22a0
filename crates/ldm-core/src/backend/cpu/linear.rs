//! Linear layers with float32 weights packed at load into panels of [`NR`] output columns, so
//! that a product streams each weight once, front to back: `w (out, in)` becomes
//! `(out / NR, in, NR)`, panel `p` holding columns `p NR .. p NR + NR` for each input position
//! side by side. The micro-kernel keeps an [`MR`] x [`NR`] block of the output in registers (12
//! AVX2 registers) and, for each input position, multiplies the panel's [`NR`] values by each
//! row's input value, read straight from the row-major input. The parallel tasks are
//! (panel, block of rows) pairs.
//!
//! Against the `gemm` crate reading the `(in, out)` transposed weight, on 2 AVX2 threads with
//! weights that do not fit in cache (LDMBert's 154 rows: 1280 -> 512, 1280 -> 5120, 5120 -> 1280),
//! 134/168/170 GFLOP/s against 107/152/148; on 2048 rows about even.

use rayon::prelude::*;

use super::bf16::{run_tasks, Init, SendPtr};
use crate::{Error, Result};

/// Output columns per panel (two AVX2 registers).
pub const NR: usize = 16;
/// Rows per micro-kernel call.
const MR: usize = 6;
/// Input positions per block: one block of a panel is 16 KiB, read from L1 by every row block.
const KC: usize = 256;
/// Rows per parallel task.
const MC: usize = 32 * MR;

/// Whether a `(out, in)` weight can be packed.
pub fn packable(out_dim: usize, in_dim: usize) -> bool {
    out_dim > 0 && in_dim > 0 && out_dim.is_multiple_of(NR)
}

/// The packed form of the row-major `w (out, in)`.
pub fn pack(w: &[f32], out_dim: usize, in_dim: usize) -> Result<Vec<f32>> {
    if !packable(out_dim, in_dim) || w.len() != out_dim * in_dim {
        return Err(Error::Backend(format!("a {out_dim}x{in_dim} weight of {} values cannot be packed", w.len())));
    }
    let mut packed = vec![0f32; w.len()];
    packed.par_chunks_mut(in_dim * NR).enumerate().for_each(|(p, panel)| {
        for j in 0..NR {
            for (k, &v) in w[(p * NR + j) * in_dim..][..in_dim].iter().enumerate() {
                panel[k * NR + j] = v;
            }
        }
    });
    Ok(packed)
}

/// What is done to each value of a product's output once its sum is complete, by the task that
/// made it (while it is still in cache), instead of in a pass of its own over the whole output.
/// The values are exactly those of the separate step.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'a> {
    None,
    /// The exact GELU ([`super::math::gelu_inplace`]).
    Gelu,
    /// `residual[i] + value` for the output's own layout, `rows x out_dim` (a residual
    /// connection after the layer).
    Add(&'a [f32]),
}

/// `out (rows, out_dim) = epi(x w^T + bias)` for `x (rows, in_dim)` and `w` as [`pack`] made it.
pub fn linear(out: &mut [f32], x: &[f32], w: &[f32], bias: Option<&[f32]>, in_dim: usize, out_dim: usize, epi: Epilogue<'_>) -> Result<()> {
    linear_on(avx2(), out, x, w, bias, in_dim, out_dim, epi)
}

/// [`linear`] on the AVX2 micro-kernel (`native`, where the CPU has it) or the plain loops.
#[allow(clippy::too_many_arguments)]
fn linear_on(native: bool, out: &mut [f32], x: &[f32], w: &[f32], bias: Option<&[f32]>, in_dim: usize, out_dim: usize, epi: Epilogue<'_>) -> Result<()> {
    if !packable(out_dim, in_dim) || w.len() != out_dim * in_dim || !x.len().is_multiple_of(in_dim) {
        return Err(Error::Backend(format!("linear: {} inputs of width {in_dim} for a packed {out_dim}x{in_dim} weight", x.len())));
    }
    let rows = x.len() / in_dim;
    if out.len() != rows * out_dim || bias.is_some_and(|b| b.len() != out_dim) {
        return Err(Error::Backend(format!("linear: an output of {} values for {rows} rows of {out_dim}", out.len())));
    }
    if let Epilogue::Add(r) = epi {
        if r.len() != out.len() {
            return Err(Error::Backend(format!("linear: a residual of {} values for {rows} rows of {out_dim}", r.len())));
        }
    }
    let panels = out_dim / NR;
    let chunks = rows.div_ceil(MC);
    let dst = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (p, rc) = (t / chunks, t % chunks);
        let panel = &w[p * in_dim * NR..][..in_dim * NR];
        let bias = bias.map(|b| &b[p * NR..][..NR]);
        let (r0, r1) = (rc * MC, (rc * MC + MC).min(rows));
        for k0 in (0..in_dim).step_by(KC) {
            let kc = KC.min(in_dim - k0);
            for i in (r0..r1).step_by(MR) {
                let block = Block {
                    a: &x[i * in_dim + k0..],
                    lda: in_dim,
                    b: &panel[k0 * NR..][..kc * NR],
                    kc,
                    mr: MR.min(r1 - i),
                    // rows i .. i + mr, columns p NR .. p NR + NR: inside `out` (checked
                    // above) and this task's alone
                    c: dst.get().wrapping_add(i * out_dim + p * NR),
                    ldc: out_dim,
                    init: if k0 == 0 { Init::Bias(bias) } else { Init::Accumulate },
                };
                // SAFETY: `c` as said where it is formed; `a` holds `mr` rows of `kc` values
                // `lda` apart (the rows lie in `x`, checked above).
                unsafe { block.run(native) };
            }
        }
        if matches!(epi, Epilogue::None) {
            return;
        }
        for r in r0..r1 {
            let at = r * out_dim + p * NR;
            // SAFETY: columns p NR .. p NR + NR of row r: inside `out` (checked above), this
            // task's alone, and no block of it is being written any more
            let vals = unsafe { std::slice::from_raw_parts_mut(dst.get().wrapping_add(at), NR) };
            match epi {
                Epilogue::None => {}
                Epilogue::Gelu => super::math::gelu_seq(vals),
                Epilogue::Add(res) => vals.iter_mut().zip(&res[at..at + NR]).for_each(|(v, &r)| *v = r + *v),
            }
        }
    };
    run_tasks(panels * chunks, rows * out_dim * in_dim, task);
    Ok(())
}

/// One micro-kernel call: `C[r][j] (+)= sum_k A[r][k] B[k][j]` for `r < mr`, `j < NR`.
struct Block<'a> {
    a: &'a [f32],
    lda: usize,
    b: &'a [f32],
    kc: usize,
    mr: usize,
    c: *mut f32,
    ldc: usize,
    init: Init<'a>,
}

impl Block<'_> {
    /// # Safety
    /// `c` must address `mr` rows of [`NR`] values `ldc` apart that no one else touches, and `a`
    /// must hold `(mr - 1) lda + kc` values.
    unsafe fn run(&self, native: bool) {
        debug_assert!(self.mr >= 1 && self.mr <= MR && self.a.len() >= (self.mr - 1) * self.lda + self.kc);
        #[cfg(target_arch = "x86_64")]
        if native {
            return avx2::block(self);
        }
        let _ = native;
        self.portable()
    }

    /// The same sums in plain loops.
    unsafe fn portable(&self) {
        for r in 0..self.mr {
            let mut acc = [0f32; NR];
            let row = &self.a[r * self.lda..][..self.kc];
            for (k, &av) in row.iter().enumerate() {
                for (s, &bv) in acc.iter_mut().zip(&self.b[k * NR..][..NR]) {
                    *s += av * bv;
                }
            }
            let c = std::slice::from_raw_parts_mut(self.c.add(r * self.ldc), NR);
            match self.init {
                Init::Bias(bias) => {
                    for (j, d) in c.iter_mut().enumerate() {
                        *d = acc[j] + bias.map_or(0.0, |b| b[j]);
                    }
                }
                Init::Accumulate => c.iter_mut().zip(acc).for_each(|(d, s)| *d += s),
            }
        }
    }
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Block, Init, MR, NR};
    use std::arch::x86_64::*;

    /// Input positions per turn of the micro-kernel's loop.
    const UNROLL: usize = 4;

    /// # Safety
    /// As [`Block::run`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(k: &Block<'_>) {
        match k.mr {
            6 => rows::<6>(k),
            5 => rows::<5>(k),
            4 => rows::<4>(k),
            3 => rows::<3>(k),
            2 => rows::<2>(k),
            _ => rows::<1>(k),
        }
    }

    #[inline(always)]
    unsafe fn rows<const R: usize>(k: &Block<'_>) {
        const { assert!(R <= MR && NR == 16) };
        let (a, b) = (k.a.as_ptr(), k.b.as_ptr());
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        // (a macro, not a closure: a closure would not have this function's target features)
        macro_rules! step {
            ($q:expr) => {{
                let q = $q;
                let b0 = _mm256_loadu_ps(b.add(q * NR));
                let b1 = _mm256_loadu_ps(b.add(q * NR + 8));
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*a.add(r * k.lda + q));
                    lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                }
            }};
        }
        // four input positions per loop turn: the loop's own counting and branching is then
        // a small part of the instructions the FMAs share the front end with
        let mut q = 0;
        while q + UNROLL <= k.kc {
            for u in 0..UNROLL {
                step!(q + u);
            }
            q += UNROLL;
        }
        while q < k.kc {
            step!(q);
            q += 1;
        }
        for r in 0..R {
            let c = k.c.add(r * k.ldc);
            let (base0, base1) = match k.init {
                Init::Bias(Some(bias)) => (_mm256_loadu_ps(bias.as_ptr()), _mm256_loadu_ps(bias.as_ptr().add(8))),
                Init::Bias(None) => (_mm256_setzero_ps(), _mm256_setzero_ps()),
                Init::Accumulate => (_mm256_loadu_ps(c), _mm256_loadu_ps(c.add(8))),
            };
            _mm256_storeu_ps(c, _mm256_add_ps(lo[r], base0));
            _mm256_storeu_ps(c.add(8), _mm256_add_ps(hi[r], base1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row-major `(out, in)` weight back from its packed form.
    fn unpack(packed: &[f32], out_dim: usize, in_dim: usize) -> Vec<f32> {
        let mut w = vec![0f32; out_dim * in_dim];
        for (o, row) in w.chunks_mut(in_dim).enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                *v = packed[(o / NR * in_dim + k) * NR + o % NR];
            }
        }
        w
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 7919) % 97) as f32 / 48.0 - 1.0).collect()
    }

    #[test]
    fn packed_products_match_the_definition_on_every_kernel() {
        // rows across the micro-kernel and task blocks, widths across the input block, on 1 and
        // 2 threads
        let shapes = [(1, 3, 16), (7, 300, 32), (200, 40, 48), (13, 513, 16), (30, 300, 208)];
        for ((rows, in_dim, out_dim), threads) in shapes.into_iter().flat_map(|s| [(s, 1), (s, 2)]) {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let x = values(rows * in_dim, 1);
            let w = values(out_dim * in_dim, 2);
            let b = values(out_dim, 3);
            let packed = pack(&w, out_dim, in_dim).unwrap();
            assert_eq!(unpack(&packed, out_dim, in_dim), w);
            for native in [false, avx2()] {
                for bias in [None, Some(&b[..])] {
                    let mut out = vec![f32::NAN; rows * out_dim];
                    pool.install(|| linear_on(native, &mut out, &x, &packed, bias, in_dim, out_dim, Epilogue::None)).unwrap();
                    let mut via_linear = vec![0f32; rows * out_dim];
                    pool.install(|| linear(&mut via_linear, &x, &packed, bias, in_dim, out_dim, Epilogue::None)).unwrap();
                    for r in 0..rows {
                        for o in 0..out_dim {
                            let terms = (0..in_dim).map(|k| x[r * in_dim + k] as f64 * w[o * in_dim + k] as f64);
                            let want = bias.map_or(0.0, |b| b[o] as f64) + terms.clone().sum::<f64>();
                            // f32 sums: a few roundings of the largest partial sums
                            let tol = 1e-6 * (1.0 + terms.map(f64::abs).sum::<f64>());
                            for (name, got) in [(if native { "avx2" } else { "plain loops" }, &out), ("linear", &via_linear)] {
                                let err = (got[r * out_dim + o] as f64 - want).abs();
                                assert!(err < tol, "{name}, {threads} threads: {rows}x{in_dim}x{out_dim} at ({r}, {o}): {err} > {tol}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn epilogues_give_exactly_the_separate_steps() {
        // rows across task blocks, on 1 and 2 threads: every task applies it to its own block
        for ((rows, in_dim, out_dim), threads) in [(7, 300, 32), (200, 40, 48), (400, 20, 16)].into_iter().flat_map(|s| [(s, 1), (s, 2)]) {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let x: Vec<f32> = values(rows * in_dim, 1).iter().map(|v| v * 0.2).collect();
            let packed = pack(&values(out_dim * in_dim, 2), out_dim, in_dim).unwrap();
            let (b, res) = (values(out_dim, 3), values(rows * out_dim, 4));
            let run = |epi| {
                let mut out = vec![f32::NAN; rows * out_dim];
                pool.install(|| linear(&mut out, &x, &packed, Some(&b), in_dim, out_dim, epi)).unwrap();
                out
            };
            let plain = run(Epilogue::None);
            let mut gelu = plain.clone();
            super::super::math::gelu_inplace(&mut gelu);
            let added: Vec<f32> = res.iter().zip(&plain).map(|(r, v)| r + v).collect();
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&run(Epilogue::Gelu), &gelu), "gelu, {rows}x{in_dim}x{out_dim}, {threads} threads");
            assert!(same(&run(Epilogue::Add(&res)), &added), "add, {rows}x{in_dim}x{out_dim}, {threads} threads");
            // the values differ from the plain product, so the comparisons above say something
            assert!(!same(&gelu, &plain) && !same(&added, &plain));
        }
        let packed = pack(&[0.0; 32 * 4], 32, 4).unwrap();
        let e = linear(&mut [0.0; 64], &[0.0; 8], &packed, None, 4, 32, Epilogue::Add(&[0.0; 63])).unwrap_err();
        assert!(e.to_string().contains("residual of 63 values"), "{e}");
    }

    #[test]
    fn unpackable_shapes_and_wrong_sizes_are_refused() {
        assert!(!packable(40, 8) && packable(48, 1) && !packable(0, 8) && !packable(16, 0));
        assert!(pack(&[0.0; 40 * 8], 40, 8).is_err());
        let packed = pack(&[0.0; 32 * 4], 32, 4).unwrap();
        let mut out = vec![0.0; 2 * 32];
        assert!(linear(&mut out, &[0.0; 7], &packed, None, 4, 32, Epilogue::None).is_err());
        assert!(linear(&mut out, &[0.0; 12], &packed, None, 4, 32, Epilogue::None).is_err());
        assert!(linear(&mut out, &[0.0; 8], &packed, Some(&[0.0; 31]), 4, 32, Epilogue::None).is_err());
        assert!(linear(&mut out, &[0.0; 8], &packed, None, 4, 32, Epilogue::None).is_ok());
    }
}
