//! Tiled decoding (`ldm_core::pipelines::tiles`) against whole decoding, on the shipped models'
//! trained decoders and latents of real images: a 512x512 mosaic of data-set images is encoded,
//! then decoded whole and tile by tile, and the two outputs (in [-1, 1]) are compared.
//!
//! The pipelines tile latents above 256 a side, each stage of the up path in tiles of at most 128
//! of its inputs; whole decodes of such sizes take minutes, so the test keeps the proportions at
//! a smaller size (latents 64 or 128 a side, tiles of half the side, so that every stage has
//! several tiles and context cut at their edges). Run with `--nocapture` to see the errors.
//!
//! The tiles normalise with the whole map's statistics and see their decoder's whole reach, so
//! the bound is the 1e-3; measured on 2026-12-06: VQModel max 3.3e-6 (mean 1.4e-7),
//! AutoencoderKL max 1.1e-5 (mean 1.9e-7). (Tiles that each took their own statistics and were
//! blended, as diffusers' tiled decoding does, differed by up to 0.36 and 1.19 here.)

#[path = "shipped/measure.rs"]
mod measure;

use ldm_core::backend::cpu::Cpu;
use ldm_core::backend::Backend;
use ldm_core::loading::folder::ModelFolder;
use ldm_core::models::vae::Decoder;
use ldm_core::models::{autoencoder_kl, vq_model};
use ldm_core::nn::Weights;
use ldm_core::pipelines::tiles;
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

/// Whole and tiled decodes of `x` (the decoder's input) with `decoder`, in tiles of half the
/// latents' side, each as `(C, H, W)` planes.
fn both(be: &Cpu, decoder: &Decoder<Cpu>, x: &<Cpu as Backend>::Tensor) -> (Vec<f32>, Vec<f32>) {
    let side = be.dims(x)[2];
    let whole = be.download(&decoder.forward(x).unwrap()).unwrap();
    let (tiled, shape) = tiles::decode_tiled(be, decoder, x, side / 2, &mut |_, _| Ok(())).unwrap();
    assert_eq!(shape.iter().product::<usize>(), whole.len());
    (whole, tiled)
}

#[test]
fn tiled_and_whole_decodes_of_the_shipped_decoders_agree() {
    let be = Cpu;
    let image = be.upload(mosaic(512), &[1, 3, 512, 512]).unwrap();

    // (the whole autoencoders: the pipelines load the decoding half only)
    let open = |model: &str| {
        let folder = ModelFolder::open(repo().join(model)).unwrap();
        let c = folder.component("vqvae").unwrap();
        (c.dir.clone(), Weights::new(be.clone(), c.weights().unwrap()))
    };

    // super-resolution: VQModel, 4x, 128x128 latents in 64-latent tiles (2x2 or more cores)
    let (dir, w) = open("models/ldm-shapes-superres");
    let vq = vq_model::VQModel::load(vq_model::read_config(&dir).unwrap(), &dir, &w).unwrap();
    let x = vq.decoder_input(&vq.encode(&image).unwrap(), false).unwrap();
    let (whole, tiled) = both(&be, vq.decoder(), &x);
    let (vq_max, vq_mean) = max_and_mean_diff(&whole, &tiled);
    println!("VQModel (ldm-shapes-superres), 128x128 latents, tiles of 64: max |tiled - whole| {vq_max:.2e}, mean {vq_mean:.2e}");

    // text to image: AutoencoderKL, 8x, 64x64 latents in 32-latent tiles
    let (dir, w) = open("models/ldm-shapes");
    let vae = autoencoder_kl::AutoencoderKL::load(autoencoder_kl::read_config(&dir).unwrap(), &dir, &w).unwrap();
    let x = vae.decoder_input(&vae.encode(&image).unwrap().mean).unwrap();
    let (whole, tiled) = both(&be, vae.decoder(), &x);
    let (kl_max, kl_mean) = max_and_mean_diff(&whole, &tiled);
    println!("AutoencoderKL (ldm-shapes), 64x64 latents, tiles of 32: max |tiled - whole| {kl_max:.2e}, mean {kl_mean:.2e}");

    for (name, max) in [("VQModel", vq_max), ("AutoencoderKL", kl_max)] {
        assert!(max < 1e-3, "{name}: tiled decoding differs from whole decoding by up to {max:.2e}");
    }
}
