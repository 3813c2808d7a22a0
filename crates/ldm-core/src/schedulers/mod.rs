//! The six schedulers of the LDM pipelines, each reproducing its diffusers class step for step.
//!
//! Schedulers work on plain `f32` latents on the host: they are small, and keeping them out of
//! the backends means they are written once. Each is built from a `scheduler_config.json` value:
//! keys present are used, absent keys take that scheduler's own defaults (what diffusers'
//! `from_config` does when a user swaps the scheduler of a saved pipeline).

pub mod common;
pub mod ddim;
pub mod dpm_solver_multistep;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub mod lms_discrete;
pub mod pndm;

use crate::{Error, Result};

/// Where a scheduler draws its noise (DDIM with eta > 0, Euler ancestral): the run's one
/// torch-compatible generator, so that noise comes in diffusers' order.
pub trait NoiseSource {
    /// `n` standard normal values, as `torch.randn(n, generator=g)` gives them.
    fn randn(&mut self, n: usize) -> Vec<f32>;
}

/// A diffusion scheduler. The pipeline loop is:
///
/// ```text
/// s.set_timesteps(steps)?;
/// latents *= s.init_noise_sigma();
/// for i in 0..s.timesteps().len() {
///     let input = s.scale_model_input(&latents, i);      // the UNet input
///     let out = unet(input, s.timesteps()[i]);
///     latents = s.step(&out, i, &latents, eta, noise)?;
/// }
/// ```
pub trait Scheduler: Send {
    /// The diffusers class name, e.g. "DDIMScheduler".
    fn class_name(&self) -> &'static str;
    /// Prepares `steps` inference steps. Errors when `steps` is 0 or beyond what the training
    /// schedule allows.
    fn set_timesteps(&mut self, steps: usize) -> Result<()>;
    /// The timestep given to the model at each model call (fractional for LMS/Euler with some
    /// spacings; PNDM's Runge-Kutta warm-up repeats some).
    fn timesteps(&self) -> &[f32];
    /// The standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f32;
    /// The model input at model call `index` (`sample / sqrt(sigma^2 + 1)` for the sigma-based
    /// schedulers, unchanged for the others).
    fn scale_model_input(&self, sample: &[f32], index: usize) -> Vec<f32>;
    /// One step: the previous sample from the model output at call `index`. `eta` is DDIM's
    /// (other schedulers ignore it); `noise` is drawn from only where the method needs it.
    fn step(
        &mut self,
        model_output: &[f32],
        index: usize,
        sample: &[f32],
        eta: f32,
        noise: &mut dyn NoiseSource,
    ) -> Result<Vec<f32>>;
}

/// The scheduler names of the front ends (`--scheduler`), with their diffusers classes.
pub const SCHEDULER_NAMES: &[(&str, &str)] = &[
    ("ddim", "DDIMScheduler"),
    ("pndm", "PNDMScheduler"),
    ("lms", "LMSDiscreteScheduler"),
    ("euler", "EulerDiscreteScheduler"),
    ("euler-a", "EulerAncestralDiscreteScheduler"),
    ("dpm++", "DPMSolverMultistepScheduler"),
];

/// The diffusers class for a front-end scheduler name.
pub fn class_for_name(name: &str) -> Result<&'static str> {
    SCHEDULER_NAMES.iter().find(|(n, _)| *n == name).map(|(_, c)| *c).ok_or_else(|| {
        let names: Vec<&str> = SCHEDULER_NAMES.iter().map(|(n, _)| *n).collect();
        Error::InvalidArgument(format!("unknown scheduler `{name}` (expected one of: {})", names.join(", ")))
    })
}

/// Builds the scheduler of diffusers class `class` from a scheduler config (a parsed
/// `scheduler_config.json`, possibly written for another class). `path` names the config in errors.
pub fn from_config(class: &str, config: &serde_json::Value, path: &std::path::Path) -> Result<Box<dyn Scheduler>> {
    Ok(match class {
        "DDIMScheduler" => Box::new(ddim::DDIMScheduler::from_config(config, path)?),
        "PNDMScheduler" => Box::new(pndm::PNDMScheduler::from_config(config, path)?),
        "LMSDiscreteScheduler" => Box::new(lms_discrete::LMSDiscreteScheduler::from_config(config, path)?),
        "EulerDiscreteScheduler" => Box::new(euler_discrete::EulerDiscreteScheduler::from_config(config, path)?),
        "EulerAncestralDiscreteScheduler" => {
            Box::new(euler_ancestral_discrete::EulerAncestralDiscreteScheduler::from_config(config, path)?)
        }
        "DPMSolverMultistepScheduler" => {
            Box::new(dpm_solver_multistep::DPMSolverMultistepScheduler::from_config(config, path)?)
        }
        _ => {
            let supported: Vec<&str> = SCHEDULER_NAMES.iter().map(|(_, c)| *c).collect();
            return Err(Error::UnknownClass {
                path: path.to_path_buf(),
                component: "scheduler".into(),
                class: class.into(),
                supported: supported.join(", "),
            });
        }
    })
}
