//! Helpers shared by the parity tests: fixture paths, reference tensors, error measures.
#![allow(dead_code)]

use std::path::PathBuf;

use ldm_core::backend::cpu::Cpu;
use ldm_core::backend::Backend;
use ldm_core::loading::{find_weights, SafetensorsFile, TensorSource};
use ldm_core::models::vae::Decoder;
use ldm_core::nn::Weights;
use ldm_core::pipelines::tiles;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// A reference file recorded from diffusers (`tests/reference/make_fixtures.py`).
pub struct Reference(SafetensorsFile);

impl Reference {
    pub fn open(name: &str) -> Self {
        Reference(SafetensorsFile::open(&fixtures().join("reference").join(format!("{name}.safetensors"))).unwrap())
    }
    pub fn has(&self, name: &str) -> bool {
        self.0.meta(name).is_some()
    }
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.0.meta(name).unwrap_or_else(|| panic!("reference tensor {name} missing")).shape
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.0.load_f32(name).unwrap()
    }
    /// Integer tensors (token ids, code indices) as stored: int64 little-endian.
    pub fn tensor(&self, name: &str) -> <Cpu as Backend>::Tensor {
        Cpu.upload(self.f32(name), &self.shape(name)).unwrap()
    }
}

/// Weights of a component folder under `tests/fixtures`.
pub fn weights(rel: &str, stems: &[&str]) -> Weights<Cpu> {
    Weights::new(Cpu, find_weights(&fixtures().join(rel), stems).unwrap())
}

/// Max absolute difference; panics on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Asserts `ours` is within `tol * max(1, max|reference|)` of `reference`: outputs far from unit
/// magnitude get a bound scaled by it, as float32 rounding is relative. Returns the error.
pub fn assert_close(what: &str, ours: &[f32], reference: &[f32], tol: f32) -> f32 {
    let err = max_abs_diff(ours, reference);
    let scale = max_abs(reference).max(1.0);
    eprintln!("{what}: max abs error {err:.3e} (reference max |x| {:.3})", max_abs(reference));
    assert!(err <= tol * scale, "{what}: max abs error {err:e} exceeds {tol:e} x {scale}");
    err
}

/// The first sample of `x` decoded by `decoder` tile by tile (`pipelines::tiles`, tiles of 4
/// inputs a side: several in every stage of the fixtures' decoders) against diffusers' whole
/// decode of it, the reference `name`; the max abs error. Also checks the decode's progress
/// (every pass reported, in order, ending at its total) and that an error from the progress
/// hook (a cancelled run) ends the decode with that error.
pub fn tiled_decode_error<B: Backend>(be: &B, decoder: &Decoder<B>, x: &B::Tensor, r: &Reference, name: &str) -> f32 {
    let x = be.narrow(x, 0, 0, 1).unwrap();
    let mut ticks = Vec::new();
    let (ours, shape) = tiles::decode_tiled(be, decoder, &x, 4, &mut |done, total| {
        ticks.push((done, total));
        Ok(())
    })
    .unwrap();
    assert_eq!(shape[..], r.shape(name)[1..], "tiled decode's shape");
    let total = ticks[0].1;
    assert!(total > decoder.stages(), "{total} passes for {} stages", decoder.stages());
    assert!(ticks.iter().all(|&(_, t)| t == total) && ticks.windows(2).all(|p| p[0].0 < p[1].0), "progress {ticks:?}");
    assert_eq!((ticks[0].0, ticks[ticks.len() - 1].0), (0, total), "progress {ticks:?}");
    let mut calls = 0;
    let cancelled = tiles::decode_tiled(be, decoder, &x, 4, &mut |done, _| {
        calls += 1;
        if done >= 3 { Err(ldm_core::Error::Cancelled) } else { Ok(()) }
    });
    assert!(matches!(cancelled, Err(ldm_core::Error::Cancelled)), "a cancelled tiled decode ended with {:?}", cancelled.map(|(_, s)| s));
    assert_eq!(calls, 4, "the decode went on after its progress hook failed");
    max_abs_diff(&ours, &r.f32(name)[..ours.len()])
}
