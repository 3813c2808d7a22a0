//! diffusers `DDIMScheduler` (Song et al., "Denoising Diffusion Implicit Models", eq. 12),
//! reproduced step for step from diffusers 0.42.
//!
//! The step is computed in float32 in diffusers' order of operations, not in f64: where the
//! cumulative alpha is tiny (squaredcos_cap_v2 caps the last beta at 0.999, leaving
//! `alphas_cumprod[999]` = 2.4e-9) the first step cancels large terms, and diffusers' float32
//! rounding then shows at the 1e-4 level; matching it operation for operation keeps us within
//! 1e-6 of diffusers there too.

use std::path::Path;

use serde::Deserialize;

use super::common::{self, np_arange_down_to_zero, np_linspace, BetaConfig};
use super::{NoiseSource, Scheduler};
use crate::{Error, Result};

/// The DDIM keys of `scheduler_config.json`, with `DDIMScheduler`'s own defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct DdimConfig {
    clip_sample: bool,
    clip_sample_range: f64,
    set_alpha_to_one: bool,
    steps_offset: i64,
    prediction_type: String,
    thresholding: bool,
    timestep_spacing: String,
    rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: "epsilon".into(),
            thresholding: false,
            timestep_spacing: "leading".into(),
            rescale_betas_zero_snr: false,
        }
    }
}

/// The DDIM sampler. With `eta = 0` it is deterministic; with `eta > 0` each step adds
/// `eta * sigma_t` times fresh noise drawn from the [`NoiseSource`].
pub struct DDIMScheduler {
    train_steps: usize,
    /// Cumulative alphas of the training schedule, as diffusers' float32 tensor holds them.
    alphas_cumprod: Vec<f32>,
    /// The "previous" cumulative alpha of the last step: 1, or `alphas_cumprod[0]`.
    final_alpha_cumprod: f32,
    /// `Some(range)` when the predicted original sample is clamped to `[-range, range]`.
    clip: Option<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    /// The `steps` of the last `set_timesteps`.
    num_inference_steps: usize,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
}

impl DDIMScheduler {
    /// Builds the scheduler from a `scheduler_config.json` value (absent keys take
    /// `DDIMScheduler`'s defaults; keys of other classes are ignored). `path` names the file in errors.
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let betas: BetaConfig = common::parse(config, path)?;
        let cfg: DdimConfig = common::parse(config, path)?;
        if cfg.thresholding {
            return Err(Error::config(
                path,
                "thresholding",
                "true (dynamic thresholding) is not supported; only false",
            ));
        }
        if cfg.rescale_betas_zero_snr {
            return Err(Error::config(path, "rescale_betas_zero_snr", "true is not supported; only false"));
        }
        if cfg.clip_sample && !(cfg.clip_sample_range.is_finite() && cfg.clip_sample_range > 0.0) {
            return Err(Error::config(
                path,
                "clip_sample_range",
                format!("{} is not a positive number", cfg.clip_sample_range),
            ));
        }
        let prediction = PredictionType::parse(
            &cfg.prediction_type,
            &[PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction],
            path,
        )?;
        let spacing = TimestepSpacing::parse(&cfg.timestep_spacing, path)?;
        let alphas_cumprod: Vec<f32> =
            common::torch_alphas_cumprod(&betas, false, path)?.into_iter().map(|a| a as f32).collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Self {
            train_steps: betas.num_train_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range as f32),
            prediction,
            spacing,
            steps_offset: cfg.steps_offset,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
        })
    }

    /// The cumulative alpha at a timestep `t >= 0`, or the final one for `t < 0`.
    fn alpha_prev(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for DDIMScheduler {
    fn class_name(&self) -> &'static str {
        "DDIMScheduler"
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        common::check_steps(steps, self.train_steps, "DDIMScheduler")?;
        let timesteps: Vec<i64> = self
            .spacing
            .timesteps(self.train_steps, steps, self.steps_offset)
            .into_iter()
            .map(|t| round_half_even(t) as i64)
            .collect();
        // diffusers would fail with an IndexError in `step` (e.g. steps_offset 1 with as many
        // steps as training timesteps asks for timestep 1000 of 0..999): say so up front.
        if let Some(&bad) = timesteps.iter().find(|&&t| py_index(t, self.train_steps).is_none()) {
            return Err(Error::InvalidArgument(format!(
                "DDIMScheduler: {steps} steps with steps_offset {} give timestep {bad}, outside the {} training timesteps",
                self.steps_offset, self.train_steps
            )));
        }
        self.num_inference_steps = steps;
        self.timesteps_f32 = timesteps.iter().map(|&t| t as f32).collect();
        self.timesteps = timesteps;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
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
        eta: f32,
        noise: &mut dyn NoiseSource,
    ) -> Result<Vec<f32>> {
        let t = *self.timesteps.get(index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "DDIMScheduler: model call {index} is beyond the {} timesteps set (call set_timesteps first)",
                self.timesteps.len()
            ))
        })?;
        if model_output.len() != sample.len() {
            return Err(Error::InvalidArgument(format!(
                "DDIMScheduler: model output has {} values but the sample has {}",
                model_output.len(),
                sample.len()
            )));
        }
        // diffusers steps back by train // steps whatever the spacing, so with trailing or
        // linspace spacing the "previous" timestep need not be the next one of the list.
        let prev_t = t - (self.train_steps / self.num_inference_steps) as i64;
        // `t` was checked in set_timesteps; trailing spacing can give -1, which indexes from the
        // end as in Python.
        let a_t = py_index(t, self.train_steps).map(|i| self.alphas_cumprod[i]).unwrap_or(f32::NAN);
        let a_prev = self.alpha_prev(prev_t);
        // float32 throughout, in diffusers' order of operations (see the module docs).
        let b_t = 1.0 - a_t;
        let (sa_t, sb_t) = (a_t.sqrt(), b_t.sqrt());
        // sigma_t of eq. 16: the DDPM posterior standard deviation, scaled by eta.
        let variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev);
        let std_dev = eta * variance.sqrt();
        let dir_coeff = (1.0 - a_prev - std_dev * std_dev).sqrt();
        let sa_prev = a_prev.sqrt();

        let mut prev: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&e, &x)| {
                let (mut x0, eps) = match self.prediction {
                    PredictionType::Epsilon => ((x - sb_t * e) / sa_t, e),
                    PredictionType::Sample => (e, (x - sa_t * e) / sb_t),
                    PredictionType::VPrediction => (sa_t * x - sb_t * e, sa_t * e + sb_t * x),
                };
                // Clipping changes only x0: the direction term keeps the unclipped epsilon
                // (diffusers' `use_clipped_model_output` is false in the pipelines).
                if let Some(r) = self.clip {
                    x0 = x0.clamp(-r, r);
                }
                sa_prev * x0 + dir_coeff * eps
            })
            .collect();

        // Noise is drawn after the deterministic part, and only for eta > 0, where diffusers
        // calls `randn_tensor` with the sample's shape.
        if eta > 0.0 {
            let z = noise.randn(sample.len());
            if z.len() != sample.len() {
                return Err(Error::InvalidArgument(format!(
                    "DDIMScheduler: noise source gave {} values for a sample of {}",
                    z.len(),
                    sample.len()
                )));
            }
            for (p, &z) in prev.iter_mut().zip(&z) {
                *p += std_dev * z;
            }
        }
        Ok(prev)
    }
}

// ---------------------------------------------------------------------------------------------
// Config enums and timestep helpers shared by DDIM, PNDM and LMS (kept here rather than in
// common.rs, which the sigma-based schedulers' helpers occupy).

/// What the model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise (`"epsilon"`).
    Epsilon,
    /// The denoised sample (`"sample"`).
    Sample,
    /// Salimans & Ho's velocity (`"v_prediction"`).
    VPrediction,
}

impl PredictionType {
    /// Parses `prediction_type`, accepting only the kinds in `allowed` (a scheduler's own).
    pub fn parse(value: &str, allowed: &[PredictionType], path: &Path) -> Result<Self> {
        let kind = match value {
            "epsilon" => Some(PredictionType::Epsilon),
            "sample" => Some(PredictionType::Sample),
            "v_prediction" => Some(PredictionType::VPrediction),
            _ => None,
        };
        match kind {
            Some(k) if allowed.contains(&k) => Ok(k),
            _ => {
                let names: Vec<&str> = allowed.iter().map(|k| k.name()).collect();
                Err(Error::config(
                    path,
                    "prediction_type",
                    format!("`{value}` is not supported (expected one of: {})", names.join(", ")),
                ))
            }
        }
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::Sample => "sample",
            PredictionType::VPrediction => "v_prediction",
        }
    }
}

/// How inference timesteps are spread over the training schedule (`timestep_spacing`; Lin et
/// al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    /// Parses `timestep_spacing`.
    pub fn parse(value: &str, path: &Path) -> Result<Self> {
        match value {
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            "linspace" => Ok(TimestepSpacing::Linspace),
            other => Err(Error::config(
                path,
                "timestep_spacing",
                format!("`{other}` is not supported (expected leading, trailing or linspace)"),
            )),
        }
    }

    /// The inference timesteps, largest first, as DDIM, PNDM and LMS compute them:
    /// - leading: `arange(steps) * (train // steps) + steps_offset`;
    /// - trailing: `round(arange(train, 0, -train / steps)) - 1`, which can hold one value more
    ///   than `steps`, the last being -1 (see [`np_arange_down_to_zero`] and [`py_index`]);
    /// - linspace: `linspace(0, train - 1, steps)`, NOT rounded here (DDIM and PNDM round it,
    ///   LMS keeps the fractions); no offset.
    pub fn timesteps(self, train: usize, steps: usize, steps_offset: i64) -> Vec<f64> {
        match self {
            TimestepSpacing::Leading => {
                let ratio = (train / steps.max(1)) as f64;
                (0..steps).rev().map(|i| i as f64 * ratio + steps_offset as f64).collect()
            }
            TimestepSpacing::Trailing => np_arange_down_to_zero(train as f64, train as f64 / steps as f64)
                .into_iter()
                .map(|t| round_half_even(t) - 1.0)
                .collect(),
            TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps).into_iter().rev().collect(),
        }
    }
}

/// numpy's `round`: halves go to the even neighbour (62.5 -> 62).
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// Python's indexing by a possibly negative index (`a[-1]` is the last value). Trailing spacing
/// can give timestep -1 (`np.arange(1000, 0, -1000 / 61)` has 62 values, the last about 1e-13,
/// which rounds to 0), and DDIM and PNDM index their `alphas_cumprod` with it this way.
pub fn py_index(t: i64, len: usize) -> Option<usize> {
    let len = len as i64;
    let i = if t < 0 { t + len } else { t };
    (0..len).contains(&i).then_some(i as usize)
}
