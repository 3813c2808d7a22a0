//! EulerDiscrete, EulerAncestralDiscrete and DPMSolverMultistep against diffusers 0.42: the
//! chains recorded by `tests/reference/make_scheduler_refs_euler_dpm.py` (timesteps, sigmas,
//! init_noise_sigma, and for every model call the scaled model input and the step output, the
//! step noise replayed through a NoiseSource), plus the configs and step counts that must fail.
//!
//! Each scheduler runs its own chain (fed the recorded model outputs), so errors accumulate as
//! they would in a pipeline. `LDM_DEBUG_CASE=<case name>` prints that case's steps side by side.

use std::path::{Path, PathBuf};

use ldm_core::loading::{SafetensorsFile, TensorSource};
use ldm_core::schedulers::dpm_solver_multistep::DPMSolverMultistepScheduler;
use ldm_core::schedulers::euler_ancestral_discrete::EulerAncestralDiscreteScheduler;
use ldm_core::schedulers::euler_discrete::EulerDiscreteScheduler;
use ldm_core::schedulers::{self, NoiseSource, Scheduler};
use ldm_core::Error;
use serde_json::Value;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/reference/");

/// Tolerances: timesteps absolute; sigmas, init_noise_sigma and chain values relative to
/// max(1, |reference|), as float32 rounding is relative.
const TOL_TIMESTEP: f64 = 1e-4;
const TOL: f64 = 1e-5;

/// Chain tolerance of the configs whose float32 arithmetic in diffusers is ill-conditioned.
/// DPM-Solver with Karras sigmas on the cosine schedule starts at sigma 20291 (alpha_t = 5e-5),
/// where the data prediction `(x - sigma_t * eps) / alpha_t` multiplies float32 rounding by
/// 2e4; our float32 steps follow diffusers' operations, but torch's `exp`/`log` (Sleef/MKL) are
/// not correctly rounded, and one ulp there moves diffusers' own result by ~3e-4.
fn chain_tolerance(config: &str) -> f64 {
    match config {
        "dpm.karras_cos" => 1e-3,
        _ => TOL,
    }
}

struct Fixture {
    index: Value,
    tensors: SafetensorsFile,
}

fn fixture() -> Fixture {
    let json = std::fs::read_to_string(format!("{REFERENCE}sched_euler_dpm.json")).expect("reference index");
    let index: Value = serde_json::from_str(&json).expect("reference index is JSON");
    let tensors = SafetensorsFile::open(Path::new(&format!("{REFERENCE}sched_euler_dpm.safetensors"))).unwrap();
    Fixture { index, tensors }
}

impl Fixture {
    fn tensor(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let meta = self.tensors.meta(name).unwrap_or_else(|| panic!("reference tensor {name} missing"));
        (self.tensors.load_f32(name).unwrap(), meta.shape)
    }
}

fn config_path() -> PathBuf {
    PathBuf::from("scheduler/scheduler_config.json")
}

/// The inference sigmas of a concrete scheduler after `set_timesteps(steps)`.
fn sigmas_of(class: &str, config: &Value, steps: usize) -> Vec<f64> {
    let path = config_path();
    match class {
        "EulerDiscreteScheduler" => {
            let mut s = EulerDiscreteScheduler::from_config(config, &path).unwrap();
            s.set_timesteps(steps).unwrap();
            s.sigmas().to_vec()
        }
        "EulerAncestralDiscreteScheduler" => {
            let mut s = EulerAncestralDiscreteScheduler::from_config(config, &path).unwrap();
            s.set_timesteps(steps).unwrap();
            s.sigmas().to_vec()
        }
        "DPMSolverMultistepScheduler" => {
            let mut s = DPMSolverMultistepScheduler::from_config(config, &path).unwrap();
            s.set_timesteps(steps).unwrap();
            s.sigmas().to_vec()
        }
        other => panic!("unexpected class {other}"),
    }
}

/// Replays one recorded noise draw per step; counts the draws and refuses unexpected ones.
struct Replay {
    next: Option<Vec<f32>>,
    draws: usize,
    case: String,
}

impl NoiseSource for Replay {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        self.draws += 1;
        let v = self.next.take().unwrap_or_else(|| panic!("{}: drew noise where diffusers draws none", self.case));
        assert_eq!(v.len(), n, "{}: noise draw of {n} values, diffusers drew {}", self.case, v.len());
        v
    }
}

/// Error of `ours` against `reference`, relative to max(1, |reference|) element by element.
fn rel_err(ours: f64, reference: f64) -> f64 {
    (ours - reference).abs() / reference.abs().max(1.0)
}

/// Error of a whole array, relative to max(1, max |reference|).
fn array_err(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let scale = reference.iter().fold(1.0f64, |m, &x| m.max((x as f64).abs()));
    let err = ours.iter().zip(reference).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    if ours.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    err / scale
}

#[derive(Default, Debug)]
struct MaxErrors {
    cases: usize,
    timesteps: f64,
    sigmas: f64,
    init_noise_sigma: f64,
    scaled_input: f64,
    step_output: f64,
    /// Chain error of the configs with a looser tolerance (see `chain_tolerance`).
    ill_conditioned: f64,
}

/// Runs every recorded case of `class` and asserts each quantity; returns the largest errors.
fn check_class(class: &str) -> MaxErrors {
    let fx = fixture();
    let mut max = MaxErrors::default();
    // Failures are collected so that one run shows every case that disagrees.
    let mut failures: Vec<String> = Vec::new();
    let mut check = |ok: bool, msg: String| {
        if !ok {
            failures.push(msg);
        }
    };
    let cases = fx.index["cases"].as_array().unwrap();
    for case in cases.iter().filter(|c| c["class"] == class) {
        let name = case["name"].as_str().unwrap();
        let config = &fx.index["configs"][case["config"].as_str().unwrap()];
        let steps = case["steps"].as_u64().unwrap() as usize;
        let draws_noise = case["draws_noise"].as_bool().unwrap();
        let tol = chain_tolerance(case["config"].as_str().unwrap());
        max.cases += 1;

        let mut s = schedulers::from_config(class, config, &config_path())
            .unwrap_or_else(|e| panic!("{name}: from_config failed: {e}"));
        assert_eq!(s.class_name(), class);
        s.set_timesteps(steps).unwrap_or_else(|e| panic!("{name}: set_timesteps failed: {e}"));

        // Timesteps: what the UNet is given.
        let (ref_t, _) = fx.tensor(&format!("{name}/timesteps"));
        assert_eq!(s.timesteps().len(), ref_t.len(), "{name}: number of model calls");
        for (i, (&a, &b)) in s.timesteps().iter().zip(&ref_t).enumerate() {
            let e = (a as f64 - b as f64).abs();
            check(e <= TOL_TIMESTEP, format!("{name}: timestep {i} is {a}, diffusers {b}"));
            max.timesteps = max.timesteps.max(e);
        }

        // Sigmas.
        let (ref_sigmas, _) = fx.tensor(&format!("{name}/sigmas"));
        let sigmas = sigmas_of(class, config, steps);
        assert_eq!(sigmas.len(), ref_sigmas.len(), "{name}: number of sigmas");
        for (i, (&a, &b)) in sigmas.iter().zip(&ref_sigmas).enumerate() {
            let e = rel_err(a, b as f64);
            check(e <= TOL, format!("{name}: sigma {i} is {a}, diffusers {b}"));
            max.sigmas = max.sigmas.max(e);
        }

        // init_noise_sigma and the initial sample.
        let (init, _) = fx.tensor(&format!("{name}/init"));
        let e = rel_err(s.init_noise_sigma() as f64, init[0] as f64);
        check(e <= TOL, format!("{name}: init_noise_sigma {} vs diffusers {}", s.init_noise_sigma(), init[0]));
        max.init_noise_sigma = max.init_noise_sigma.max(e);
        let mut sample = init[1..].to_vec();

        // The chain: our own samples, fed the recorded model outputs and step noise.
        let (chain, shape) = fx.tensor(&format!("{name}/chain"));
        let (calls, n) = (shape[0], shape[2]);
        assert_eq!(calls, s.timesteps().len(), "{name}: recorded model calls");
        assert_eq!(n, sample.len());
        let row = |i: usize, k: usize| &chain[(i * 4 + k) * n..(i * 4 + k + 1) * n];
        for i in 0..calls {
            let (model_output, ref_input, ref_output, ref_noise) = (row(i, 0), row(i, 1), row(i, 2), row(i, 3));
            let input = s.scale_model_input(&sample, i);
            let e = array_err(&input, ref_input);
            check(e <= tol, format!("{name}: scaled model input {i}: error {e:e}"));
            if tol == TOL {
                max.scaled_input = max.scaled_input.max(e);
            } else {
                max.ill_conditioned = max.ill_conditioned.max(e);
            }

            let mut noise = Replay {
                next: draws_noise.then(|| ref_noise.to_vec()),
                draws: 0,
                case: format!("{name} step {i}"),
            };
            sample = s.step(model_output, i, &sample, 0.0, &mut noise).unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
            assert_eq!(noise.draws, usize::from(draws_noise), "{name}: noise draws at step {i}");
            if std::env::var("LDM_DEBUG_CASE").as_deref() == Ok(name) {
                eprintln!("{name} step {i}: sigma {:?}\n ours {:?}\n ref  {:?}", &sigmas[i..i + 2], &sample, ref_output);
            }
            let e = array_err(&sample, ref_output);
            check(e <= tol, format!("{name}: step {i} output: error {e:e}"));
            if tol == TOL {
                max.step_output = max.step_output.max(e);
            } else {
                max.ill_conditioned = max.ill_conditioned.max(e);
            }
        }
        // Past the end: an error, not a panic.
        assert!(s.step(row(0, 0), calls, &sample, 0.0, &mut Replay { next: None, draws: 0, case: name.into() }).is_err());
    }
    assert!(max.cases > 0, "no reference cases for {class}");
    eprintln!("{class}: {max:?}");
    assert!(failures.is_empty(), "{class}: {} disagreements with diffusers:\n{}", failures.len(), failures.join("\n"));
    max
}

#[test]
fn euler_discrete_matches_diffusers() {
    check_class("EulerDiscreteScheduler");
}

#[test]
fn euler_ancestral_matches_diffusers() {
    check_class("EulerAncestralDiscreteScheduler");
}

#[test]
fn dpm_solver_multistep_matches_diffusers() {
    check_class("DPMSolverMultistepScheduler");
}

/// Every config in the index's `errors` list fails in from_config with an Error::Config naming
/// the expected key.
#[test]
fn unsupported_configs_name_their_key() {
    let fx = fixture();
    for case in fx.index["errors"].as_array().unwrap() {
        let class = case["class"].as_str().unwrap();
        let field = case["field"].as_str().unwrap();
        match schedulers::from_config(class, &case["config"], &config_path()) {
            Err(Error::Config { field: f, msg, path }) => {
                assert_eq!(f, field, "{class}: error names `{f}` ({msg}), expected `{field}`");
                assert_eq!(path, config_path());
                let text = Error::Config { path, field: f, msg }.to_string();
                assert!(text.contains(field), "{text}");
            }
            Err(e) => panic!("{class} with {}: expected a config error on `{field}`, got {e}", case["config"]),
            Ok(_) => panic!("{class}: config should be refused on `{field}`: {}", case["config"]),
        }
    }
}

#[test]
fn step_counts_out_of_range_are_refused() {
    let ldm = serde_json::json!({
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": false, "set_alpha_to_one": false
    });
    let short = serde_json::json!({ "num_train_timesteps": 50 });
    for class in ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"] {
        for (config, train) in [(&ldm, 1000usize), (&short, 50)] {
            let mut s = schedulers::from_config(class, config, &config_path()).unwrap();
            for steps in [0, train + 1] {
                match s.set_timesteps(steps) {
                    Err(Error::InvalidArgument(msg)) => assert!(msg.contains(&steps.to_string()), "{msg}"),
                    other => panic!("{class}: {steps} steps of {train}: expected InvalidArgument, got {:?}", other.err()),
                }
            }
            s.set_timesteps(train).unwrap();
            assert_eq!(s.timesteps().len(), train, "{class}: {train} steps");
        }
    }
}

/// The deterministic schedulers never touch the noise source; Euler ancestral draws exactly one
/// sample-sized draw per step, the last step included.
#[test]
fn noise_is_drawn_only_by_euler_ancestral() {
    struct Counter(usize);
    impl NoiseSource for Counter {
        fn randn(&mut self, n: usize) -> Vec<f32> {
            self.0 += 1;
            vec![0.5; n]
        }
    }
    let config = serde_json::json!({});
    for (class, per_step) in [
        ("EulerDiscreteScheduler", 0),
        ("EulerAncestralDiscreteScheduler", 1),
        ("DPMSolverMultistepScheduler", 0),
    ] {
        let mut s = schedulers::from_config(class, &config, &config_path()).unwrap();
        s.set_timesteps(5).unwrap();
        let mut noise = Counter(0);
        let mut x = vec![s.init_noise_sigma(); 6];
        for i in 0..s.timesteps().len() {
            let out = s.scale_model_input(&x, i);
            x = s.step(&out, i, &x, 0.0, &mut noise).unwrap();
        }
        assert_eq!(noise.0, 5 * per_step, "{class}");
        assert!(x.iter().all(|v| v.is_finite()), "{class}");
    }
}
