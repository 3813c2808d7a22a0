//! diffusers `DPMSolverMultistepScheduler`: the multistep DPM-Solver (Lu et al. 2022,
//! "DPM-Solver", and "DPM-Solver++" for guided sampling) of order 1 to 3, as diffusers 0.42
//! computes it, including its SDE variants.
//!
//! The sample lives in the variance-preserving parametrisation `x = alpha_t x0 + sigma_t eps`:
//! the initial noise has standard deviation 1 and the model input is not scaled. Each model
//! output is converted to a data prediction (`++` variants) or a noise prediction, and the
//! update uses the last `solver_order` of them, with `h` the step in `lambda = ln(alpha_t / sigma_t)`.
//!
//! Numerics: the schedule is built as numpy builds it (float64, rounded to float32 where
//! diffusers stores float32), from diffusers' float32 `alphas_cumprod` reproduced bit for bit.
//! The updates are float32 in diffusers' order of operations, coefficients included: with a
//! large first sigma the data prediction `(x - sigma_t eps) / alpha_t` amplifies rounding by
//! `1 / alpha_t`, so exact arithmetic would disagree with diffusers by more than its own
//! rounding. What remains is torch's `exp`/`log` (Sleef/MKL), which are not correctly rounded.
//!
//! Surprises reproduced from diffusers 0.42:
//! - Karras / Lu / exponential timesteps are rounded to integers, except for the
//!   `squaredcos_cap_v2` schedule where they are truncated (stored as int64), so the first
//!   Karras timestep there is 998, repeated.
//! - `sigma_min`/`sigma_max` are not keys of this class, but diffusers keeps keys of other
//!   classes as hidden config attributes and its Karras/exponential sigmas read them, so an
//!   Euler config's values are used.
//! - `final_sigmas_type = "zero"` (the default) is refused for `algorithm_type` names other
//!   than `dpmsolver++`/`sde-dpmsolver++` as written, `deis` included.
//! - Model calls are indexed. diffusers finds its first step by looking the first timestep up
//!   and takes its second occurrence when it repeats (meant for img2img), which with the cosine
//!   Karras schedule above skips a step and then fails; indexing is what it means to do.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use super::common::{self, BetaConfig};
use super::{NoiseSource, Scheduler};
use crate::{Error, Result};

const CLASS: &str = "DPMSolverMultistepScheduler";

/// diffusers writes `lambda_min_clipped = -inf` as the non-JSON token `-Infinity`; a loader may
/// hand it over as null or as a string, so accept a number, null (the default) or a string such
/// as "-inf".
fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
        Null(()),
    }
    match Option::<Num>::deserialize(d)? {
        Some(Num::F(v)) => Ok(v),
        None | Some(Num::Null(())) => Ok(f64::NEG_INFINITY),
        Some(Num::S(s)) => s.trim().parse::<f64>().map_err(|_| serde::de::Error::custom(format!("`{s}` is not a number"))),
    }
}

/// The keys of diffusers' `DPMSolverMultistepScheduler.__init__` beyond the beta schedule, with
/// its defaults, and `sigma_min`/`sigma_max`: diffusers keeps keys of other classes (an Euler
/// config's) as hidden config attributes, and its Karras/exponential conversions read them.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct DpmKeys {
    solver_order: i64,
    prediction_type: String,
    thresholding: bool,
    algorithm_type: String,
    solver_type: String,
    lower_order_final: bool,
    euler_at_final: bool,
    use_karras_sigmas: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    use_lu_lambdas: Option<bool>,
    use_flow_sigmas: Option<bool>,
    final_sigmas_type: String,
    #[serde(deserialize_with = "lenient_f64")]
    lambda_min_clipped: f64,
    variance_type: Option<String>,
    timestep_spacing: String,
    steps_offset: i64,
    rescale_betas_zero_snr: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
}

impl Default for DpmKeys {
    fn default() -> Self {
        Self {
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            use_lu_lambdas: Some(false),
            use_flow_sigmas: Some(false),
            final_sigmas_type: "zero".into(),
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Algorithm {
    /// DPM-Solver++: multistep on the data prediction.
    DpmSolverPP,
    /// DPM-Solver: multistep on the noise prediction.
    DpmSolver,
    /// SDE-DPM-Solver++: data prediction, fresh noise each step.
    SdeDpmSolverPP,
    /// SDE-DPM-Solver: noise prediction, fresh noise each step (orders 1 and 2).
    SdeDpmSolver,
}

impl Algorithm {
    fn data_prediction(self) -> bool {
        matches!(self, Algorithm::DpmSolverPP | Algorithm::SdeDpmSolverPP)
    }
    fn stochastic(self) -> bool {
        matches!(self, Algorithm::SdeDpmSolverPP | Algorithm::SdeDpmSolver)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Prediction {
    Epsilon,
    Sample,
    /// `v_prediction` (Salimans & Ho 2022).
    Velocity,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SigmaSchedule {
    Spaced,
    Karras,
    LuLambdas,
    Exponential,
}

/// diffusers' `DPMSolverMultistepScheduler`.
pub struct DPMSolverMultistepScheduler {
    path: std::path::PathBuf,
    num_train: usize,
    order: usize,
    prediction: Prediction,
    algorithm: Algorithm,
    /// Heun's second-order coefficients instead of the midpoint ones.
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    schedule: SigmaSchedule,
    /// diffusers rounds converted timesteps to integers except for the cosine schedule, where
    /// they are truncated.
    round_timesteps: bool,
    final_sigma_min: bool,
    lambda_min_clipped: f64,
    spacing: String,
    steps_offset: i64,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    /// Training sigmas, ascending in training timestep (float32 values), their float32 logs, and
    /// `lambda_t = ln(alpha_t) - ln(sigma_t)` per training timestep (float32 values).
    train_sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
    lambdas: Vec<f64>,
    /// Inference sigmas, one per model call plus the final one (float32 values).
    sigmas: Vec<f64>,
    timesteps: Vec<f32>,
    /// The converted outputs of the last `order` model calls, oldest first.
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
}

impl DPMSolverMultistepScheduler {
    /// Builds the scheduler from a `scheduler_config.json` value (`path` names it in errors).
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let beta: BetaConfig = common::parse(config, path)?;
        let keys: DpmKeys = common::parse(config, path)?;
        let algorithm = match keys.algorithm_type.as_str() {
            // diffusers maps the DEIS name onto DPM-Solver++.
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPP,
            "dpmsolver" => Algorithm::DpmSolver,
            "sde-dpmsolver++" => Algorithm::SdeDpmSolverPP,
            "sde-dpmsolver" => Algorithm::SdeDpmSolver,
            other => {
                return Err(Error::config(
                    path,
                    "algorithm_type",
                    format!("`{other}` is not supported (dpmsolver++, dpmsolver, sde-dpmsolver++, sde-dpmsolver)"),
                ))
            }
        };
        let heun = match keys.solver_type.as_str() {
            // diffusers maps UniPC's/DEIS's solver names onto the midpoint solver.
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => {
                return Err(Error::config(
                    path,
                    "solver_type",
                    format!("`{other}` is not supported (midpoint, heun)"),
                ))
            }
        };
        let order = match keys.solver_order {
            o @ 1..=3 => o as usize,
            o => return Err(Error::config(path, "solver_order", format!("{o} is not supported (1, 2 or 3)"))),
        };
        if algorithm == Algorithm::SdeDpmSolver && order == 3 {
            // diffusers has no third-order SDE-DPM-Solver update (it fails at the third step).
            return Err(Error::config(
                path,
                "solver_order",
                "3 is not supported with algorithm_type `sde-dpmsolver` (use 1 or 2, or sde-dpmsolver++)",
            ));
        }
        let prediction = match keys.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "sample" => Prediction::Sample,
            "v_prediction" => Prediction::Velocity,
            other => {
                return Err(Error::config(
                    path,
                    "prediction_type",
                    format!("`{other}` is not supported by {CLASS} (epsilon, sample, v_prediction)"),
                ))
            }
        };
        if keys.thresholding {
            return Err(Error::config(path, "thresholding", format!("dynamic thresholding is not supported by {CLASS}")));
        }
        if let Some(v) = keys.variance_type.as_deref() {
            if prediction == Prediction::Epsilon && matches!(v, "learned" | "learned_range") {
                return Err(Error::config(
                    path,
                    "variance_type",
                    format!("`{v}` (a model that also predicts its variance) is not supported by {CLASS}"),
                ));
            }
        }
        if keys.use_flow_sigmas.unwrap_or(false) {
            return Err(Error::config(path, "use_flow_sigmas", format!("flow-matching sigmas are not supported by {CLASS}")));
        }
        if keys.use_beta_sigmas.unwrap_or(false) {
            return Err(Error::config(path, "use_beta_sigmas", format!("beta sigmas are not supported by {CLASS}")));
        }
        let (karras, exponential, lu) = (
            keys.use_karras_sigmas.unwrap_or(false),
            keys.use_exponential_sigmas.unwrap_or(false),
            keys.use_lu_lambdas.unwrap_or(false),
        );
        if karras && exponential {
            return Err(Error::config(
                path,
                "use_karras_sigmas",
                "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be true",
            ));
        }
        // diffusers checks Karras first, then Lu's lambdas, then exponential sigmas.
        let schedule = if karras {
            SigmaSchedule::Karras
        } else if lu {
            SigmaSchedule::LuLambdas
        } else if exponential {
            SigmaSchedule::Exponential
        } else {
            SigmaSchedule::Spaced
        };
        let final_sigma_min = match keys.final_sigmas_type.as_str() {
            "zero" => false,
            "sigma_min" => true,
            other => {
                return Err(Error::config(
                    path,
                    "final_sigmas_type",
                    format!("`{other}` is not supported (zero, sigma_min)"),
                ))
            }
        };
        if !final_sigma_min && !matches!(keys.algorithm_type.as_str(), "dpmsolver++" | "sde-dpmsolver++") {
            // The noise-prediction update cannot reach sigma 0. diffusers checks the name as
            // written, so `deis` (otherwise DPM-Solver++) needs sigma_min too.
            return Err(Error::config(
                path,
                "final_sigmas_type",
                format!("`zero` is not supported with algorithm_type `{}` (use sigma_min)", keys.algorithm_type),
            ));
        }
        if !matches!(keys.timestep_spacing.as_str(), "linspace" | "leading" | "trailing") {
            return Err(Error::config(
                path,
                "timestep_spacing",
                format!("`{}` is not supported (linspace, leading, trailing)", keys.timestep_spacing),
            ));
        }
        if keys.lambda_min_clipped.is_nan() {
            return Err(Error::config(path, "lambda_min_clipped", "is not a number"));
        }
        let alphas_cumprod = common::torch_alphas_cumprod(&beta, keys.rescale_betas_zero_snr, path)?;
        let train_sigmas = common::train_sigmas(&alphas_cumprod);
        let log_sigmas = train_sigmas.iter().map(|s| common::f32_round(s.ln())).collect();
        let lambdas = alphas_cumprod
            .iter()
            .map(|&a| {
                let a = a as f32;
                let (alpha, sigma) = (a.sqrt(), (1.0 - a).sqrt());
                f64::from(alpha.ln() - sigma.ln())
            })
            .collect();
        let mut sigmas = train_sigmas.clone();
        sigmas.push(0.0);
        Ok(Self {
            path: path.to_path_buf(),
            num_train: beta.num_train_timesteps,
            order,
            prediction,
            algorithm,
            heun,
            lower_order_final: keys.lower_order_final,
            euler_at_final: keys.euler_at_final,
            schedule,
            round_timesteps: beta.beta_schedule != "squaredcos_cap_v2",
            final_sigma_min,
            lambda_min_clipped: keys.lambda_min_clipped,
            spacing: keys.timestep_spacing,
            steps_offset: keys.steps_offset,
            sigma_min: keys.sigma_min,
            sigma_max: keys.sigma_max,
            train_sigmas,
            log_sigmas,
            lambdas,
            sigmas,
            timesteps: Vec::new(),
            model_outputs: vec![None; order],
            lower_order_nums: 0,
        })
    }

    /// The inference sigmas: one per model call, then the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The integer timesteps of the spacing, before any sigma conversion.
    fn spaced_timesteps(&self, steps: usize) -> Result<Vec<f64>> {
        // Timesteps whose log-SNR is below lambda_min_clipped are cut off the top of the range.
        let clipped = self.lambdas.iter().rev().filter(|&&l| l < self.lambda_min_clipped).count();
        let last = self.num_train - clipped;
        Ok(match self.spacing.as_str() {
            "linspace" => {
                let v = common::np_linspace(0.0, last as f64 - 1.0, steps + 1);
                v.into_iter().rev().take(steps).map(f64::round_ties_even).collect()
            }
            "leading" => {
                let ratio = last / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio) as f64 + self.steps_offset as f64).collect()
            }
            "trailing" => {
                let ratio = self.num_train as f64 / steps as f64;
                common::np_arange_down_to_zero(last as f64, ratio).into_iter().map(|t| t.round_ties_even() - 1.0).collect()
            }
            other => {
                return Err(Error::config(
                    &self.path,
                    "timestep_spacing",
                    format!("`{other}` is not supported (linspace, leading, trailing)"),
                ))
            }
        })
    }

    /// `alpha_t = 1 / sqrt(sigma^2 + 1)` and `sigma_t = sigma * alpha_t` of inference sigma `i`,
    /// with its log-SNR `lambda = ln(alpha_t) - ln(sigma_t)` (infinite for sigma 0), in float32
    /// as diffusers computes them.
    fn alpha_sigma_lambda(&self, i: usize) -> (f32, f32, f32) {
        let sigma = self.sigmas[i] as f32;
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha;
        (alpha, sigma_t, alpha.ln() - sigma_t.ln())
    }

    /// The model output as the quantity the solver integrates: the data prediction for the `++`
    /// variants, the noise prediction otherwise.
    fn convert(&self, model_output: &[f32], sample: &[f32], index: usize) -> Vec<f32> {
        let (alpha, sigma, _) = self.alpha_sigma_lambda(index);
        let data = self.algorithm.data_prediction();
        sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| match (data, self.prediction) {
                (true, Prediction::Epsilon) => (x - sigma * m) / alpha,
                (true, Prediction::Sample) => m,
                (true, Prediction::Velocity) => alpha * x - sigma * m,
                (false, Prediction::Epsilon) => m,
                (false, Prediction::Sample) => (x - alpha * m) / sigma,
                (false, Prediction::Velocity) => alpha * m + sigma * x,
            })
            .collect()
    }

    /// The coefficient of the sample, and of the noise for the SDE variants, of an update from
    /// `s0` to `t` with log-SNR step `h`.
    fn sample_and_noise_coefs(&self, t: (f32, f32), s0: (f32, f32), h: f32) -> (f32, f32) {
        let ((alpha_t, sigma_t), (alpha_s0, sigma_s0)) = (t, s0);
        match self.algorithm {
            Algorithm::DpmSolverPP => (sigma_t / sigma_s0, 0.0),
            Algorithm::DpmSolver => (alpha_t / alpha_s0, 0.0),
            Algorithm::SdeDpmSolverPP => (sigma_t / sigma_s0 * (-h).exp(), sigma_t * (1.0 - (-2.0 * h).exp()).sqrt()),
            Algorithm::SdeDpmSolver => (alpha_t / alpha_s0, sigma_t * ((2.0 * h).exp() - 1.0).sqrt()),
        }
    }

    /// `sum_k c_k * v_k` over the terms, plus `c_z * z` when the update is stochastic, added up
    /// left to right as diffusers' expressions do (each term rounded to float32 first).
    fn combine(terms: &[(f32, &[f32])], z: Option<(f32, &[f32])>) -> Vec<f32> {
        let n = terms[0].1.len();
        (0..n)
            .map(|k| {
                let mut acc = terms[0].0 * terms[0].1[k];
                for (c, v) in &terms[1..] {
                    acc += *c * v[k];
                }
                if let Some((c, z)) = z {
                    acc += c * z[k];
                }
                acc
            })
            .collect()
    }

    /// First-order update (DDIM-like) from sigma `i` to sigma `i + 1`.
    fn first_order(&self, i: usize, m: &[f32], x: &[f32], z: Option<&[f32]>) -> Vec<f32> {
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(i + 1);
        let (alpha_s, sigma_s, lambda_s) = self.alpha_sigma_lambda(i);
        let h = lambda_t - lambda_s;
        let (c_x, c_z) = self.sample_and_noise_coefs((alpha_t, sigma_t), (alpha_s, sigma_s), h);
        // diffusers writes these as `A - c * m`; adding `-c * m` rounds the same.
        let c_m = match self.algorithm {
            Algorithm::DpmSolverPP => -(alpha_t * ((-h).exp() - 1.0)),
            Algorithm::DpmSolver => -(sigma_t * (h.exp() - 1.0)),
            Algorithm::SdeDpmSolverPP => alpha_t * (1.0 - (-2.0 * h).exp()),
            Algorithm::SdeDpmSolver => -(2.0 * (sigma_t * (h.exp() - 1.0))),
        };
        Self::combine(&[(c_x, x), (c_m, m)], z.map(|z| (c_z, z)))
    }

    /// Second-order multistep update from sigma `i` to `i + 1`, using the outputs at `i` (m0)
    /// and `i - 1` (m1).
    fn second_order(&self, i: usize, m0: &[f32], m1: &[f32], x: &[f32], z: Option<&[f32]>) -> Vec<f32> {
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(i + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(i);
        let (_, _, lambda_s1) = self.alpha_sigma_lambda(i - 1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        // D0 = m0, D1 = (1 / r0) * (m0 - m1).
        let inv_r0 = 1.0 / r0;
        let d1: Vec<f32> = m0.iter().zip(m1).map(|(a, b)| inv_r0 * (a - b)).collect();
        let (c_x, c_z) = self.sample_and_noise_coefs((alpha_t, sigma_t), (alpha_s0, sigma_s0), h);
        let (c_d0, c_d1) = match (self.algorithm, self.heun) {
            (Algorithm::DpmSolverPP, false) => {
                let a = alpha_t * ((-h).exp() - 1.0);
                (-a, -(0.5 * a))
            }
            (Algorithm::DpmSolverPP, true) => {
                (-(alpha_t * ((-h).exp() - 1.0)), alpha_t * (((-h).exp() - 1.0) / h + 1.0))
            }
            (Algorithm::DpmSolver, false) => {
                let a = sigma_t * (h.exp() - 1.0);
                (-a, -(0.5 * a))
            }
            (Algorithm::DpmSolver, true) => (-(sigma_t * (h.exp() - 1.0)), -(sigma_t * ((h.exp() - 1.0) / h - 1.0))),
            (Algorithm::SdeDpmSolverPP, heun) => {
                let e = 1.0 - (-2.0 * h).exp();
                let c_d1 = if heun { alpha_t * (e / (-2.0 * h) + 1.0) } else { 0.5 * (alpha_t * e) };
                (alpha_t * e, c_d1)
            }
            (Algorithm::SdeDpmSolver, heun) => {
                let a = sigma_t * (h.exp() - 1.0);
                let c_d1 = if heun { -(2.0 * (sigma_t * ((h.exp() - 1.0) / h - 1.0))) } else { -a };
                (-(2.0 * a), c_d1)
            }
        };
        Self::combine(&[(c_x, x), (c_d0, m0), (c_d1, &d1)], z.map(|z| (c_z, z)))
    }

    /// Third-order multistep update from sigma `i` to `i + 1`, using the outputs at `i`, `i - 1`
    /// and `i - 2`.
    fn third_order(&self, i: usize, m: [&[f32]; 3], x: &[f32], z: Option<&[f32]>) -> Vec<f32> {
        let [m0, m1, m2] = m;
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(i + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(i);
        let (_, _, lambda_s1) = self.alpha_sigma_lambda(i - 1);
        let (_, _, lambda_s2) = self.alpha_sigma_lambda(i - 2);
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let (inv_r0, inv_r1, w, inv_sum) = (1.0 / r0, 1.0 / r1, r0 / (r0 + r1), 1.0 / (r0 + r1));
        let mut d1 = Vec::with_capacity(x.len());
        let mut d2 = Vec::with_capacity(x.len());
        for k in 0..x.len() {
            let d1_0 = inv_r0 * (m0[k] - m1[k]);
            let d1_1 = inv_r1 * (m1[k] - m2[k]);
            let diff = d1_0 - d1_1;
            d1.push(d1_0 + w * diff);
            d2.push(inv_sum * diff);
        }
        let (c_x, c_z) = self.sample_and_noise_coefs((alpha_t, sigma_t), (alpha_s0, sigma_s0), h);
        let (c_d0, c_d1, c_d2) = match self.algorithm {
            Algorithm::DpmSolverPP => {
                let e = (-h).exp();
                (-(alpha_t * (e - 1.0)), alpha_t * ((e - 1.0) / h + 1.0), -(alpha_t * ((e - 1.0 + h) / (h * h) - 0.5)))
            }
            Algorithm::DpmSolver => {
                let e = h.exp();
                (
                    -(sigma_t * (e - 1.0)),
                    -(sigma_t * ((e - 1.0) / h - 1.0)),
                    -(sigma_t * ((e - 1.0 - h) / (h * h) - 0.5)),
                )
            }
            Algorithm::SdeDpmSolverPP => {
                let e = 1.0 - (-2.0 * h).exp();
                (
                    alpha_t * e,
                    alpha_t * (e / (-2.0 * h) + 1.0),
                    alpha_t * ((e - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5),
                )
            }
            // Refused in from_config (diffusers has no such update).
            Algorithm::SdeDpmSolver => (f32::NAN, f32::NAN, f32::NAN),
        };
        Self::combine(&[(c_x, x), (c_d0, m0), (c_d1, &d1), (c_d2, &d2)], z.map(|z| (c_z, z)))
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        common::check_steps(steps, self.num_train, CLASS)?;
        let mut timesteps = self.spaced_timesteps(steps)?;
        let mut sigmas: Vec<f64> = match self.schedule {
            SigmaSchedule::Spaced => {
                timesteps.iter().map(|&t| common::interp_unit_grid(t, &self.train_sigmas)).collect()
            }
            SigmaSchedule::Karras | SigmaSchedule::Exponential => {
                // Unlike Euler, the range is the whole training range, not the spaced one.
                let n = self.train_sigmas.len();
                let lo = self.sigma_min.unwrap_or(self.train_sigmas[0]);
                let hi = self.sigma_max.unwrap_or(self.train_sigmas[n - 1]);
                if self.schedule == SigmaSchedule::Karras {
                    common::karras_sigmas(lo, hi, steps)
                } else {
                    common::exponential_sigmas(lo, hi, steps)
                }
            }
            SigmaSchedule::LuLambdas => {
                // Lu et al.'s uniform log-SNR steps; diffusers spaces ln(sigma) (= -lambda of the
                // VE sigma) uniformly from its largest to its smallest training value.
                let n = self.log_sigmas.len();
                let (hi, lo) = (self.log_sigmas[n - 1], self.log_sigmas[0]);
                common::np_linspace(0.0, 1.0, steps).into_iter().map(|r| (hi + r * (lo - hi)).exp()).collect()
            }
        };
        if self.schedule != SigmaSchedule::Spaced {
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = common::sigma_to_t(s, &self.log_sigmas);
                    let t = if self.round_timesteps && self.schedule != SigmaSchedule::Exponential {
                        t.round_ties_even()
                    } else {
                        t
                    };
                    // Stored as int64: fractional timesteps are truncated.
                    t.trunc()
                })
                .collect();
        }
        let last = if self.final_sigma_min { self.train_sigmas[0] } else { 0.0 };
        sigmas.push(last);
        self.sigmas = sigmas.into_iter().map(common::f32_round).collect();
        self.timesteps = timesteps.into_iter().map(|t| t as f32).collect();
        self.model_outputs = vec![None; self.order];
        self.lower_order_nums = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input(&self, sample: &[f32], _index: usize) -> Vec<f32> {
        sample.to_vec()
    }

    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &[f32],
        _eta: f32,
        noise: &mut dyn NoiseSource,
    ) -> Result<Vec<f32>> {
        let n = self.timesteps.len();
        if index >= n || index + 1 >= self.sigmas.len() {
            return Err(Error::InvalidArgument(format!("{CLASS}: step {index} is beyond the {n} steps set")));
        }
        if model_output.len() != sample.len() {
            return Err(Error::InvalidArgument(format!(
                "{CLASS}: model output has {} values, the sample {}",
                model_output.len(),
                sample.len()
            )));
        }
        // diffusers lowers the order near the end: always at the last step when the final sigma
        // is 0 (the higher-order terms would divide by an infinite log-SNR step), and for short
        // schedules (< 15 steps) with lower_order_final, which stabilises few-step sampling.
        let short = self.lower_order_final && n < 15;
        let final_first_order = index == n - 1 && (self.euler_at_final || short || !self.final_sigma_min);
        let final_second_order = index + 2 == n && short;

        let converted = self.convert(model_output, sample, index);
        self.model_outputs.rotate_left(1);
        self.model_outputs[self.order - 1] = Some(converted);

        let z = if self.algorithm.stochastic() {
            let z = noise.randn(sample.len());
            if z.len() != sample.len() {
                return Err(Error::InvalidArgument(format!(
                    "{CLASS}: the noise source gave {} values for a sample of {}",
                    z.len(),
                    sample.len()
                )));
            }
            Some(z)
        } else {
            None
        };
        let z = z.as_deref();

        let history = |back: usize| -> Result<&[f32]> {
            self.model_outputs[self.order - 1 - back].as_deref().ok_or_else(|| {
                Error::InvalidArgument(format!("{CLASS}: step {index} needs model output {back} steps back"))
            })
        };
        let out = if self.order == 1 || self.lower_order_nums < 1 || final_first_order {
            self.first_order(index, history(0)?, sample, z)
        } else if self.order == 2 || self.lower_order_nums < 2 || final_second_order {
            self.second_order(index, history(0)?, history(1)?, sample, z)
        } else {
            self.third_order(index, [history(0)?, history(1)?, history(2)?], sample, z)
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(out)
    }
}
