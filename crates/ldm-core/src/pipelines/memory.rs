//! Estimates of a run's peak memory, checked against what the machine has before anything is
//! allocated, so that an absurd size is refused with a message instead of ending in the kernel's
//! OOM killer (or an allocation abort, which no front end can catch).
//!
//! The estimates follow what a backend materialises: feature maps of `(rows, C, H, W)` float32,
//! the skip connections the UNet keeps from its down path to its up path, and the work buffers
//! of convolutions and attention. Those are [`Transients::Full`] where a backend builds them
//! whole (an im2col buffer of `rows * H * W * C_in * 9` floats, score matrices of
//! `rows * heads * L * L` with the probabilities beside them: the GPU backend), and
//! [`Transients::Blocked`] where it works through them a block at a time (the CPU backend: bands
//! of output rows, blocks of keys), so that they stay a few tens of megabytes at any size.
//! They are deliberately on the high side (within about 2x of measured peaks) and exclude the
//! weights, which are already loaded when the check runs.

use crate::{Error, Result};

const F32: u64 = 4;
/// Working memory beyond the activations: allocator slack, small buffers, the process itself.
const OVERHEAD: u64 = 64 << 20;
/// Assumed available memory where it cannot be read (non-Linux, wasm32, sandboxes): 8 GiB, or
/// 2 GiB in a 32-bit address space (wasm32's linear memory tops out at 4 GiB).
pub const FALLBACK_AVAILABLE: u64 = if cfg!(target_pointer_width = "32") { 2 << 30 } else { 8 << 30 };

/// Memory the machine can give this process now: `MemAvailable` of `/proc/meminfo` on Linux,
/// further bounded by a cgroup limit when one is set. `None` where it cannot be read.
pub fn available_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        let mut avail = kib.saturating_mul(1024);
        // A container's cgroup limit (v2), less what the cgroup already uses.
        if let (Ok(max), Ok(cur)) = (
            std::fs::read_to_string("/sys/fs/cgroup/memory.max"),
            std::fs::read_to_string("/sys/fs/cgroup/memory.current"),
        ) {
            if let (Ok(max), Ok(cur)) = (max.trim().parse::<u64>(), cur.trim().parse::<u64>()) {
                avail = avail.min(max.saturating_sub(cur));
            }
        }
        Some(avail)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

thread_local! {
    static THREAD_LIMIT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Caps the memory that runs started on this thread may plan to use (`None`: no cap beyond the
/// machine's): an application that shares the machine, or a test, can have large runs refused
/// below what the system would allow.
pub fn set_thread_limit(limit: Option<u64>) {
    THREAD_LIMIT.with(|l| l.set(limit));
}

/// Refuses a run whose estimate exceeds the available memory (or [`FALLBACK_AVAILABLE`]), or
/// this thread's limit ([`set_thread_limit`]).
pub fn check_memory(what: &str, needed: u64) -> Result<()> {
    let (mut available, mut measured) = match available_memory() {
        Some(a) => (a, true),
        None => (FALLBACK_AVAILABLE, false),
    };
    if let Some(limit) = THREAD_LIMIT.with(|l| l.get()).filter(|&l| l < available) {
        (available, measured) = (limit, true);
    }
    if needed > available {
        return Err(Error::OutOfMemory { what: what.to_string(), needed, available, measured });
    }
    Ok(())
}

/// One resolution level of a UNet or decoder, for the estimate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Level {
    /// Positions (height x width) at this level.
    pub positions: u64,
    pub channels: u64,
    /// Resnets (and their attentions) in the block.
    pub layers: u64,
    /// Attention heads over the positions, 0 without attention.
    pub heads: u64,
    /// Context length of cross-attention (0: self-attention only).
    pub context: u64,
}

fn mul(xs: &[u64]) -> u64 {
    xs.iter().fold(1u64, |a, &b| a.saturating_mul(b))
}

/// How a backend holds the work buffers of convolutions and attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transients {
    /// Whole: an im2col buffer per convolution, every attention score at once.
    Full,
    /// A block at a time, bounded whatever the size.
    Blocked,
}

/// Attention scores that a [`Transients::Full`] backend computes at once: longer query
/// sequences are split into chunks of rows (`models::attention`).
pub const ATTENTION_SCORES: usize = 1 << 25;

/// The most a [`Transients::Blocked`] backend's blocks take: convolution bands and transformed
/// kernels, or the score blocks of every thread.
const BLOCKS: u64 = 192 << 20;

/// The largest transient of one level: a 3x3 convolution's work buffer with its input and
/// output (inputs up to twice the channels, from the concatenated skips), or attention's
/// scores with the queries, keys, values and output.
fn level_transient(rows: u64, l: &Level, t: Transients) -> u64 {
    let fmap = mul(&[rows, l.channels, l.positions, F32]);
    let blocks = |full: u64| match t {
        Transients::Full => full.min(mul(&[ATTENTION_SCORES as u64, F32, 3])),
        Transients::Blocked => full.min(BLOCKS),
    };
    // Whole buffers: the im2col matrix, the convolution's input and output, the block's input.
    // Blocked: the first resnet of a level reads up to twice its channels, and its input, the
    // normalised input and the output are alive together (5 maps of the level's width).
    let cols = mul(&[rows, l.positions, 2 * l.channels, 9, F32]);
    let conv = match t {
        Transients::Full => cols.saturating_add(fmap.saturating_mul(3)),
        Transients::Blocked => cols.min(BLOCKS).saturating_add(fmap.saturating_mul(5)),
    };
    let attn = if l.heads > 0 {
        let self_attn = mul(&[rows, l.heads, l.positions, l.positions, F32, 3]);
        let cross = mul(&[rows, l.heads, l.positions, l.context.max(1), F32, 3]);
        blocks(self_attn.max(cross)).saturating_add(fmap.saturating_mul(4))
    } else {
        0
    };
    conv.max(attn)
}

/// Peak bytes of one UNet call on `rows` samples: the skips kept from the down path plus the
/// largest transient of any level.
pub(crate) fn unet_peak(rows: u64, levels: &[Level], t: Transients) -> u64 {
    let skips = levels.iter().fold(0u64, |a, l| a.saturating_add(mul(&[rows, l.channels, l.positions, F32, l.layers + 1])));
    let transient = levels.iter().map(|l| level_transient(rows, l, t)).max().unwrap_or(0);
    skips.saturating_add(transient).saturating_add(OVERHEAD)
}

/// Peak bytes of decoding `rows` latents: the largest level's transient (the decoder keeps no
/// skips), with the mid-block attention at the latent resolution.
pub(crate) fn decoder_peak(rows: u64, levels: &[Level], t: Transients) -> u64 {
    let transient = levels.iter().map(|l| level_transient(rows, l, t)).max().unwrap_or(0);
    transient.saturating_add(OVERHEAD)
}

/// Peak bytes of decoding one image of `h x w` latents, `f` pixels per latent: whole, or in
/// tiles (see [`super::tiles`]): the layers at the latents' resolution whole, then each stage
/// of the up path tile by tile, its input and output maps whole beside one tile's work.
pub(crate) fn decode_peak(ch: &[usize], layers: usize, mid: bool, h: usize, w: usize, f: usize, t: Transients) -> u64 {
    let n = ch.len();
    if super::tiles::tiled(h, w) && n > 0 {
        let whole = decoder_levels(ch, layers, h * f, w * f, mid);
        let latent_levels = decoder_peak(1, &whole[n - 1..], t);
        // each stage's input and output (`Decoder::stages`): block b's resnets give its
        // channels at 4^b times the latents' positions, the first from the previous block's
        // output before its upsampling; the output layers give the image
        let map = |c: usize, b: usize| mul(&[c as u64, (h as u64) << b, (w as u64) << b]);
        let block = |b: usize| ch[n - 1 - b];
        let first = |b: usize| if b == 0 { map(ch[n - 1], 0) } else { map(block(b - 1), b - 1) };
        let resnets = (0..n).map(|b| first(b).max(map(block(b), b)).saturating_add(map(block(b), b)));
        let output = map(ch[0], n - 1).saturating_add(map(3, n - 1));
        let maps = resnets.fold(output, u64::max).saturating_mul(F32);
        // a tile: at most TILE inputs a side, twice that in outputs, at any block's width
        let side = 2 * super::tiles::TILE as u64;
        let tile_levels: Vec<Level> = ch.iter().map(|&c| Level { positions: side * side, channels: c as u64, layers: layers as u64 + 1, heads: 0, context: 0 }).collect();
        latent_levels.max(decoder_peak(1, &tile_levels, t).saturating_add(maps))
    } else {
        decoder_peak(1, &decoder_levels(ch, layers, h * f, w * f, mid), t)
    }
}

/// The levels of a decoder (AutoencoderKL/VQModel) producing `h x w` pixels from `block_out_channels`.
pub(crate) fn decoder_levels(ch: &[usize], layers: usize, h: usize, w: usize, mid_attention: bool) -> Vec<Level> {
    let n = ch.len();
    let mut levels = Vec::with_capacity(n + 1);
    for (i, &c) in ch.iter().enumerate() {
        // Level i runs at the output size divided by 2^i (the decoder walks them in reverse).
        let positions = ((h >> i).max(1) as u64).saturating_mul((w >> i).max(1) as u64);
        levels.push(Level { positions, channels: c as u64, layers: layers as u64 + 1, heads: 0, context: 0 });
    }
    if mid_attention && n > 0 {
        let positions = ((h >> (n - 1)).max(1) as u64).saturating_mul((w >> (n - 1)).max(1) as u64);
        levels.push(Level { positions, channels: ch[n - 1] as u64, layers: 1, heads: 1, context: 0 });
    }
    levels
}

/// The message's account of sizes: "a 64x64 latent grid" etc. is left to the callers.
pub(crate) fn positions_at(h: usize, w: usize, level: usize) -> u64 {
    let d = 1usize.checked_shl(level as u32).unwrap_or(usize::MAX);
    (h.div_ceil(d).max(1) as u64).saturating_mul(w.div_ceil(d).max(1) as u64)
}
