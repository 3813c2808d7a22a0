//! Tiled decoding (`ldm_core::pipelines::tiles`) against whole decoding, on the shipped models'
//! trained decoders and latents of real images: a 512x512 mosaic of data-set images is encoded,
//! then decoded whole and in overlapping tiles, and the two outputs (in [-1, 1]) are compared.
//!
//! The pipelines tile latents above 256 a side with tiles of 128 and overlaps of 32; whole decodes
//! of such sizes take minutes, so the test keeps the same proportions at a smaller size (latents
//! 64 or 128 a side, tiles of half the side, overlaps of a quarter of the tile). Run with
//! `--nocapture` to see the errors.
//!
//! Tiles are not exact: each tile's group norms take their statistics from the tile alone and the
//! decoders' mid-block attention sees only the tile. Measured on 2026-12-02: VQModel mean 6.2e-3,
//! max 0.36; AutoencoderKL mean 3.3e-2, max 1.19 (the mosaic's tiles have different backgrounds,
//! so per-tile statistics move far from the whole image's). The target is agreement within
//! 1e-3; this test guards the blending (a misplaced or unweighted tile is off by tenths on
//! average) with a bound of 5e-2 on the mean, which is what tiling achieves today, not the target.

#[path = "shipped/measure.rs"]
mod measure;

use ldm_core::backend::cpu::Cpu;
use ldm_core::backend::Backend;
use ldm_core::pipelines::txt2img::LatentDecoder;
use ldm_core::pipelines::{tiles, Pipeline};
use measure::{load_sample, repo, sample_paths};

/// A `side x side` image in [-1, 1], `(1, 3, side, side)`, tiled from the data-set samples (each
/// placed mirrored or not by its position, so neighbouring tiles differ).
fn mosaic(side: usize) -> Vec<f32> {
    let samples: Vec<_> = sample_paths().iter().map(|p| load_sample(p)).collect();
    assert!(samples.iter().all(|s| s.w == s.h && s.w == samples[0].w));
    let s = samples[0].w;
    let mut out = vec![0f32; 3 * side * side];
    for y in 0..side {
        for x in 0..side {
            let (ty, tx) = (y / s, x / s);
            let px = &samples[(ty * 5 + tx * 3) % samples.len()].px;
            let (sy, mut sx) = (y % s, x % s);
            if (tx + ty) % 2 == 1 {
                sx = s - 1 - sx;
            }
            for c in 0..3 {
                out[(c * side + y) * side + x] = px[(sy * s + sx) * 3 + c] as f32 / 127.5 - 1.0;
            }
        }
    }
    out
}

fn max_and_mean_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let (max, sum) = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold((0f32, 0f32), |(m, s), d| (m.max(d), s + d));
    (max, sum / a.len() as f32)
}

/// Whole and tiled decodes of `z`, each as `(C, H, W)` planes.
fn both(be: &Cpu, z: &<Cpu as Backend>::Tensor, decode: impl Fn(&<Cpu as Backend>::Tensor) -> ldm_core::Result<<Cpu as Backend>::Tensor>) -> (Vec<f32>, Vec<f32>) {
    let side = be.dims(z)[2];
    let whole = be.download(&decode(z).unwrap()).unwrap();
    let (tiled, shape) = tiles::decode_tiled(be, z, side / 2, side / 8, &decode).unwrap();
    assert_eq!(shape.iter().product::<usize>(), whole.len());
    (whole, tiled)
}

#[test]
fn tiled_and_whole_decodes_of_the_shipped_decoders_agree() {
    let be = Cpu;
    let image = be.upload(mosaic(512), &[1, 3, 512, 512]).unwrap();

    // super-resolution: VQModel, 4x, 128x128 latents in 64-latent tiles overlapping by 16
    let Pipeline::SuperResolution(sr) = Pipeline::load_folder(&repo().join("models/ldm-shapes-superres"), &be).unwrap() else { panic!("not a super-resolution folder") };
    let h = sr.vqvae.encode(&image).unwrap();
    let q = sr.vqvae.quantize(&h).unwrap();
    let (whole, tiled) = both(&be, &q, |t| sr.vqvae.decode(t, true));
    let (vq_max, vq_mean) = max_and_mean_diff(&whole, &tiled);
    println!("VQModel (ldm-shapes-superres), 128x128 latents, tiles 64/16: max |tiled - whole| {vq_max:.2e}, mean {vq_mean:.2e}");

    // text to image: AutoencoderKL, 8x, 64x64 latents in 32-latent tiles overlapping by 8
    let Pipeline::TextToImage(t2i) = Pipeline::load_folder(&repo().join("models/ldm-shapes"), &be).unwrap() else { panic!("not a text-to-image folder") };
    let LatentDecoder::Kl(vae) = &t2i.vae else { panic!("the shipped model decodes with an AutoencoderKL") };
    let z = vae.encode(&image).unwrap().mean;
    let (whole, tiled) = both(&be, &z, |t| vae.decode(t));
    let (kl_max, kl_mean) = max_and_mean_diff(&whole, &tiled);
    println!("AutoencoderKL (ldm-shapes), 64x64 latents, tiles 32/8: max |tiled - whole| {kl_max:.2e}, mean {kl_mean:.2e}");

    for (name, max, mean) in [("VQModel", vq_max, vq_mean), ("AutoencoderKL", kl_max, kl_mean)] {
        assert!(max.is_finite() && mean < 5e-2, "{name}: tiled decoding differs from whole decoding by {mean:.2e} on average (max {max:.2e})");
    }
}
