//! diffusers `PNDMScheduler` (Liu et al., "Pseudo Numerical Methods for Diffusion Models on
//! Manifolds"), reproduced model call for model call from diffusers 0.42.
//!
//! Unless `skip_prk_steps` is set, the first three steps are pseudo Runge-Kutta steps of four
//! model calls each (12 calls), followed by pseudo linear multistep (PLMS) steps of one call each:
//! `steps + 9` model calls in all, some timesteps repeated. With `skip_prk_steps` the first PLMS
//! step is a two-call (Heun-like) step: `steps + 1` calls.
//!
//! Arithmetic is float32 in diffusers' order of operations (as for DDIM): where the cumulative
//! alpha is tiny (squaredcos_cap_v2 at t = 999) the transfer formula cancels large terms and
//! diffusers' float32 rounding shows at the 1e-4 level.

use std::path::Path;

use serde::Deserialize;

use super::common::{self, BetaConfig};
use super::ddim::{py_index, round_half_even, PredictionType, TimestepSpacing};
use super::{NoiseSource, Scheduler};
use crate::{Error, Result};

// Python evaluates `1 / 6 * model_output` as the double 1/6 times a float32 tensor, which torch
// rounds to float32 first.
const SIXTH: f32 = (1.0f64 / 6.0) as f32;
const THIRD: f32 = (1.0f64 / 3.0) as f32;
const TWENTY_FOURTH: f32 = (1.0f64 / 24.0) as f32;

/// The PNDM keys of `scheduler_config.json`, with `PNDMScheduler`'s own defaults. (PNDM has no
/// `clip_sample` or `thresholding`: those keys of a DDIM config are ignored, as in diffusers.)
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct PndmConfig {
    skip_prk_steps: bool,
    set_alpha_to_one: bool,
    prediction_type: String,
    timestep_spacing: String,
    steps_offset: i64,
}

impl Default for PndmConfig {
    fn default() -> Self {
        Self {
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            steps_offset: 0,
        }
    }
}

/// The PNDM sampler (deterministic; it never draws noise).
pub struct PNDMScheduler {
    train_steps: usize,
    /// Cumulative alphas of the training schedule, as diffusers' float32 tensor holds them.
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    skip_prk_steps: bool,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    num_inference_steps: usize,
    /// Every model call's timestep: the Runge-Kutta ones first, then the PLMS ones.
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    /// How many of `timesteps` are Runge-Kutta calls (0 with `skip_prk_steps`).
    prk_len: usize,
    /// Model calls taken since `set_timesteps` (diffusers' `counter`).
    counter: usize,
    /// Past model outputs (epsilon) kept for the multistep formulas (diffusers' `ets`).
    ets: Vec<Vec<f32>>,
    /// The weighted sum of the current Runge-Kutta step's model outputs so far.
    cur_model_output: Vec<f32>,
    /// The sample a multi-call step starts from.
    cur_sample: Option<Vec<f32>>,
}

impl PNDMScheduler {
    /// Builds the scheduler from a `scheduler_config.json` value (absent keys take
    /// `PNDMScheduler`'s defaults; keys of other classes are ignored). `path` names the file in errors.
    pub fn from_config(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let betas: BetaConfig = common::parse(config, path)?;
        let cfg: PndmConfig = common::parse(config, path)?;
        let prediction =
            PredictionType::parse(&cfg.prediction_type, &[PredictionType::Epsilon, PredictionType::VPrediction], path)?;
        let spacing = TimestepSpacing::parse(&cfg.timestep_spacing, path)?;
        let alphas_cumprod: Vec<f32> =
            common::torch_alphas_cumprod(&betas, false, path)?.into_iter().map(|a| a as f32).collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Self {
            train_steps: betas.num_train_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            skip_prk_steps: cfg.skip_prk_steps,
            prediction,
            spacing,
            steps_offset: cfg.steps_offset,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
            prk_len: 0,
            counter: 0,
            ets: Vec::new(),
            cur_model_output: Vec::new(),
            cur_sample: None,
        })
    }

    /// The cumulative alpha at a timestep (negative values index from the end, as in Python).
    fn alpha_at(&self, t: i64) -> Result<f32> {
        py_index(t, self.train_steps).map(|i| self.alphas_cumprod[i]).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "PNDMScheduler: timestep {t} is outside the {} training timesteps ({} steps)",
                self.train_steps, self.num_inference_steps
            ))
        })
    }

    /// x_{t-1} from x_t and epsilon: the transfer formula of the PNDM paper (eq. 11),
    /// `prev = sqrt(a'/a) x - (a' - a) e / (a sqrt(1 - a') + sqrt(a (1 - a) a'))`.
    fn prev_sample(&self, sample: &[f32], t: i64, prev_t: i64, model_output: &[f32]) -> Result<Vec<f32>> {
        let a_t = self.alpha_at(t)?;
        let a_prev = if prev_t >= 0 { self.alpha_at(prev_t)? } else { self.final_alpha_cumprod };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let (sa_t, sb_t) = (a_t.sqrt(), b_t.sqrt());
        Ok(sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let eps = match self.prediction {
                    PredictionType::VPrediction => sa_t * m + sb_t * x,
                    _ => m,
                };
                sample_coeff * x - (a_prev - a_t) * eps / denom
            })
            .collect())
    }

    /// One call of a Runge-Kutta step: calls 0..3 of each group of four evaluate the model at
    /// t, t - h, t - h, t - 2h (h = half a step) and the fourth completes the step with the
    /// weights 1/6, 1/3, 1/3, 1/6. Every call returns a sample (computed from the group's first
    /// sample), which the pipeline feeds to the next call, as in diffusers.
    fn step_prk(&mut self, mo: Vec<f32>, t: i64, sample: Vec<f32>) -> Result<Vec<f32>> {
        let c = self.counter;
        let half = (self.train_steps / self.num_inference_steps / 2) as i64;
        let prev_t = t - if c % 2 == 1 { 0 } else { half };
        // The alphas are those of the group's first timestep, not of this call's.
        let t_group = self.timesteps[c / 4 * 4];
        let model_output = match c % 4 {
            0 => {
                self.cur_model_output = mo.iter().map(|m| SIXTH * m).collect();
                self.ets.push(mo.clone());
                self.cur_sample = Some(sample.clone());
                mo
            }
            1 | 2 => {
                for (acc, m) in self.cur_model_output.iter_mut().zip(&mo) {
                    *acc += THIRD * m;
                }
                mo
            }
            _ => {
                let out = self.cur_model_output.iter().zip(&mo).map(|(acc, m)| acc + SIXTH * m).collect();
                self.cur_model_output.clear();
                out
            }
        };
        let start = self.cur_sample.as_deref().unwrap_or(&sample);
        self.prev_sample(start, t_group, prev_t, &model_output)
    }

    /// One PLMS call: Adams-Bashforth combinations of the last epsilons (orders 1 to 4).
    fn step_plms(&mut self, mo: Vec<f32>, t: i64, sample: Vec<f32>) -> Result<Vec<f32>> {
        let ratio = (self.train_steps / self.num_inference_steps) as i64;
        let (mut t, mut prev_t) = (t, t - ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(mo.clone());
        } else {
            // The second call of the skip_prk_steps warm-up repeats the first call's target
            // timestep: it redoes the first step from its starting sample (at t + ratio) with
            // the mean of the two outputs, and its output is not kept in `ets`.
            prev_t = t;
            t += ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let (model_output, sample): (Vec<f32>, Vec<f32>) = match n {
            1 if self.counter == 0 => {
                self.cur_sample = Some(sample.clone());
                (mo, sample)
            }
            1 if self.counter == 1 => {
                let avg = mo.iter().zip(&e[0]).map(|(a, b)| (a + b) / 2.0).collect();
                let start = self.cur_sample.take().unwrap_or(sample);
                (avg, start)
            }
            2 => ((0..mo.len()).map(|i| (3.0 * e[1][i] - e[0][i]) / 2.0).collect(), sample),
            3 => ((0..mo.len()).map(|i| (23.0 * e[2][i] - 16.0 * e[1][i] + 5.0 * e[0][i]) / 12.0).collect(), sample),
            4 => (
                (0..mo.len())
                    .map(|i| TWENTY_FOURTH * (55.0 * e[3][i] - 59.0 * e[2][i] + 37.0 * e[1][i] - 9.0 * e[0][i]))
                    .collect(),
                sample,
            ),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "PNDMScheduler: inconsistent multistep state at model call {} ({n} stored outputs)",
                    self.counter
                )))
            }
        };
        self.prev_sample(&sample, t, prev_t, &model_output)
    }
}

impl Scheduler for PNDMScheduler {
    fn class_name(&self) -> &'static str {
        "PNDMScheduler"
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        common::check_steps(steps, self.train_steps, "PNDMScheduler")?;
        // diffusers' `_timesteps`: the inference timesteps in increasing order.
        let base: Vec<i64> = self
            .spacing
            .timesteps(self.train_steps, steps, self.steps_offset)
            .into_iter()
            .rev()
            .map(|t| round_half_even(t) as i64)
            .collect();
        let len = base.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            // All steps are PLMS; the second-largest timestep is called twice (the warm-up).
            let mut plms: Vec<i64> = base[..len - 1].to_vec();
            if len >= 2 {
                plms.push(base[len - 2]);
            }
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if len < 4 {
                // diffusers fails here with a numpy broadcasting error.
                return Err(Error::InvalidArgument(format!(
                    "PNDMScheduler needs at least 4 steps when skip_prk_steps is false (got {steps})"
                )));
            }
            // Three Runge-Kutta steps over the four largest timesteps t0 < t1 < t2 < t3, each
            // with its midpoint t + h: t3, t2+h, t2+h, t2, t2, t1+h, t1+h, t1, t1, t0+h, t0+h, t0.
            let half = (self.train_steps / steps / 2) as i64;
            let mut pairs: Vec<i64> = base[len - 4..].iter().flat_map(|&t| [t, t + half]).collect();
            pairs.pop();
            let doubled: Vec<i64> = pairs.iter().flat_map(|&t| [t, t]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            // Then PLMS from t0 down (the three largest are covered by the Runge-Kutta steps).
            let plms = base[..len - 3].iter().rev().copied().collect();
            (prk, plms)
        };
        let timesteps: Vec<i64> = prk.iter().chain(&plms).copied().collect();
        if let Some(&bad) = timesteps.iter().find(|&&t| py_index(t, self.train_steps).is_none()) {
            return Err(Error::InvalidArgument(format!(
                "PNDMScheduler: {steps} steps with steps_offset {} give timestep {bad}, outside the {} training timesteps",
                self.steps_offset, self.train_steps
            )));
        }
        self.num_inference_steps = steps;
        self.prk_len = prk.len();
        self.timesteps_f32 = timesteps.iter().map(|&t| t as f32).collect();
        self.timesteps = timesteps;
        self.counter = 0;
        self.ets.clear();
        self.cur_model_output.clear();
        self.cur_sample = None;
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
        _eta: f32,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Vec<f32>> {
        if index >= self.timesteps.len() {
            return Err(Error::InvalidArgument(format!(
                "PNDMScheduler: model call {index} is beyond the {} timesteps set (call set_timesteps first)",
                self.timesteps.len()
            )));
        }
        // PNDM keeps state between calls (the Runge-Kutta sums, past outputs), so the calls
        // must come in order.
        if index != self.counter {
            return Err(Error::InvalidArgument(format!(
                "PNDMScheduler: model call {index} out of order (expected call {}); call set_timesteps to restart",
                self.counter
            )));
        }
        if model_output.len() != sample.len() {
            return Err(Error::InvalidArgument(format!(
                "PNDMScheduler: model output has {} values but the sample has {}",
                model_output.len(),
                sample.len()
            )));
        }
        let t = self.timesteps[index];
        let (mo, x) = (model_output.to_vec(), sample.to_vec());
        let prev = if self.counter < self.prk_len { self.step_prk(mo, t, x)? } else { self.step_plms(mo, t, x)? };
        self.counter += 1;
        Ok(prev)
    }
}
