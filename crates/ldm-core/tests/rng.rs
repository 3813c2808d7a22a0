//! `TorchGenerator` against torch.randn draws recorded by tests/reference/make_rng_image_refs.py
//! (torch 2.15 on x86-64, AVX2 kernel).

use std::path::PathBuf;

use ldm_core::rng::TorchGenerator;
use ldm_core::schedulers::NoiseSource;
use safetensors::SafeTensors;
use serde_json::Value;

fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference")
}

struct Reference {
    bytes: Vec<u8>,
    index: Value,
}

impl Reference {
    fn load() -> Reference {
        let dir = reference_dir();
        let bytes = std::fs::read(dir.join("rng.safetensors")).expect("rng.safetensors");
        let index = serde_json::from_slice(&std::fs::read(dir.join("rng.json")).expect("rng.json"))
            .expect("rng.json");
        Reference { bytes, index }
    }
    fn tensor(&self, key: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).expect("rng.safetensors");
        let t = st.tensor(key).unwrap_or_else(|_| panic!("no tensor {key}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
    fn list(&self, name: &str) -> &Vec<Value> {
        self.index[name]
            .as_array()
            .unwrap_or_else(|| panic!("rng.json: no list `{name}`"))
    }
}

/// Max abs difference and the number of values whose bits differ.
fn compare(got: &[f32], want: &[f32], what: &str) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut max = 0f32;
    let mut differ = 0;
    for (a, b) in got.iter().zip(want) {
        max = max.max((a - b).abs());
        differ += (a.to_bits() != b.to_bits()) as usize;
    }
    (max, differ)
}

#[derive(Default)]
struct Tally {
    max: f32,
    differ: usize,
    total: usize,
    differ_small: usize,
}

impl Tally {
    fn add(&mut self, got: &[f32], want: &[f32], what: &str) {
        let (max, differ) = compare(got, want, what);
        assert!(max <= 1e-5, "{what}: max abs error {max} > 1e-5");
        if want.len() < 16 {
            self.differ_small += differ;
        }
        self.max = self.max.max(max);
        self.differ += differ;
        self.total += want.len();
    }
}

#[test]
fn randn_matches_torch_for_every_seed_and_size() {
    let r = Reference::load();
    let mut t = Tally::default();
    for case in r.list("cases") {
        let seed = case["seed"].as_u64().expect("seed");
        let n = case["n"].as_u64().expect("n") as usize;
        let key = case["key"].as_str().expect("key");
        let got = TorchGenerator::new(seed).randn(n);
        t.add(&got, &r.tensor(key), key);
    }
    eprintln!(
        "randn: {} values, max abs error {:e}, {} differ in any bit",
        t.total, t.max, t.differ
    );
    assert!(t.total > 40_000);
    assert_eq!(
        t.differ_small, 0,
        "the n < 16 (float64) path must match torch exactly"
    );
    assert_eq!(
        t.differ, 0,
        "randn must reproduce torch's x86-64 values bit for bit"
    );
}

#[test]
fn successive_calls_continue_torch_stream() {
    let r = Reference::load();
    let mut t = Tally::default();
    for seq in r.list("sequences") {
        let seed = seq["seed"].as_u64().expect("seed");
        let mut g = TorchGenerator::new(seed);
        let sizes = seq["sizes"].as_array().expect("sizes");
        let keys = seq["keys"].as_array().expect("keys");
        for (n, key) in sizes.iter().zip(keys) {
            let key = key.as_str().expect("key");
            let got = g.randn(n.as_u64().expect("n") as usize);
            t.add(&got, &r.tensor(key), key);
        }
    }
    eprintln!(
        "sequences: {} values, max abs error {:e}, {} differ",
        t.total, t.max, t.differ
    );
    assert_eq!(t.differ, 0);
}

#[test]
fn shaped_draws_equal_flat_draws() {
    let r = Reference::load();
    for s in r.list("shapes") {
        let seed = s["seed"].as_u64().expect("seed");
        let n: usize = s["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .product();
        let key = s["key"].as_str().expect("key");
        let (max, differ) = compare(&TorchGenerator::new(seed).randn(n), &r.tensor(key), key);
        assert_eq!(differ, 0, "{key}: max abs error {max}");
    }
}

/// torch's portable kernel (ARM machines) uses libm's float log/cos/sin instead of the AVX2
/// polynomials, so its values are not ours bit for bit; they must still be within 1e-5.
#[test]
fn close_to_torch_portable_kernel() {
    let r = Reference::load();
    let mut max = 0f32;
    for case in r.list("portable") {
        let seed = case["seed"].as_u64().expect("seed");
        let n = case["n"].as_u64().expect("n") as usize;
        let key = case["key"].as_str().expect("key");
        let (m, _) = compare(&TorchGenerator::new(seed).randn(n), &r.tensor(key), key);
        max = max.max(m);
    }
    eprintln!("vs torch's portable (non-AVX2) kernel: max abs error {max:e}");
    assert!(max <= 1e-5, "max abs error {max}");
}

#[test]
fn seed_uses_low_32_bits_and_noise_source_is_the_same_stream() {
    let a = TorchGenerator::new((1u64 << 32) + 5).randn(40);
    let b = TorchGenerator::new(5).randn(40);
    assert_eq!(a, b);

    let mut g = TorchGenerator::new(42);
    let mut direct = g.randn(7);
    direct.extend(g.randn(33));
    let mut h = TorchGenerator::new(42);
    let noise: &mut dyn NoiseSource = &mut h;
    let mut via_trait = noise.randn(7);
    via_trait.extend(noise.randn(33));
    assert_eq!(direct, via_trait);

    // An empty draw consumes nothing.
    let mut g = TorchGenerator::new(3);
    assert!(g.randn(0).is_empty());
    assert_eq!(g.randn(5), TorchGenerator::new(3).randn(5));
    assert_eq!(g.initial_seed(), 3);
}

#[test]
fn randn_is_standard_normal() {
    let v = TorchGenerator::new(1234).randn(1 << 16);
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 0.02, "mean {mean}");
    assert!((var - 1.0).abs() < 0.02, "variance {var}");
    assert!(v.iter().all(|x| x.is_finite()));
}
