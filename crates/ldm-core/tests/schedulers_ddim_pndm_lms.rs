//! DDIM, PNDM and LMS against diffusers 0.42: every recorded timestep, sigma, scaled model
//! input and step output of the chains recorded by
//! `tests/reference/make_scheduler_refs_ddim_pndm_lms.py`, and the error cases.
//!
//! Each step is checked from diffusers' own previous sample (so errors do not compound and a
//! mismatch points at its step); a free-running chain from the first sample is checked too.

use std::path::{Path, PathBuf};

use ldm_core::loading::{SafetensorsFile, TensorSource};
use ldm_core::schedulers::{self, NoiseSource, Scheduler};
use ldm_core::Error;
use serde_json::{json, Value};

const REF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/reference");

/// Per-step tolerance: |ours - diffusers| <= TOL * max(1, |diffusers|).
const TOL: f64 = 1e-5;
/// The same for the free-running chains, where float32 differences compound over up to 71 calls.
const TOL_CHAIN: f64 = 1e-4;

fn index() -> Value {
    let path = Path::new(REF).join("sched_ddim_pndm_lms.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn config_path(name: &str) -> PathBuf {
    PathBuf::from(format!("{name}/scheduler_config.json"))
}

/// Serves recorded noise rows in order and counts the draws.
struct Recorded {
    values: Vec<f32>,
    pos: usize,
    draws: Vec<usize>,
}

impl NoiseSource for Recorded {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        self.draws.push(n);
        let out = self.values[self.pos..self.pos + n].to_vec();
        self.pos += n;
        out
    }
}

/// A noise source that must not be used.
struct NoNoise;

impl NoiseSource for NoNoise {
    fn randn(&mut self, _n: usize) -> Vec<f32> {
        panic!("this scheduler/eta must not draw noise");
    }
}

/// `max |a - b| / max(1, |b|)`.
fn err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&a, &b)| (a as f64 - b as f64).abs() / (b as f64).abs().max(1.0)).fold(0.0, f64::max)
}

/// `max |a - b| / |b|` (with a floor of 1e-6 on |b|), for sigmas, which can be small.
fn rel_err(a: &[f64], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&a, &b)| (a - b as f64).abs() / (b as f64).abs().max(1e-6)).fold(0.0, f64::max)
}

/// The largest errors seen over a scheduler's cases.
#[derive(Default, Debug)]
struct MaxErr {
    timesteps: f64,
    init_noise_sigma: f64,
    sigmas: f64,
    inputs: f64,
    outputs: f64,
    chain: f64,
    cases: usize,
    calls: usize,
}

fn build(class: &str, config: &Value, name: &str) -> Box<dyn Scheduler> {
    schedulers::from_config(class, config, &config_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn check_class(class: &str) -> MaxErr {
    let idx = index();
    let mut m = MaxErr::default();
    let mut files: std::collections::HashMap<String, SafetensorsFile> = Default::default();
    for case in idx["cases"].as_array().unwrap().iter().filter(|c| c["class"] == class) {
        let name = case["name"].as_str().unwrap();
        let file = case["file"].as_str().unwrap();
        let st =
            files.entry(file.to_string()).or_insert_with(|| SafetensorsFile::open(&Path::new(REF).join(file)).unwrap());
        let load = |key: &str| st.load_f32(&format!("{name}/{key}")).unwrap();
        let config = &idx["configs"][class][case["config"].as_str().unwrap()];
        let steps = case["steps"].as_u64().unwrap() as usize;
        let eta = case["eta"].as_f64().unwrap() as f32;
        let calls = case["calls"].as_u64().unwrap() as usize;
        let sample0 = st.load_f32("sample0").unwrap();
        let n = sample0.len();
        let model_outputs = st.load_f32("model_outputs").unwrap();

        let mut s = build(class, config, name);
        s.set_timesteps(steps).unwrap_or_else(|e| panic!("{name}: {e}"));

        // Timesteps: the model-call count, then the values (whole numbers exactly).
        let ts_ref = load("timesteps");
        assert_eq!(s.timesteps().len(), calls, "{name}: model calls");
        assert_eq!(ts_ref.len(), calls, "{name}: recorded calls");
        let ts_err = s.timesteps().iter().zip(&ts_ref).map(|(&a, &b)| (a as f64 - b as f64).abs()).fold(0.0, f64::max);
        if class == "LMSDiscreteScheduler" {
            assert!(ts_err <= 1e-4, "{name}: timesteps differ by {ts_err}: {:?} vs {:?}", s.timesteps(), ts_ref);
        } else {
            assert_eq!(s.timesteps(), &ts_ref[..], "{name}: timesteps");
        }
        m.timesteps = m.timesteps.max(ts_err);

        let init_ref = load("init_noise_sigma")[0];
        let init_err = (s.init_noise_sigma() as f64 - init_ref as f64).abs() / (init_ref as f64);
        assert!(init_err <= 1e-6, "{name}: init_noise_sigma {} vs {init_ref}", s.init_noise_sigma());
        m.init_noise_sigma = m.init_noise_sigma.max(init_err);

        if class == "LMSDiscreteScheduler" {
            // The sigmas are not on the trait; rebuild the concrete type to read them.
            let mut lms =
                schedulers::lms_discrete::LMSDiscreteScheduler::from_config(config, &config_path(name)).unwrap();
            lms.set_timesteps(steps).unwrap();
            let e = rel_err(lms.sigmas(), &load("sigmas"));
            assert!(e <= TOL, "{name}: sigmas differ by {e} (relative)");
            m.sigmas = m.sigmas.max(e);
        }

        // Teacher-forced chain: each call starts from diffusers' previous sample.
        let inputs = load("inputs");
        let outputs = load("outputs");
        let mut noise: Box<dyn NoiseSource> = if eta > 0.0 {
            Box::new(Recorded { values: load("noise"), pos: 0, draws: Vec::new() })
        } else {
            Box::new(NoNoise)
        };
        let x0: Vec<f32> = sample0.iter().map(|v| v * init_ref).collect();
        for i in 0..calls {
            let x = if i == 0 { &x0[..] } else { &outputs[(i - 1) * n..i * n] };
            let input = s.scale_model_input(x, i);
            let e_in = err(&input, &inputs[i * n..(i + 1) * n]);
            assert!(e_in <= TOL, "{name}: call {i}: model input differs by {e_in}");
            let out = s.step(&model_outputs[i * n..(i + 1) * n], i, x, eta, noise.as_mut()).unwrap();
            let e_out = err(&out, &outputs[i * n..(i + 1) * n]);
            assert!(e_out <= TOL, "{name}: call {i} (t = {}): step output differs by {e_out}", s.timesteps()[i]);
            m.inputs = m.inputs.max(e_in);
            m.outputs = m.outputs.max(e_out);
        }

        // Free-running chain from our own initial noise scale and outputs.
        let mut s = build(class, config, name);
        s.set_timesteps(steps).unwrap();
        let mut rec =
            Recorded { values: if eta > 0.0 { load("noise") } else { Vec::new() }, pos: 0, draws: Vec::new() };
        let mut x: Vec<f32> = sample0.iter().map(|v| v * s.init_noise_sigma()).collect();
        for i in 0..calls {
            let input = s.scale_model_input(&x, i);
            m.chain = m.chain.max(err(&input, &inputs[i * n..(i + 1) * n]));
            x = s.step(&model_outputs[i * n..(i + 1) * n], i, &x, eta, &mut rec).unwrap();
            m.chain = m.chain.max(err(&x, &outputs[i * n..(i + 1) * n]));
        }
        assert!(m.chain <= TOL_CHAIN, "{name}: free-running chain differs by {}", m.chain);
        // eta > 0: exactly one sample-sized draw per call; eta = 0: none.
        let expected_draws = if eta > 0.0 { vec![n; calls] } else { Vec::new() };
        assert_eq!(rec.draws, expected_draws, "{name}: noise draws");

        m.cases += 1;
        m.calls += calls;
    }
    assert!(m.cases > 0, "no {class} cases in the index");
    println!("{class}: {m:?}");
    m
}

#[test]
fn ddim_matches_diffusers() {
    check_class("DDIMScheduler");
}

#[test]
fn pndm_matches_diffusers() {
    check_class("PNDMScheduler");
}

#[test]
fn lms_matches_diffusers() {
    check_class("LMSDiscreteScheduler");
}

/// Every setting where diffusers raises is an InvalidArgument here, from set_timesteps.
#[test]
fn diffusers_error_cases_are_errors() {
    let idx = index();
    let errors = idx["errors"].as_array().unwrap();
    assert!(!errors.is_empty());
    for case in errors {
        let class = case["class"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let mut s = build(class, &case["config"], "error-case");
        match s.set_timesteps(steps) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains(&steps.to_string()), "{msg}"),
            other => panic!("{class} with {steps} steps: expected InvalidArgument, got {other:?}"),
        }
    }
}

const CLASSES: [&str; 3] = ["DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler"];

#[test]
fn steps_zero_or_beyond_training_are_invalid() {
    for class in CLASSES {
        let mut s = build(class, &json!({"num_train_timesteps": 100}), "steps");
        for steps in [0, 101] {
            match s.set_timesteps(steps) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains(class) && msg.contains("100"), "{msg}"),
                other => panic!("{class} {steps}: expected InvalidArgument, got {other:?}"),
            }
        }
        // PNDM needs 4 steps for its Runge-Kutta warm-up; 100 steps is fine for all.
        s.set_timesteps(100).unwrap();
    }
}

/// A config error naming `field`.
fn assert_config_error(class: &str, config: Value, field: &str) {
    match schedulers::from_config(class, &config, &config_path("bad")) {
        Err(Error::Config { field: f, path, msg }) => {
            assert_eq!(f, field, "{class}: {msg}");
            assert!(path.ends_with("scheduler_config.json"));
            let shown = Error::Config { field: f, path, msg }.to_string();
            assert!(shown.contains(field), "{shown}");
        }
        Err(e) => panic!("{class} {config}: expected a Config error on `{field}`, got {e}"),
        Ok(_) => panic!("{class} {config}: expected a Config error on `{field}`"),
    }
}

#[test]
fn bad_or_unsupported_keys_name_the_key() {
    for class in CLASSES {
        assert_config_error(class, json!({"beta_schedule": "sigmoid"}), "beta_schedule");
        assert_config_error(class, json!({"timestep_spacing": "uniform"}), "timestep_spacing");
        assert_config_error(class, json!({"prediction_type": "x0"}), "prediction_type");
        assert_config_error(class, json!({"trained_betas": [0.1, 0.2]}), "trained_betas");
    }
    assert_config_error("DDIMScheduler", json!({"thresholding": true}), "thresholding");
    assert_config_error("DDIMScheduler", json!({"rescale_betas_zero_snr": true}), "rescale_betas_zero_snr");
    assert_config_error("DDIMScheduler", json!({"clip_sample": true, "clip_sample_range": 0.0}), "clip_sample_range");
    assert_config_error("PNDMScheduler", json!({"prediction_type": "sample"}), "prediction_type");
    assert_config_error("LMSDiscreteScheduler", json!({"use_beta_sigmas": true}), "use_beta_sigmas");
    assert_config_error(
        "LMSDiscreteScheduler",
        json!({"use_karras_sigmas": true, "use_exponential_sigmas": true}),
        "use_exponential_sigmas",
    );
    // Keys a class does not have are ignored, as in diffusers (PNDM and LMS have no
    // thresholding or clip_sample; a config written for another class is fine).
    for class in ["PNDMScheduler", "LMSDiscreteScheduler"] {
        build(
            class,
            &json!({"_class_name": "EulerDiscreteScheduler", "thresholding": true, "clip_sample": true}),
            "other",
        );
    }
}

#[test]
fn pndm_model_call_counts() {
    let ldm = json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1});
    for steps in [4, 5, 10, 50, 250] {
        let mut s = build("PNDMScheduler", &ldm, "pndm");
        s.set_timesteps(steps).unwrap();
        assert_eq!(s.timesteps().len(), steps + 9, "PRK warm-up: 12 calls for 3 steps");
        let mut skip = ldm.clone();
        skip["skip_prk_steps"] = json!(true);
        let mut s = build("PNDMScheduler", &skip, "pndm");
        s.set_timesteps(steps).unwrap();
        assert_eq!(s.timesteps().len(), steps + 1, "skip_prk_steps: one repeated call");
    }
    let mut s = build("PNDMScheduler", &ldm, "pndm");
    s.set_timesteps(10).unwrap();
    assert_eq!(
        &s.timesteps()[..13],
        &[901.0, 851.0, 851.0, 801.0, 801.0, 751.0, 751.0, 701.0, 701.0, 651.0, 651.0, 601.0, 601.0]
    );
}

#[test]
fn multistep_calls_must_come_in_order() {
    for class in ["PNDMScheduler", "LMSDiscreteScheduler"] {
        let mut s = build(class, &json!({}), "order");
        s.set_timesteps(10).unwrap();
        let x = vec![0.5f32; 4];
        s.step(&x, 0, &x, 0.0, &mut NoNoise).unwrap();
        assert!(matches!(s.step(&x, 2, &x, 0.0, &mut NoNoise), Err(Error::InvalidArgument(_))));
        // set_timesteps restarts.
        s.set_timesteps(10).unwrap();
        s.step(&x, 0, &x, 0.0, &mut NoNoise).unwrap();
    }
    // DDIM has no state: any call, any order; beyond the list is an error.
    let mut s = build("DDIMScheduler", &json!({}), "order");
    s.set_timesteps(10).unwrap();
    let x = vec![0.5f32; 4];
    s.step(&x, 7, &x, 0.0, &mut NoNoise).unwrap();
    s.step(&x, 3, &x, 0.0, &mut NoNoise).unwrap();
    assert!(matches!(s.step(&x, 10, &x, 0.0, &mut NoNoise), Err(Error::InvalidArgument(_))));
    assert!(matches!(s.step(&x[..3], 0, &x, 0.0, &mut NoNoise), Err(Error::InvalidArgument(_))));
}
