//! What the schedulers share: the training noise schedule (betas, cumulative alphas) and the
//! config keys that define it.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// Keys that define the training schedule, with diffusers' defaults. Each scheduler reads its
/// own further keys with its own defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
}

impl Default for BetaConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
        }
    }
}

impl BetaConfig {
    /// The betas of the training schedule.
    pub fn betas(&self, path: &Path) -> Result<Vec<f64>> {
        let n = self.num_train_timesteps;
        if n == 0 || n > 100_000 {
            return Err(Error::config(path, "num_train_timesteps", format!("{n} is out of range (1 to 100000)")));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != n {
                return Err(Error::config(path, "trained_betas", format!("has {} values for {n} num_train_timesteps", b.len())));
            }
            return Ok(b.clone());
        }
        let lin = |a: f64, b: f64| -> Vec<f64> {
            if n == 1 {
                return vec![a];
            }
            (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
        };
        match self.beta_schedule.as_str() {
            "linear" => Ok(lin(self.beta_start, self.beta_end)),
            "scaled_linear" => Ok(lin(self.beta_start.sqrt(), self.beta_end.sqrt()).into_iter().map(|b| b * b).collect()),
            "squaredcos_cap_v2" => {
                // Nichol & Dhariwal's cosine schedule, betas capped at 0.999.
                let f = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
                Ok((0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - f(t2) / f(t1)).min(0.999)
                    })
                    .collect())
            }
            other => Err(Error::config(
                path,
                "beta_schedule",
                format!("`{other}` is not supported (linear, scaled_linear, squaredcos_cap_v2)"),
            )),
        }
    }

    /// Cumulative products of `1 - beta`.
    pub fn alphas_cumprod(&self, path: &Path) -> Result<Vec<f64>> {
        let mut acc = 1.0;
        Ok(self
            .betas(path)?
            .into_iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect())
    }
}

/// Parses a scheduler's own config struct from the JSON value, naming the file on error.
pub fn parse<T: serde::de::DeserializeOwned>(config: &serde_json::Value, path: &Path) -> Result<T> {
    crate::models::config::parse(config, path)
}

/// Checks the number of inference steps against the training schedule.
pub fn check_steps(steps: usize, train: usize, class: &str) -> Result<()> {
    if steps == 0 || steps > train {
        return Err(Error::InvalidArgument(format!(
            "{steps} inference steps is out of range for {class} (expected 1 to {train}, the training timesteps)"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sigma-schedule helpers shared by the sigma-based schedulers (Euler, Euler ancestral,
// DPM-Solver, LMS). They reproduce the numpy/torch expressions diffusers uses, including where
// diffusers rounds to float32, so that timesteps and sigmas agree to float32 precision.
// ---------------------------------------------------------------------------------------------

/// `x` rounded to the nearest float32, kept as f64: where diffusers stores a value in a
/// float32 tensor or array, we round the same way before computing on.
pub fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

/// Cumulative alphas as diffusers' float32 tensors hold them, from betas given in f64 (rounded
/// to float32 here; [`torch_alphas_cumprod`] also reproduces torch's `linspace` rounding of the
/// betas and should be preferred). `alphas = 1 - betas` in float32, and `torch.cumprod`, which
/// on the CPU accumulates in double and rounds each partial product to float32. (The f64
/// schedule of [`BetaConfig::alphas_cumprod`] differs from diffusers' sigmas by up to 1e-4
/// relative near t = 0, where `1 - alphas_cumprod` cancels; this agrees to about 3e-7.) With
/// `rescale_zero_snr` (diffusers' `rescale_betas_zero_snr`) the betas are first rescaled to a
/// zero terminal SNR (Lin et al. 2023, algorithm 1, in float32 as diffusers'
/// `rescale_zero_terminal_snr`), and the last cumulative alpha is set to 2^-24, as diffusers
/// does to keep the last sigma finite. Values are float32 numbers held in f64.
pub fn alphas_cumprod_f32(betas: &[f64], rescale_zero_snr: bool) -> Vec<f64> {
    let betas: Vec<f32> = betas.iter().map(|&b| b as f32).collect();
    alphas_cumprod_of_f32_betas(&betas, rescale_zero_snr)
}

/// [`alphas_cumprod_f32`] from the float32 betas themselves.
pub fn alphas_cumprod_of_f32_betas(betas: &[f32], rescale_zero_snr: bool) -> Vec<f64> {
    let cumprod = |alphas: &[f32]| -> Vec<f32> {
        let mut acc = 1.0f64;
        alphas
            .iter()
            .map(|&a| {
                acc *= a as f64;
                acc as f32
            })
            .collect()
    };
    let mut betas = betas.to_vec();
    if rescale_zero_snr && !betas.is_empty() {
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut sqrt_ac: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
        let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
        let scale = first / (first - last);
        for s in &mut sqrt_ac {
            *s = (*s - last) * scale;
        }
        let ac: Vec<f32> = sqrt_ac.iter().map(|s| s * s).collect();
        let mut alphas = vec![ac[0]];
        alphas.extend(ac.windows(2).map(|w| w[1] / w[0]));
        betas = alphas.iter().map(|a| 1.0 - a).collect();
    }
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut ac = cumprod(&alphas);
    if rescale_zero_snr {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    ac.into_iter().map(f64::from).collect()
}

/// The training sigmas `sqrt((1 - alphas_cumprod) / alphas_cumprod)`, in float32 arithmetic as
/// diffusers computes them, ordered by training timestep (ascending).
pub fn train_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            f64::from(((1.0 - a) / a).sqrt())
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64, computed as numpy does (`i * step + start`, the
/// last value set to `stop`; a single value is `start`).
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for `step > 0` in float64, as numpy computes it: the length is
/// `ceil(start / step)` (rounding can make it one longer than intended: `arange(1000, 0,
/// -1000 / 61)` has 62 values, the last about 1e-13), element 1 is `start - step`, and element
/// `i > 1` is `start + i * delta` with `delta = (start - step) - start`.
pub fn np_arange_down_to_zero(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil();
    if len.is_nan() || len < 1.0 {
        return Vec::new();
    }
    let second = start + -step;
    let delta = second - start;
    (0..len as usize)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)`: linear interpolation on the integer grid, clamped to
/// the end values, exact at grid points.
pub fn interp_unit_grid(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if n == 0 || x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    (fp[j + 1] - fp[j]) * (x - j as f64) + fp[j]
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, by linear
/// interpolation in log-sigma between the two neighbouring training sigmas (clamped to the
/// training range). `log_sigmas` are the logs of the training sigmas in ascending order.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // numpy: the last index whose log-sigma is <= log_sigma (0 when there is none), at most n - 2.
    let low_idx = log_sigmas.iter().rposition(|&l| log_sigma - l >= 0.0).unwrap_or(0).min(n - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The noise levels of Karras et al. 2022 (EDM), eq. 5 with rho = 7: `n` sigmas from
/// `sigma_max` down to `sigma_min`, evenly spaced in `sigma^(1/rho)`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv_rho, max_inv_rho) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho)).collect()
}

/// `n` sigmas from `sigma_max` down to `sigma_min`, evenly spaced in log-sigma (diffusers'
/// `use_exponential_sigmas`).
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n).into_iter().map(f64::exp).collect()
}

/// The inference timesteps of the sigma-interpolating schedulers (Euler, Euler ancestral, LMS)
/// for `timestep_spacing` (Lin et al. 2023, table 2), as diffusers' float32 array, descending:
/// `linspace` (fractional), `leading` (plus `steps_offset`) or `trailing` (which can give one
/// extra timestep, -1: see [`np_arange_down_to_zero`]).
pub fn spaced_timesteps_f32(
    spacing: &str,
    num_train: usize,
    steps: usize,
    steps_offset: i64,
    path: &Path,
) -> Result<Vec<f64>> {
    let v: Vec<f64> = match spacing {
        "linspace" => np_linspace(0.0, (num_train - 1) as f64, steps).into_iter().rev().map(f32_round).collect(),
        "leading" => {
            let ratio = num_train / steps.max(1);
            (0..steps).rev().map(|i| f32_round((i * ratio) as f64) + steps_offset as f64).collect()
        }
        "trailing" => {
            let ratio = num_train as f64 / steps as f64;
            np_arange_down_to_zero(num_train as f64, ratio)
                .into_iter()
                .map(|t| f32_round(t.round_ties_even()) - 1.0)
                .collect()
        }
        other => {
            return Err(Error::config(
                path,
                "timestep_spacing",
                format!("`{other}` is not supported (linspace, leading, trailing)"),
            ))
        }
    };
    Ok(v)
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` on the CPU, value for value: a float32
/// step `(end - start) / (n - 1)`, the first half computed from `start` and the second from
/// `end`, each as one fused multiply-add (torch's kernel is compiled with FMA contraction; a
/// plain multiply-then-add differs in about a fifth of the values of a 1000-step schedule).
pub fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n <= 1 {
        return vec![start; n];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

/// The betas as diffusers' float32 tensor holds them: `torch.linspace` in float32 for `linear`,
/// its square (in float32) for `scaled_linear`, and the f64 values rounded to float32 for
/// `squaredcos_cap_v2` and `trained_betas`. Errors as [`BetaConfig::betas`].
pub fn torch_betas_f32(beta: &BetaConfig, path: &Path) -> Result<Vec<f32>> {
    let betas = beta.betas(path)?;
    let n = betas.len();
    Ok(match (beta.trained_betas.is_some(), beta.beta_schedule.as_str()) {
        (false, "linear") => torch_linspace_f32(beta.beta_start as f32, beta.beta_end as f32, n),
        (false, "scaled_linear") => {
            torch_linspace_f32(beta.beta_start.sqrt() as f32, beta.beta_end.sqrt() as f32, n)
                .into_iter()
                .map(|r| r * r)
                .collect()
        }
        _ => betas.into_iter().map(|b| b as f32).collect(),
    })
}

/// diffusers' float32 `alphas_cumprod` of a config, bit for bit on the CPU: [`torch_betas_f32`]
/// then [`alphas_cumprod_of_f32_betas`] (with `rescale_betas_zero_snr` when `rescale_zero_snr`).
pub fn torch_alphas_cumprod(beta: &BetaConfig, rescale_zero_snr: bool, path: &Path) -> Result<Vec<f64>> {
    Ok(alphas_cumprod_of_f32_betas(&torch_betas_f32(beta, path)?, rescale_zero_snr))
}
