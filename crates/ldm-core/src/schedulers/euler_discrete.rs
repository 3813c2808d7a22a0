//! diffusers `EulerDiscreteScheduler`: Euler's method on the probability-flow ODE in sigma
//! space (Karras et al. 2022, algorithm 2 with `s_churn = 0`), as diffusers 0.42 computes it.
//!
//! The sample lives in the "variance exploding" parametrisation `x = x0 + sigma * eps`, so the
//! initial noise is scaled by the largest sigma and the model sees `x / sqrt(sigma^2 + 1)`.
//!
//! Numerics: the schedule is built as numpy builds it (float64, rounded to float32 where
//! diffusers stores float32: timesteps, sigmas), from diffusers' float32 `alphas_cumprod`
//! reproduced bit for bit ([`common::torch_alphas_cumprod`]). The step itself is float32 in
//! diffusers' order of operations: `x + (x - x0) / sigma * dt` cancels at large sigmas (4096
//! for zero-terminal-SNR schedules), where diffusers' float32 rounding is visible at 1e-4 of
//! the result, so computing more exactly would disagree with diffusers by more than that.
//!
//! Model calls are indexed: diffusers looks the first timestep up in the schedule and takes its
//! second occurrence when it repeats (meant for img2img); for text-to-image that is index 0.

use std::path::Path;

use serde::Deserialize;

use super::common::{self, BetaConfig};
use super::{NoiseSource, Scheduler};
use crate::{Error, Result};

const CLASS: &str = "EulerDiscreteScheduler";

/// The keys of diffusers' `EulerDiscreteScheduler.__init__` beyond the beta schedule, with its
/// defaults. Keys written for other classes are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct EulerKeys {
    prediction_type: String,
    interpolation_type: String,
    use_karras_sigmas: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    timestep_spacing: String,
    timestep_type: String,
    steps_offset: i64,
    rescale_betas_zero_snr: bool,
    final_sigmas_type: String,
}

impl Default for EulerKeys {
    fn default() -> Self {
        Self {
            prediction_type: "epsilon".into(),
            interpolation_type: "linear".into(),
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: "linspace".into(),
            timestep_type: "discrete".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: "zero".into(),
        }
    }
}

/// How the inference sigmas are placed between the largest and smallest training sigma.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SigmaSchedule {
    /// Interpolated at the spaced timesteps.
    Spaced,
    /// Karras et al. 2022, rho = 7.
    Karras,
    /// Evenly spaced in log-sigma.
    Exponential,
}

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Prediction {
    Epsilon,
    Sample,
    /// `v_prediction` (Salimans & Ho 2022).
    Velocity,
}

/// diffusers' `EulerDiscreteScheduler` (deterministic: `s_churn = 0`, so it never draws noise).
pub struct EulerDiscreteScheduler {
    path: std::path::PathBuf,
    num_train: usize,
    prediction: Prediction,
    log_linear: bool,
    schedule: SigmaSchedule,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    spacing: String,
    /// `timestep_type = "continuous"` with v-prediction: the model is given `0.25 * ln(sigma)`.
    continuous_timesteps: bool,
    steps_offset: i64,
    final_sigma_min: bool,
    /// Training sigmas, ascending in training timestep (float32 values).
    train_sigmas: Vec<f64>,
    /// Their logs, rounded to float32 as numpy's float32 `np.log` holds them.
    log_sigmas: Vec<f64>,
    /// Inference sigmas, one per model call plus the final one (float32 values).
    sigmas: Vec<f64>,
    timesteps: Vec<f32>,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler from a `scheduler_config.json` value (`path` names it in errors).
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let beta: BetaConfig = common::parse(config, path)?;
        let keys: EulerKeys = common::parse(config, path)?;
        let prediction = match keys.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            // diffusers accepts the legacy name `original_sample` too.
            "sample" | "original_sample" => Prediction::Sample,
            "v_prediction" => Prediction::Velocity,
            other => {
                return Err(Error::config(
                    path,
                    "prediction_type",
                    format!("`{other}` is not supported by {CLASS} (epsilon, sample, v_prediction)"),
                ))
            }
        };
        let log_linear = match keys.interpolation_type.as_str() {
            "linear" => false,
            "log_linear" => true,
            other => {
                return Err(Error::config(
                    path,
                    "interpolation_type",
                    format!("`{other}` is not supported (linear, log_linear)"),
                ))
            }
        };
        let (karras, exponential, beta_sigmas) = (
            keys.use_karras_sigmas.unwrap_or(false),
            keys.use_exponential_sigmas.unwrap_or(false),
            keys.use_beta_sigmas.unwrap_or(false),
        );
        if [karras, exponential, beta_sigmas].iter().filter(|&&b| b).count() > 1 {
            return Err(Error::config(
                path,
                "use_karras_sigmas",
                "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be true",
            ));
        }
        if beta_sigmas {
            return Err(Error::config(path, "use_beta_sigmas", format!("beta sigmas are not supported by {CLASS}")));
        }
        let schedule = if karras {
            SigmaSchedule::Karras
        } else if exponential {
            SigmaSchedule::Exponential
        } else {
            SigmaSchedule::Spaced
        };
        if !matches!(keys.timestep_spacing.as_str(), "linspace" | "leading" | "trailing") {
            return Err(Error::config(
                path,
                "timestep_spacing",
                format!("`{}` is not supported (linspace, leading, trailing)", keys.timestep_spacing),
            ));
        }
        let continuous = match keys.timestep_type.as_str() {
            "discrete" => false,
            "continuous" => true,
            other => {
                return Err(Error::config(
                    path,
                    "timestep_type",
                    format!("`{other}` is not supported (discrete, continuous)"),
                ))
            }
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
        let alphas_cumprod = common::torch_alphas_cumprod(&beta, keys.rescale_betas_zero_snr, path)?;
        let train_sigmas = common::train_sigmas(&alphas_cumprod);
        let log_sigmas = train_sigmas.iter().map(|s| common::f32_round(s.ln())).collect();
        // Before `set_timesteps`, diffusers' sigmas are the training ones, descending, then 0.
        let mut sigmas: Vec<f64> = train_sigmas.iter().rev().copied().collect();
        sigmas.push(0.0);
        Ok(Self {
            path: path.to_path_buf(),
            num_train: beta.num_train_timesteps,
            prediction,
            log_linear,
            schedule,
            sigma_min: keys.sigma_min,
            sigma_max: keys.sigma_max,
            spacing: keys.timestep_spacing,
            // diffusers only switches to continuous timesteps for v-prediction.
            continuous_timesteps: continuous && prediction == Prediction::Velocity,
            steps_offset: keys.steps_offset,
            final_sigma_min,
            train_sigmas,
            log_sigmas,
            sigmas,
            timesteps: Vec::new(),
        })
    }

    /// The inference sigmas: one per model call, then the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

/// `sample / sqrt(sigma^2 + 1)` in float32, as diffusers computes it (bit for bit).
pub(crate) fn scale_by_sigma(sample: &[f32], sigma: f64) -> Vec<f32> {
    let s = sigma as f32;
    let denom = (s * s + 1.0).sqrt();
    sample.iter().map(|x| x / denom).collect()
}

/// diffusers' `init_noise_sigma` of the Euler schedulers: the largest sigma, or
/// `sqrt(sigma_max^2 + 1)` for `leading` spacing (in float32).
pub(crate) fn euler_init_noise_sigma(sigmas: &[f64], spacing: &str) -> f32 {
    let max = sigmas.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s)) as f32;
    if spacing == "linspace" || spacing == "trailing" {
        max
    } else {
        (max * max + 1.0).sqrt()
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        common::check_steps(steps, self.num_train, CLASS)?;
        let mut timesteps =
            common::spaced_timesteps_f32(&self.spacing, self.num_train, steps, self.steps_offset, &self.path)?;
        let n_train = self.train_sigmas.len();
        let mut sigmas: Vec<f64> = if self.log_linear {
            // diffusers: `torch.linspace(log(sigma_max), log(sigma_min), steps + 1).exp()`, i.e.
            // steps + 1 sigmas rather than one per timestep; with the final sigma appended after
            // them, the last model call steps to sigma_min and the final sigma is never reached.
            let (hi, lo) = (self.train_sigmas[n_train - 1].ln() as f32, self.train_sigmas[0].ln() as f32);
            common::torch_linspace_f32(hi, lo, steps + 1).into_iter().map(|l| f64::from(l).exp()).collect()
        } else {
            timesteps.iter().map(|&t| common::interp_unit_grid(t, &self.train_sigmas)).collect()
        };
        if self.schedule != SigmaSchedule::Spaced {
            // The range comes from the config when given, else from the sigmas just computed
            // (so it depends on the spacing: with `leading`, sigma_max is below the training max).
            let lo = self.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = self.sigma_max.unwrap_or(sigmas[0]);
            sigmas = match self.schedule {
                SigmaSchedule::Karras => common::karras_sigmas(lo, hi, steps),
                _ => common::exponential_sigmas(lo, hi, steps),
            };
            // The model is given the fractional training timestep of each sigma.
            timesteps = sigmas.iter().map(|&s| common::f32_round(common::sigma_to_t(s, &self.log_sigmas))).collect();
        }
        let last = if self.final_sigma_min { self.train_sigmas[0] } else { 0.0 };
        sigmas.push(last);
        self.sigmas = sigmas.into_iter().map(common::f32_round).collect();
        self.timesteps = if self.continuous_timesteps {
            // EDM-style conditioning: c_noise = ln(sigma) / 4.
            self.sigmas[..self.sigmas.len() - 1].iter().map(|&s| 0.25 * (s as f32).ln()).collect()
        } else {
            timesteps.into_iter().map(|t| t as f32).collect()
        };
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        euler_init_noise_sigma(&self.sigmas, &self.spacing)
    }

    fn scale_model_input(&self, sample: &[f32], index: usize) -> Vec<f32> {
        assert!(index < self.sigmas.len(), "{CLASS}: model call {index} is beyond the schedule");
        scale_by_sigma(sample, self.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &[f32],
        _eta: f32,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Vec<f32>> {
        if index >= self.timesteps.len() || index + 1 >= self.sigmas.len() {
            return Err(Error::InvalidArgument(format!(
                "{CLASS}: step {index} is beyond the {} steps set",
                self.timesteps.len()
            )));
        }
        if model_output.len() != sample.len() {
            return Err(Error::InvalidArgument(format!(
                "{CLASS}: model output has {} values, the sample {}",
                model_output.len(),
                sample.len()
            )));
        }
        // With s_churn = 0 (diffusers' default, and all its pipelines), gamma = 0: sigma_hat is
        // sigma and no noise is drawn.
        let sigma = self.sigmas[index] as f32;
        let dt = self.sigmas[index + 1] as f32 - sigma;
        let (v_scale, v_div) = (-sigma / (sigma * sigma + 1.0).sqrt(), sigma * sigma + 1.0);
        // float32 in diffusers' order of operations: at large sigmas (zero-SNR schedules reach
        // 4096) `sample + (sample - pred_x0) / sigma * dt` cancels, and diffusers' rounding
        // there is larger than 1e-5 of the result.
        Ok(sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let pred_x0 = match self.prediction {
                    Prediction::Epsilon => x - sigma * m,
                    Prediction::Sample => m,
                    Prediction::Velocity => m * v_scale + x / v_div,
                };
                let derivative = (x - pred_x0) / sigma;
                x + derivative * dt
            })
            .collect())
    }
}
