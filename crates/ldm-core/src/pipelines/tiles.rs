//! Decoding large latents in overlapping tiles, blended where they overlap.
//!
//! The decoders attend over every latent position at once (the mid block) and normalise over
//! whole feature maps, so their cost grows with the square of the area and their memory with the
//! output: a 512x512 super-resolution input is a 2048x2048 output whose decoder would attend over
//! 262,144 positions. Past [`TILE_ABOVE`] latents a side, the latents are decoded as tiles of
//! [`TILE`] with [`OVERLAP`] latents shared between neighbours, and each output pixel is the
//! average of the tiles covering it, weighted by ramps that fall to zero towards a tile's inner
//! edges, so that no seam shows where one tile ends. (diffusers' `AutoencoderKL.tiled_decode`
//! blends the same way; a tiled decode is close to, not equal to, the whole one, since each
//! tile's statistics and attention see only the tile.)

use crate::backend::Backend;
use crate::Result;

/// Latent side of a tile.
pub const TILE: usize = 128;
/// Latents shared by neighbouring tiles.
pub const OVERLAP: usize = 32;
/// Latents are decoded whole up to this many a side (so the published models' usual sizes, and
/// every size diffusers' own pipelines decode whole, are decoded as diffusers decodes them).
pub const TILE_ABOVE: usize = 256;

/// Whether latents of `h x w` are decoded in tiles.
pub fn tiled(h: usize, w: usize) -> bool {
    h.max(w) > TILE_ABOVE
}

/// Starts of the tiles along one side of `size` latents: every `tile - overlap`, the last one
/// flush with the end.
fn starts(size: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if size <= tile {
        return vec![0];
    }
    let stride = (tile - overlap).max(1);
    let mut s: Vec<usize> = (0..).map(|i| i * stride).take_while(|&s| s + tile < size).collect();
    s.push(size - tile);
    s
}

/// The blending weight of pixel `p` of a tile `len` pixels long: a ramp over `ramp` pixels at
/// each edge that borders another tile (`lo`, `hi`), 1 elsewhere.
fn weight(p: usize, len: usize, ramp: f32, lo: bool, hi: bool) -> f32 {
    let mut w = 1.0f32;
    if lo {
        w = w.min((p as f32 + 0.5) / ramp);
    }
    if hi {
        w = w.min((len as f32 - p as f32 - 0.5) / ramp);
    }
    w
}

/// Decodes `z (1, C, h, w)` tile by tile with `decode` (latents to `(1, O, f h, f w)` pixels)
/// and returns the blended `(O, f h, f w)` pixels.
pub fn decode_tiled<B: Backend>(
    be: &B,
    z: &B::Tensor,
    tile: usize,
    overlap: usize,
    decode: impl Fn(&B::Tensor) -> Result<B::Tensor>,
) -> Result<(Vec<f32>, [usize; 3])> {
    let d = be.dims(z);
    let (h, w) = (d[2], d[3]);
    let (ys, xs) = (starts(h, tile, overlap), starts(w, tile, overlap));
    let mut out: Vec<f32> = Vec::new();
    let mut wsum: Vec<f32> = Vec::new();
    let mut shape = [0usize; 3];
    for &y0 in &ys {
        let th = tile.min(h);
        let rows = be.narrow(z, 2, y0, th)?;
        for &x0 in &xs {
            let tw = tile.min(w);
            let decoded = decode(&be.narrow(&rows, 3, x0, tw)?)?;
            let od = be.dims(&decoded);
            if out.is_empty() {
                // the decoder's scale and output channels, from the first tile
                let f = od[2] / th.max(1);
                shape = [od[1], f * h, f * w];
                out = vec![0.0; shape.iter().product()];
                wsum = vec![0.0; f * h * f * w];
            }
            if od[1] != shape[0] || od[2] * h != shape[1] * th || od[3] * w != shape[2] * tw {
                return Err(crate::Error::Backend(format!("a decoded tile of shape {od:?} does not fit the image {shape:?}")));
            }
            let px = be.download(&decoded)?;
            drop(decoded);
            let (oc, oh, ow) = (shape[0], shape[1], shape[2]);
            let f = oh / h;
            let (fth, ftw, ramp) = (f * th, f * tw, (f * overlap) as f32);
            let (top, bottom, left, right) = (y0 > 0, y0 + th < h, x0 > 0, x0 + tw < w);
            for py in 0..fth {
                let wy = weight(py, fth, ramp, top, bottom);
                let row = (f * y0 + py) * ow + f * x0;
                for pxi in 0..ftw {
                    let wgt = wy * weight(pxi, ftw, ramp, left, right);
                    wsum[row + pxi] += wgt;
                    for c in 0..oc {
                        out[c * oh * ow + row + pxi] += wgt * px[(c * fth + py) * ftw + pxi];
                    }
                }
            }
        }
    }
    let plane = shape[1] * shape[2];
    for (i, v) in out.iter_mut().enumerate() {
        *v /= wsum[i % plane];
    }
    Ok((out, shape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn tiles_cover_the_image_and_a_local_decoder_is_reproduced_exactly() {
        assert_eq!(starts(100, 128, 32), vec![0]);
        assert_eq!(starts(300, 128, 32), vec![0, 96, 172]);
        assert_eq!(starts(128, 128, 32), vec![0]);
        let be = Cpu;
        let (c, h, w) = (2, 37, 53);
        let z: Vec<f32> = (0..c * h * w).map(|i| (i as f32 * 0.37).sin()).collect();
        let zt = be.upload(z.clone(), &[1, c, h, w]).unwrap();
        // a decoder that works pixel by pixel (nearest 2x upscale, channel mix) is the same tiled
        let decode = |t: &<Cpu as Backend>::Tensor| -> Result<<Cpu as Backend>::Tensor> {
            let d = be.dims(t);
            let up = be.upsample_nearest(t, 2 * d[2], 2 * d[3])?;
            let a = be.narrow(&up, 1, 0, 1)?;
            let b = be.narrow(&up, 1, 1, 1)?;
            be.cat(&[&be.add(&a, &b)?, &be.mul(&a, &b)?, &a], 1)
        };
        let whole = be.download(&decode(&zt).unwrap()).unwrap();
        let (tiled, shape) = decode_tiled(&be, &zt, 16, 5, decode).unwrap();
        assert_eq!(shape, [3, 2 * h, 2 * w]);
        let err = whole.iter().zip(&tiled).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err < 1e-5, "{err}");
        // blending weights: a ramp towards inner edges, 1 at the image's own edges
        assert_eq!(weight(0, 64, 16.0, false, false), 1.0);
        assert!(weight(0, 64, 16.0, true, false) < 0.05);
        assert_eq!(weight(40, 64, 16.0, true, true), 1.0);
    }
}
