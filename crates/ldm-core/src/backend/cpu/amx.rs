//! The bf16 products of [`super::bf16`] on Intel AMX (`tdpbf16ps`): one instruction multiplies a
//! 16x32 bf16 tile by a 32x16 bf16 tile into a 16x16 f32 tile, eight thousand multiply-adds.
//!
//! The packed weight layout of [`super::bf16::pack`] is already what the instruction wants for
//! its second operand (pairs of input positions side by side per output column): one tile is 16
//! pairs of a panel's first or last 16 columns, rows 128 bytes apart. The first operand is the
//! input as bf16 pairs, row-major, 16 rows by 16 pairs. A block is 32 rows by one 32-column panel:
//! four accumulator tiles, two input tiles, two weight tiles (the eight tile registers).
//!
//! The tile registers must be asked for from Linux once per process (`arch_prctl`), and their
//! shapes set once per thread before use (`ldtilecfg`); [`available`] does the first and
//! [`Tiles::new`] the second.

use std::arch::asm;
use std::marker::PhantomData;
use std::sync::OnceLock;

use half::bf16;

/// Rows of the input per block.
pub const ROWS: usize = 32;
/// Input pairs per step (one tile's width: 16 pairs of bf16 are 64 bytes).
pub const PAIRS: usize = 16;

/// Whether this CPU has AMX-BF16 and this process may use the tile registers (asked for on the
/// first call).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // SAFETY: CPUID exists on every x86_64 processor; leaf 7 is read only where leaf 0 says
        // it exists. (`unsafe` for the Rust versions where these intrinsics still are.)
        #[allow(unused_unsafe)]
        let edx = unsafe {
            if __cpuid(0).eax < 7 {
                return false;
            }
            __cpuid_count(7, 0).edx
        };
        const AMX_BF16: u32 = 1 << 22;
        const AMX_TILE: u32 = 1 << 24;
        edx & (AMX_BF16 | AMX_TILE) == AMX_BF16 | AMX_TILE && request_tile_data()
    })
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
/// false where it refuses (kernels before 5.16, hypervisors that hide it).
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a system call that only changes which register state this process may use; it
    // reads no memory of ours.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The `ldtilecfg` operand: palette 1, every one of the eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved0: [u8; 14],
    bytes_per_row: [u16; 8],
    reserved1: [u8; 16],
    rows: [u8; 8],
    reserved2: [u8; 8],
}

/// The tile registers of this thread, configured for [`Tiles::block`]; released on drop. Not
/// `Send`: the configuration belongs to the thread that made it.
pub struct Tiles(PhantomData<*const ()>);

impl Tiles {
    /// Configures this thread's tiles. `None` unless [`available`].
    pub fn new() -> Option<Tiles> {
        if !available() {
            return None;
        }
        let config = Config {
            palette: 1,
            start_row: 0,
            reserved0: [0; 14],
            bytes_per_row: [64; 8],
            reserved1: [0; 16],
            rows: [16; 8],
            reserved2: [0; 8],
        };
        // SAFETY: `available` said the processor and the OS allow AMX; the operand is a valid
        // 64-byte palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &config as *const Config, options(nostack, readonly)) };
        Some(Tiles(PhantomData))
    }

    /// `c (32 x 32, row-major) = a b` for `a` 32 rows of `steps * 16` pairs (row `r` at
    /// `a + r lda`) and `b` the same pairs of one 32-column packed panel.
    pub fn block(&mut self, a: &[u32], lda: usize, b: &[bf16], steps: usize, c: &mut [f32; ROWS * 32]) {
        let pairs = steps * PAIRS;
        assert!(
            steps > 0 && lda >= pairs && a.len() >= (ROWS - 1) * lda + pairs && b.len() >= pairs * 64,
            "AMX block of {steps} steps outside its operands"
        );
        let (lda_bytes, a0) = (lda * 4, a.as_ptr());
        // SAFETY: the tiles were configured by `new` on this thread (`Tiles` is neither Send
        // nor cloned); the assertion above keeps every load inside `a` (32 rows of `pairs`
        // values, `lda` apart) and `b` (`pairs` rows of 128 bytes); the stores write the 32 x 32
        // floats of `c`.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b}, 2048",
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c} + {ldc}*1], tmm0",
                "tilestored [{c} + {ldc}*1 + 64], tmm1",
                "tilestored [{c1} + {ldc}*1], tmm2",
                "tilestored [{c1} + {ldc}*1 + 64], tmm3",
                a0 = inout(reg) a0 => _,
                a1 = inout(reg) a0.add(16 * lda) => _,
                lda = in(reg) lda_bytes,
                b = inout(reg) b.as_ptr() => _,
                ldb = in(reg) 128usize,
                steps = inout(reg) steps => _,
                c = in(reg) c.as_mut_ptr(),
                c1 = in(reg) c.as_mut_ptr().add(16 * 32),
                ldc = in(reg) 128usize,
                options(nostack),
            );
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured on this thread; releasing them only resets state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}
