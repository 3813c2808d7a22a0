//! diffusers `EulerAncestralDiscreteScheduler`: ancestral sampling with Euler steps (the
//! k-diffusion `sample_euler_ancestral`, eta = 1), as diffusers 0.42 computes it.
//!
//! Each step goes deterministically down to `sigma_down` and adds fresh noise of standard
//! deviation `sigma_up`, where `sigma_down^2 + sigma_up^2 = sigma_next^2`. The noise is drawn from
//! the run's generator at every step (the last one included, where `sigma_up = 0`), as diffusers'
//! `randn_tensor` call does, so later draws stay in step with diffusers.
//!
//! Numerics as in [`super::euler_discrete`]: the schedule as numpy/torch build it, the step in
//! float32 in diffusers' order of operations (`sigma_down^2 = sigma_next^2 - sigma_up^2` cancels
//! badly in float32, and we reproduce diffusers' rounding rather than compute it better).

use std::path::Path;

use serde::Deserialize;

use super::common::{self, BetaConfig};
use super::euler_discrete::{euler_init_noise_sigma, scale_by_sigma};
use super::{NoiseSource, Scheduler};
use crate::{Error, Result};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// The keys of diffusers' `EulerAncestralDiscreteScheduler.__init__` beyond the beta schedule,
/// with its defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct AncestralKeys {
    prediction_type: String,
    timestep_spacing: String,
    steps_offset: i64,
    rescale_betas_zero_snr: bool,
}

impl Default for AncestralKeys {
    fn default() -> Self {
        Self {
            prediction_type: "epsilon".into(),
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// diffusers' `EulerAncestralDiscreteScheduler`.
pub struct EulerAncestralDiscreteScheduler {
    path: std::path::PathBuf,
    num_train: usize,
    /// v-prediction when true, epsilon otherwise (diffusers does not implement `sample`).
    v_prediction: bool,
    spacing: String,
    steps_offset: i64,
    /// Training sigmas, ascending in training timestep (float32 values).
    train_sigmas: Vec<f64>,
    /// Inference sigmas, one per model call plus the final 0 (float32 values).
    sigmas: Vec<f64>,
    timesteps: Vec<f32>,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler from a `scheduler_config.json` value (`path` names it in errors).
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let beta: BetaConfig = common::parse(config, path)?;
        let keys: AncestralKeys = common::parse(config, path)?;
        let v_prediction = match keys.prediction_type.as_str() {
            "epsilon" => false,
            "v_prediction" => true,
            other => {
                return Err(Error::config(
                    path,
                    "prediction_type",
                    format!("`{other}` is not supported by {CLASS} (epsilon, v_prediction)"),
                ))
            }
        };
        if !matches!(keys.timestep_spacing.as_str(), "linspace" | "leading" | "trailing") {
            return Err(Error::config(
                path,
                "timestep_spacing",
                format!("`{}` is not supported (linspace, leading, trailing)", keys.timestep_spacing),
            ));
        }
        let alphas_cumprod = common::torch_alphas_cumprod(&beta, keys.rescale_betas_zero_snr, path)?;
        let train_sigmas = common::train_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f64> = train_sigmas.iter().rev().copied().collect();
        sigmas.push(0.0);
        Ok(Self {
            path: path.to_path_buf(),
            num_train: beta.num_train_timesteps,
            v_prediction,
            spacing: keys.timestep_spacing,
            steps_offset: keys.steps_offset,
            train_sigmas,
            sigmas,
            timesteps: Vec::new(),
        })
    }

    /// The inference sigmas: one per model call, then the final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        common::check_steps(steps, self.num_train, CLASS)?;
        let timesteps =
            common::spaced_timesteps_f32(&self.spacing, self.num_train, steps, self.steps_offset, &self.path)?;
        let mut sigmas: Vec<f64> =
            timesteps.iter().map(|&t| common::f32_round(common::interp_unit_grid(t, &self.train_sigmas))).collect();
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.timesteps = timesteps.into_iter().map(|t| t as f32).collect();
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
        noise: &mut dyn NoiseSource,
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
        // float32 in diffusers' order of operations (see EulerDiscreteScheduler::step).
        let (sigma, sigma_to) = (self.sigmas[index] as f32, self.sigmas[index + 1] as f32);
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        // Clamped at 0 where rounding makes the difference negative (diffusers would give NaN).
        let sigma_down = (to2 - sigma_up * sigma_up).max(0.0).sqrt();
        let dt = sigma_down - sigma;
        let (v_scale, v_div) = (-sigma / (sigma * sigma + 1.0).sqrt(), sigma * sigma + 1.0);
        // Drawn after the deterministic part, with the model output's shape, as diffusers does.
        let z = noise.randn(sample.len());
        if z.len() != sample.len() {
            return Err(Error::InvalidArgument(format!(
                "{CLASS}: the noise source gave {} values for a sample of {}",
                z.len(),
                sample.len()
            )));
        }
        Ok(sample
            .iter()
            .zip(model_output)
            .zip(&z)
            .map(|((&x, &m), &z)| {
                let pred_x0 = if self.v_prediction { m * v_scale + x / v_div } else { x - sigma * m };
                let derivative = (x - pred_x0) / sigma;
                (x + derivative * dt) + z * sigma_up
            })
            .collect())
    }
}
