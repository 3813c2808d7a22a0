//! diffusers `LMSDiscreteScheduler`: a linear multistep method (up to 4th order) on the
//! probability-flow ODE in sigma (Karras et al. 2022, k-diffusion's `sample_lms`), reproduced
//! step for step from diffusers 0.42.
//!
//! Schedules (timesteps, sigmas) are computed in f64 and rounded where diffusers stores float32;
//! the step itself is float32 in diffusers' order of operations, because with very large sigmas
//! (squaredcos_cap_v2: 1.3e4 at t = 999) the first step cancels large terms and diffusers'
//! float32 rounding shows at the 1e-3 level. The LMS coefficients are exact integrals (diffusers
//! integrates numerically, with a float32 integrand, to about 1e-7 relative).

use std::path::Path;

use serde::Deserialize;

use super::common::{self, BetaConfig};
use super::ddim::{PredictionType, TimestepSpacing};
use super::{NoiseSource, Scheduler};
use crate::{Error, Result};

/// The highest order diffusers' pipelines use (`step(order=4)`).
const ORDER: usize = 4;

/// The LMS keys of `scheduler_config.json`, with `LMSDiscreteScheduler`'s own defaults
/// (note `timestep_spacing` defaults to linspace here, not leading as for DDIM and PNDM).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct LmsConfig {
    use_karras_sigmas: bool,
    use_exponential_sigmas: bool,
    use_beta_sigmas: bool,
    prediction_type: String,
    timestep_spacing: String,
    steps_offset: i64,
    /// Not LMS keys, but diffusers' exponential sigmas read them when the config has them
    /// (e.g. a config written for Euler).
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
}

impl Default for LmsConfig {
    fn default() -> Self {
        Self {
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            prediction_type: "epsilon".into(),
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

/// How the inference sigmas are placed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SigmaSchedule {
    /// The training sigmas at the spaced timesteps.
    Interpolated,
    /// Karras et al.'s rho = 7 schedule between the interpolated extremes.
    Karras,
    /// Evenly spaced in log sigma.
    Exponential,
}

/// The LMS sampler (deterministic).
pub struct LMSDiscreteScheduler {
    train_steps: usize,
    /// `sqrt((1 - a) / a)` of every training timestep, float32 values, increasing in t.
    train_sigmas: Vec<f64>,
    /// Their logarithms, as float32 values (numpy takes `log` of a float32 array).
    log_sigmas: Vec<f64>,
    schedule: SigmaSchedule,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    timesteps: Vec<f32>,
    /// One sigma per model call and a final 0 (float32 values).
    sigmas: Vec<f64>,
    /// The last (up to 4) derivatives `(x - x0) / sigma`, oldest first.
    derivatives: Vec<Vec<f32>>,
    /// The next model call expected.
    next_index: usize,
}

impl LMSDiscreteScheduler {
    /// Builds the scheduler from a `scheduler_config.json` value (absent keys take
    /// `LMSDiscreteScheduler`'s defaults; keys of other classes are ignored). `path` names the
    /// file in errors.
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let betas: BetaConfig = common::parse(config, path)?;
        let cfg: LmsConfig = common::parse(config, path)?;
        if cfg.use_beta_sigmas {
            return Err(Error::config(path, "use_beta_sigmas", "true is not supported; only false"));
        }
        if cfg.use_karras_sigmas && cfg.use_exponential_sigmas {
            return Err(Error::config(
                path,
                "use_exponential_sigmas",
                "cannot be true together with use_karras_sigmas (only one sigma schedule can be used)",
            ));
        }
        let schedule = if cfg.use_karras_sigmas {
            SigmaSchedule::Karras
        } else if cfg.use_exponential_sigmas {
            SigmaSchedule::Exponential
        } else {
            SigmaSchedule::Interpolated
        };
        let prediction = PredictionType::parse(
            &cfg.prediction_type,
            &[PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction],
            path,
        )?;
        let spacing = TimestepSpacing::parse(&cfg.timestep_spacing, path)?;
        let train_sigmas = common::train_sigmas(&common::torch_alphas_cumprod(&betas, false, path)?);
        let log_sigmas = train_sigmas.iter().map(|s| common::f32_round(s.ln())).collect();
        Ok(Self {
            train_steps: betas.num_train_timesteps,
            train_sigmas,
            log_sigmas,
            schedule,
            sigma_min: cfg.sigma_min,
            sigma_max: cfg.sigma_max,
            prediction,
            spacing,
            steps_offset: cfg.steps_offset,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            derivatives: Vec::new(),
            next_index: 0,
        })
    }

    /// The sigma of each model call followed by a final 0 (diffusers' `sigmas`), as float32
    /// values. Empty before `set_timesteps`.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node
    /// `sigma_{i - current}` on the nodes `sigma_i, .., sigma_{i - order + 1}`. diffusers
    /// integrates it numerically (scipy `quad`); the polynomial has degree <= 3, so 3-point
    /// Gauss-Legendre (exact to degree 5) gives the same value.
    fn lms_coefficient(&self, order: usize, i: usize, current: usize) -> f64 {
        let basis = |tau: f64| -> f64 {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - self.sigmas[i - k]) / (self.sigmas[i - current] - self.sigmas[i - k]))
                .product()
        };
        let (a, b) = (self.sigmas[i], self.sigmas[i + 1]);
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let x = (3.0f64 / 5.0).sqrt();
        half * (5.0 / 9.0 * basis(mid - half * x) + 8.0 / 9.0 * basis(mid) + 5.0 / 9.0 * basis(mid + half * x))
    }
}

impl Scheduler for LMSDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        "LMSDiscreteScheduler"
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        common::check_steps(steps, self.train_steps, "LMSDiscreteScheduler")?;
        // Timesteps are float32 in diffusers (linspace keeps its fractions; leading and
        // trailing are rounded first, as for DDIM).
        let mut timesteps: Vec<f64> = self
            .spacing
            .timesteps(self.train_steps, steps, self.steps_offset)
            .into_iter()
            .map(|t| t as f32 as f64)
            .collect();
        // np.interp clamps outside [0, train - 1] (trailing spacing can give -1).
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| common::interp_unit_grid(t, &self.train_sigmas)).collect();
        if self.schedule != SigmaSchedule::Interpolated && !sigmas.is_empty() {
            let (in_min, in_max) = (sigmas[sigmas.len() - 1], sigmas[0]);
            sigmas = match self.schedule {
                // Note diffusers ramps over `steps` values even when trailing spacing gave one
                // more timestep.
                SigmaSchedule::Karras => common::karras_sigmas(in_min, in_max, steps),
                _ => common::exponential_sigmas(
                    self.sigma_min.unwrap_or(in_min),
                    self.sigma_max.unwrap_or(in_max),
                    steps,
                ),
            };
            timesteps = sigmas.iter().map(|&s| common::f32_round(common::sigma_to_t(s, &self.log_sigmas))).collect();
        }
        self.sigmas = sigmas.into_iter().map(|s| s as f32 as f64).chain([0.0]).collect();
        self.timesteps = timesteps.into_iter().map(|t| t as f32).collect();
        self.derivatives.clear();
        self.next_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The largest sigma for linspace and trailing spacing, `sqrt(sigma_max^2 + 1)` for leading
    /// (diffusers' choice; the pipelines multiply the initial noise by it).
    fn init_noise_sigma(&self) -> f32 {
        let max = self.sigmas.iter().copied().fold(0.0f64, f64::max) as f32;
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    fn scale_model_input(&self, sample: &[f32], index: usize) -> Vec<f32> {
        let sigma = self.sigmas.get(index).copied().unwrap_or(0.0) as f32;
        let scale = (sigma * sigma + 1.0).sqrt();
        sample.iter().map(|&x| x / scale).collect()
    }

    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &[f32],
        _eta: f32,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Vec<f32>> {
        if index >= self.timesteps.len() {
            return Err(Error::InvalidArgument(format!(
                "LMSDiscreteScheduler: model call {index} is beyond the {} timesteps set (call set_timesteps first)",
                self.timesteps.len()
            )));
        }
        // The multistep history makes the calls depend on their order.
        if index != self.next_index {
            return Err(Error::InvalidArgument(format!(
                "LMSDiscreteScheduler: model call {index} out of order (expected call {}); call set_timesteps to restart",
                self.next_index
            )));
        }
        if model_output.len() != sample.len() {
            return Err(Error::InvalidArgument(format!(
                "LMSDiscreteScheduler: model output has {} values but the sample has {}",
                model_output.len(),
                sample.len()
            )));
        }
        // float32 in diffusers' order of operations (see the module docs).
        let sigma = self.sigmas[index] as f32;
        let derivative: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                let x0 = match self.prediction {
                    PredictionType::Epsilon => x - sigma * m,
                    PredictionType::VPrediction => {
                        let s2 = sigma * sigma + 1.0;
                        m * (-sigma / s2.sqrt()) + x / s2
                    }
                    PredictionType::Sample => m,
                };
                (x - x0) / sigma
            })
            .collect();
        self.derivatives.push(derivative);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (index + 1).min(ORDER);
        // The coefficients are Python floats, which torch rounds to float32 when multiplying.
        let coeffs: Vec<f32> = (0..order).map(|c| self.lms_coefficient(order, index, c) as f32).collect();
        // Coefficient c goes with the derivative of call index - c (the newest first); the terms
        // are summed first, then added to the sample.
        let mut sum = vec![0.0f32; sample.len()];
        for (k, (coeff, d)) in coeffs.iter().zip(self.derivatives.iter().rev()).enumerate() {
            for (acc, &dv) in sum.iter_mut().zip(d) {
                *acc = if k == 0 { coeff * dv } else { *acc + coeff * dv };
            }
        }
        self.next_index += 1;
        Ok(sample.iter().zip(&sum).map(|(x, acc)| x + acc).collect())
    }
}
