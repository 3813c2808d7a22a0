//! Decoding large latents tile by tile, with the whole image's statistics.
//!
//! The decoders attend over every latent position at once (the mid block) and normalise over
//! whole feature maps, and their memory grows with the output: a 512x512 super-resolution input
//! is a 2048x2048 output, 2 GiB for every 128 channels of a feature map at full size. Past
//! [`TILE_ABOVE`] latents a side the decoder runs in parts that agree with the whole decode:
//!
//! - the layers at the latents' resolution (`conv_in` and the mid block with its attention) run
//!   on the whole latents, as they would untiled; their output is small (one latent's channels);
//! - the up path runs in stages ([`Decoder::stages`]: a resnet, an upsampling with the resnet
//!   after it, the output layers), each holding only its input and output whole, each on tiles
//!   of at most [`TILE`] of its inputs a side: a core, and around it the stage's reach
//!   ([`Decoder::stage_reach`]) of context, so that the core's outputs see exactly the values
//!   they would see in the whole map. The cores cover the map once; no blending;
//! - each group norm normalises with its whole input's statistics: a pass over the tiles per
//!   norm of the stage gathers them (running each tile up to that norm, the earlier norms
//!   already exact), then a last pass writes the stage's output. With two norms a stage, each
//!   resnet's first convolution runs twice and each upsampling three times: about twice the
//!   convolutions of a whole decode for the published decoders, whatever the size.
//!
//! (diffusers' `AutoencoderKL.tiled_decode` instead blends independently decoded tiles, each with
//! its own statistics and attention, which changes colours from tile to tile.)

use std::ops::Range;

use crate::backend::Backend;
use crate::models::vae::Decoder;
use crate::nn::GroupNorm;
use crate::{Error, Result};

/// Latent side of a tile, context included.
pub const TILE: usize = 128;
/// Latents are decoded whole up to this many a side (so the published models' usual sizes, and
/// every size diffusers' own pipelines decode whole, are decoded as diffusers decodes them).
pub const TILE_ABOVE: usize = 256;

/// Whether latents of `h x w` are decoded in tiles.
pub fn tiled(h: usize, w: usize) -> bool {
    h.max(w) > TILE_ABOVE
}

/// Cores along one side of `size` latents: the fewest runs of at most `core` latents, of equal
/// length (to one latent), that cover it.
fn cores(size: usize, core: usize) -> Vec<(usize, usize)> {
    let n = size.div_ceil(core.max(1)).max(1);
    (0..n).map(|i| (i * size / n, (i + 1) * size / n - i * size / n)).collect()
}

/// Per-group sums of one norm's input over the cores seen so far.
#[derive(Default)]
struct Sums {
    sum: Vec<f64>,
    squares: Vec<f64>,
    /// Values summed per group.
    count: f64,
}

impl Sums {
    /// Adds the values of `x (1, C, H, W)` in `rows x cols`.
    fn add(&mut self, x: &[f32], dims: &[usize], groups: usize, rows: Range<usize>, cols: Range<usize>) {
        let (c, h, w) = (dims[1], dims[2], dims[3]);
        if self.sum.is_empty() {
            self.sum = vec![0.0; groups];
            self.squares = vec![0.0; groups];
        }
        let per_group = c / groups;
        for ch in 0..c {
            let plane = &x[ch * h * w..(ch + 1) * h * w];
            let (mut s, mut q) = (0f64, 0f64);
            for r in rows.clone() {
                for &v in &plane[r * w + cols.start..r * w + cols.end] {
                    s += v as f64;
                    q += v as f64 * v as f64;
                }
            }
            self.sum[ch / per_group] += s;
            self.squares[ch / per_group] += q;
        }
        self.count += (rows.len() * cols.len() * per_group) as f64;
    }

    /// Each group's `(mean, variance)`.
    fn stats(&self) -> Vec<(f64, f64)> {
        let n = self.count.max(1.0);
        self.sum.iter().zip(&self.squares).map(|(s, q)| (s / n, (q / n - (s / n) * (s / n)).max(0.0))).collect()
    }
}

/// Reports the passes of a tiled decode as they end: `(done, total)`; an error (a cancelled
/// run) stops the decode.
pub type Tick<'a> = &'a mut dyn FnMut(usize, usize) -> Result<()>;

/// Decodes one sample with `decoder`, from its input `x (1, C, h, w)` (the latents after
/// `post_quant_conv`), each stage in tiles of at most `tile` of its input positions a side;
/// returns `(O, f h, f w)` planes and their shape. `tick` hears of each pass over the tiles
/// (and of the layers at the latents' resolution before them).
pub fn decode_tiled<B: Backend>(be: &B, decoder: &Decoder<B>, x: &B::Tensor, tile: usize, tick: Tick<'_>) -> Result<(Vec<f32>, [usize; 3])> {
    let stages = decoder.stages();
    let total = 1 + (0..stages).map(|s| decoder.stage_norms(s) + 1).sum::<usize>();
    let mut done = 0;
    tick(done, total)?;
    let mut h = decoder.forward_mid(x)?;
    done += 1;
    tick(done, total)?;
    for s in 0..stages {
        let (out, shape) = stage_tiled(be, decoder, s, &h, tile, &mut |passes| {
            done += passes;
            tick(done, total)
        })?;
        if s + 1 == stages {
            return Ok((out, shape));
        }
        h = be.upload(out, &[1, shape[0], shape[1], shape[2]])?;
    }
    Err(Error::Backend("a decoder without up blocks cannot be tiled".into()))
}

/// One tile of a stage: its core (the outputs it gives) and its input region (the core with
/// context), as `[start, end)` input positions along each side.
struct Tile {
    core: [Range<usize>; 2],
    region: [Range<usize>; 2],
}

/// Stage `b` of `decoder` on `h (1, C, H, W)`, tile by tile: a pass for each of its group norms
/// gathers that norm's statistics over every tile's core (normalising the earlier norms with
/// theirs, and stopping the tile there), then a last pass gives the output `(O, sH, sW)`.
/// `passed` hears of each pass as it ends (all of them at once when one tile needs none).
fn stage_tiled<B: Backend>(be: &B, decoder: &Decoder<B>, b: usize, h: &B::Tensor, tile: usize, passed: &mut dyn FnMut(usize) -> Result<()>) -> Result<(Vec<f32>, [usize; 3])> {
    let d = be.dims(h);
    if d.len() != 4 || d[0] != 1 {
        return Err(Error::Backend(format!("tiled decoding takes one sample (1, C, H, W), not {d:?}")));
    }
    let reach = decoder.stage_reach(b);
    let core = tile.saturating_sub(2 * reach).max(reach).max(1);
    let around = |(start, len): (usize, usize), size: usize| (start..start + len, start.saturating_sub(reach)..(start + len + reach).min(size));
    let mut tiles = Vec::new();
    for y in cores(d[2], core) {
        for x in cores(d[3], core) {
            let ((cy, ry), (cx, rx)) = (around(y, d[2]), around(x, d[3]));
            tiles.push(Tile { core: [cy, cx], region: [ry, rx] });
        }
    }
    // one tile is the whole map: its own statistics are the whole's
    let norms = if tiles.len() == 1 { 0 } else { decoder.stage_norms(b) };
    let mut stats: Vec<Vec<(f64, f64)>> = Vec::new();
    // each measured norm's per-channel form, made once on first use
    let mut affine: Vec<(B::Tensor, B::Tensor)> = Vec::new();
    let s = decoder.stage_scale(b);
    let mut image: Vec<f32> = Vec::new();
    let mut channels = 0;
    for pass in 0..=norms {
        let gather = pass < norms;
        let mut sums = Sums::default();
        for t in &tiles {
            let [ry, rx] = &t.region;
            let input = be.narrow(&be.narrow(h, 2, ry.start, ry.len())?, 3, rx.start, rx.len())?;
            let (mut seen, mut stopped) = (0, false);
            let mut norm = |n: &GroupNorm<B>, x: &B::Tensor| -> Result<B::Tensor> {
                if gather && seen == pass {
                    let xd = be.dims(x);
                    if xd.len() != 4 || xd[2] != s * ry.len() || xd[3] != s * rx.len() {
                        return Err(Error::Backend(format!("a norm's input {xd:?} is not {s} times its tile {}x{}", ry.len(), rx.len())));
                    }
                    let [cy, cx] = &t.core;
                    let rows = s * (cy.start - ry.start)..s * (cy.end - ry.start);
                    sums.add(&be.download(x)?, &xd, n.groups(), rows, s * (cx.start - rx.start)..s * (cx.end - rx.start));
                    stopped = true;
                    return Err(Error::Backend("the tile's pass ends at the norm it measures".into()));
                }
                let out = match stats.get(seen) {
                    Some(st) => {
                        if affine.len() == seen {
                            affine.push(n.affine_with(st)?);
                        }
                        n.forward_silu_affine(x, &affine[seen])
                    }
                    None => n.forward_silu(x),
                };
                seen += 1;
                out
            };
            let out = match decoder.forward_stage(b, input.clone(), Some(&mut norm)) {
                Err(_) if stopped => continue,
                Err(e) => return Err(e),
                Ok(_) if gather => return Err(Error::Backend(format!("stage {b} of the decoder applied fewer than {norms} norms"))),
                Ok(out) => out,
            };
            let od = be.dims(&out);
            if od.len() != 4 || od[2] != s * ry.len() || od[3] != s * rx.len() || (channels != 0 && od[1] != channels) {
                return Err(Error::Backend(format!("a decoded tile of shape {od:?} does not fit its {}x{} inputs", ry.len(), rx.len())));
            }
            if image.is_empty() {
                channels = od[1];
                image = vec![0.0; channels * s * d[2] * s * d[3]];
            }
            let px = be.download(&out)?;
            let [cy, cx] = &t.core;
            let (width, tile_width) = (s * d[3], od[3]);
            for c in 0..channels {
                for y in s * cy.start..s * cy.end {
                    let src = (c * od[2] + y - s * ry.start) * tile_width + s * (cx.start - rx.start);
                    let dst = (c * s * d[2] + y) * width + s * cx.start;
                    image[dst..dst + s * cx.len()].copy_from_slice(&px[src..src + s * cx.len()]);
                }
            }
        }
        if gather {
            stats.push(sums.stats());
        }
        passed(if pass == norms { decoder.stage_norms(b) + 1 - norms } else { 1 })?;
    }
    Ok((image, [channels, s * d[2], s * d[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_cover_each_side_once_in_near_equal_runs() {
        assert_eq!(cores(100, 128), vec![(0, 100)]);
        assert_eq!(cores(128, 128), vec![(0, 128)]);
        assert_eq!(cores(300, 100), vec![(0, 100), (100, 100), (200, 100)]);
        assert_eq!(cores(301, 100), vec![(0, 75), (75, 75), (150, 75), (225, 76)]);
        for (size, core) in [(1, 1), (257, 104), (1000, 7)] {
            let c = cores(size, core);
            assert!(c.iter().all(|&(_, len)| len >= 1 && len <= core));
            assert!(c.windows(2).all(|p| p[0].0 + p[0].1 == p[1].0));
            assert_eq!(c.last().map(|&(s, l)| s + l), Some(size));
        }
    }

    #[test]
    fn group_sums_give_each_groups_mean_and_variance_over_the_region() {
        // (1, 4, 3, 3), two groups of two channels; the region is rows 1..3, columns 0..2
        let x: Vec<f32> = (0..36).map(|i| i as f32).collect();
        let mut s = Sums::default();
        s.add(&x, &[1, 4, 3, 3], 2, 1..3, 0..2);
        let region = |c: usize| [3, 4, 6, 7].map(|i| (c * 9 + i) as f64);
        for (g, &(mean, var)) in s.stats().iter().enumerate() {
            let v: Vec<f64> = region(2 * g).into_iter().chain(region(2 * g + 1)).collect();
            let m = v.iter().sum::<f64>() / 8.0;
            let var_ref = v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 8.0;
            assert!((mean - m).abs() < 1e-12 && (var - var_ref).abs() < 1e-9, "group {g}: {mean} {var} vs {m} {var_ref}");
        }
    }
}
