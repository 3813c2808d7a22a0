//! A pipeline on the backend picked at load time: what the `ldm` command's `--device` and the C
//! ABI's `LdmLoadOptions.device` choose between.

use std::path::Path;

use crate::backend::cpu::Cpu;
#[cfg(feature = "webgpu")]
use crate::backend::wgpu::Gpu;
use crate::pipelines::{Images, Pipeline, ProgressFn, SuperResParams, Txt2ImgParams};
use crate::{Error, Result};

/// Where a pipeline computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// candle on the CPU.
    #[default]
    Cpu,
    /// The GPU backend (WGSL kernels through wgpu: Vulkan, Metal or DX12), feature `webgpu`.
    Gpu,
}

impl Device {
    /// `"cpu"` or `"gpu"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(Device::Cpu),
            "gpu" => Ok(Device::Gpu),
            _ => Err(Error::InvalidArgument(format!("unknown device `{name}` (expected cpu or gpu)"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
        }
    }
}

/// How the CPU backend keeps the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 throughout: the numbers of diffusers.
    #[default]
    F32,
    /// Linear layers (all of LDMBert, the UNets' attention and feed-forward layers) with bf16
    /// weights, multiplied in bf16 with f32 sums: half those weights' memory, faster on CPUs with
    /// AMX or AVX512-BF16 and slower elsewhere, and outputs that differ from f32 ones (the README
    /// states by how much). On Intel AMX, convolutions with a multiple of 32 input channels too;
    /// norms and attention scores stay f32. CPU only.
    Bf16,
}

impl Precision {
    /// `"f32"` or `"bf16"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::InvalidArgument(format!("unknown precision `{name}` (expected f32 or bf16)"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// A loaded pipeline on either backend.
pub enum AnyPipeline {
    Cpu(Pipeline<Cpu>),
    #[cfg(feature = "webgpu")]
    Gpu(Pipeline<Gpu>),
}

/// Runs `$body` with `$p` bound to the pipeline, whatever its backend.
macro_rules! each {
    ($self:expr, $p:ident => $body:expr) => {
        match $self {
            AnyPipeline::Cpu($p) => $body,
            #[cfg(feature = "webgpu")]
            AnyPipeline::Gpu($p) => $body,
        }
    };
}

impl AnyPipeline {
    /// Loads the pipeline of a diffusers folder on `device`. On the GPU it opens the default
    /// adapter first; without one (or in a build without the `webgpu` feature) the error is of
    /// kind [`crate::ErrorKind::Unsupported`] and says what to install.
    pub fn load_folder(dir: &Path, device: Device) -> Result<Self> {
        Self::load_folder_with(dir, device, Precision::F32)
    }

    /// [`AnyPipeline::load_folder`] with the linear layers' weights in `precision`, which must be
    /// f32 on the GPU.
    pub fn load_folder_with(dir: &Path, device: Device, precision: Precision) -> Result<Self> {
        if precision != Precision::F32 && device != Device::Cpu {
            return Err(Error::InvalidArgument(format!(
                "precision {} is a CPU option; the {} backend computes in f32",
                precision.name(),
                device.name()
            )));
        }
        match device {
            Device::Cpu if precision == Precision::Bf16 => {
                Ok(AnyPipeline::Cpu(Pipeline::load_folder(dir, &Cpu::with_bf16_weights())?))
            }
            Device::Cpu => Ok(AnyPipeline::Cpu(Pipeline::load_folder(dir, &Cpu)?)),
            #[cfg(all(feature = "webgpu", not(target_arch = "wasm32")))]
            Device::Gpu => {
                let gpu = Gpu::new().map_err(|e| match e {
                    Error::Backend(m) => Error::Unsupported(format!("the GPU backend cannot start: {m}")),
                    e => e,
                })?;
                Ok(AnyPipeline::Gpu(Pipeline::load_folder(dir, &gpu)?))
            }
            #[cfg(all(feature = "webgpu", target_arch = "wasm32"))]
            Device::Gpu => Err(Error::Unsupported(
                "in the browser the GPU is opened asynchronously: load with ldm-wasm's LdmPipeline".into(),
            )),
            #[cfg(not(feature = "webgpu"))]
            Device::Gpu => Err(Error::Unsupported(
                "this build has no GPU backend (ldm-core feature `webgpu`); use the CPU".into(),
            )),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            AnyPipeline::Cpu(_) => Device::Cpu,
            #[cfg(feature = "webgpu")]
            AnyPipeline::Gpu(_) => Device::Gpu,
        }
    }

    /// "txt2img" or "superres".
    pub fn kind(&self) -> &'static str {
        each!(self, p => p.kind())
    }

    /// The shape of a text-to-image run's initial latents (after checking the parameters); `None`
    /// for a super-resolution pipeline.
    pub fn latent_shape(&self, params: &Txt2ImgParams) -> Result<Option<[usize; 4]>> {
        each!(self, p => match p {
            Pipeline::TextToImage(t) => t.latent_shape(params).map(Some),
            Pipeline::SuperResolution(_) => Ok(None),
        })
    }

    pub fn txt2img(&self, params: &Txt2ImgParams, progress: Option<ProgressFn<'_>>) -> Result<Images> {
        each!(self, p => p.txt2img(params, progress))
    }

    pub fn superres(&self, params: &SuperResParams, progress: Option<ProgressFn<'_>>) -> Result<Images> {
        each!(self, p => p.superres(params, progress))
    }
}
