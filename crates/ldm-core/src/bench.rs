//! The workloads of the benchmark (`ldm bench`, driven by `bench/run.py` beside diffusers): one
//! model call of each component at the published sizes, and whole pipeline runs. Each workload is
//! loaded once by [`prepare`] and then run as often as the timer wants, on fixed inputs drawn
//! from the torch-compatible generator (seed 0), so that every run does the same work.

use std::path::Path;

use crate::backend::Backend;
use crate::loading::folder::{ComponentKind, ModelFolder};
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::models::ldm_bert::LDMBertModel;
use crate::models::unet_2d::UNet2DModel;
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::models::vq_model::VQModel;
use crate::pipelines::{component, load_model, Pipeline, SuperResParams, Txt2ImgParams};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// What one benchmark row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// LDMBert forward, batch 2 (the prompt and the empty prompt of guidance), 77 tokens.
    Bert,
    /// One UNet2DConditionModel call, batch 2, on 32x32 latents with a 77-token context.
    Unet,
    /// AutoencoderKL decode of one 32x32 latent to 256x256 pixels.
    VaeDecode,
    /// One UNet2DModel call on a 64x64 input (3 latent channels + the 3 of the image).
    SrUnet,
    /// VQModel decode (with quantisation, as the pipeline does) of 64x64 latents to 256x256.
    VqDecode,
    /// A whole text-to-image run: one prompt, DDIM, 50 steps, guidance 6, 256x256.
    Txt2Img,
    /// A whole super-resolution run: a 64x64 image to 256x256, DDIM, 100 steps.
    SuperRes,
}

/// The whole-run workloads' settings, shared with `bench/run.py`'s diffusers side.
pub const TXT2IMG_PROMPT: &str = "a painting of a squirrel eating a burger";
pub const TXT2IMG_STEPS: usize = 50;
pub const TXT2IMG_GUIDANCE: f32 = 6.0;
pub const SUPERRES_STEPS: usize = 100;
/// The timestep of the single UNet calls.
pub const TIMESTEP: f32 = 500.0;

impl Workload {
    pub const ALL: [Workload; 7] =
        [Workload::Bert, Workload::Unet, Workload::VaeDecode, Workload::SrUnet, Workload::VqDecode, Workload::Txt2Img, Workload::SuperRes];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Bert => "bert",
            Workload::Unet => "unet",
            Workload::VaeDecode => "vae-decode",
            Workload::SrUnet => "sr-unet",
            Workload::VqDecode => "vq-decode",
            Workload::Txt2Img => "txt2img",
            Workload::SuperRes => "superres",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|w| w.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|w| w.name()).collect();
            Error::InvalidArgument(format!("unknown workload `{name}` (expected one of {})", names.join(", ")))
        })
    }

    /// Whether the workload reads a text-to-image folder (else a super-resolution one).
    pub fn is_txt2img(self) -> bool {
        matches!(self, Workload::Bert | Workload::Unet | Workload::VaeDecode | Workload::Txt2Img)
    }
}

/// A loaded workload: call it to run it once.
pub type Run = Box<dyn Fn() -> Result<()> + Send + Sync>;

fn randn<B: Backend>(be: &B, g: &mut TorchGenerator, shape: &[usize]) -> Result<B::Tensor> {
    be.upload(g.randn(shape.iter().product()), shape)
}

/// Loads what `workload` needs from the pipeline folder `dir` (only that component for the
/// single-model rows) and returns the run.
pub fn prepare<B: Backend>(workload: Workload, dir: &Path, be: &B) -> Result<Run> {
    let folder = ModelFolder::open(dir)?;
    let mut g = TorchGenerator::new(0);
    let be = be.clone();
    Ok(match workload {
        Workload::Bert => {
            let bert = load_model(component(&folder, ComponentKind::TextEncoder, "LDMBertModel")?, &be, LDMBertModel::load)?;
            let vocab = bert.config.vocab_size as u32;
            // [CLS] text [SEP] then padding, as the tokenizer lays out a prompt; the ids do not
            // change the work.
            let ids: Vec<Vec<u32>> = (0..2u32)
                .map(|r| (0..77u32).map(|j| if j < 12 { (1000 + 37 * j + 11 * r) % vocab } else { 0 }).collect())
                .collect();
            Box::new(move || bert.forward(&ids).map(drop))
        }
        Workload::Unet => {
            let unet = load_model(component(&folder, ComponentKind::UNet, "UNet2DConditionModel")?, &be, UNet2DConditionModel::load)?;
            let ctx_dim = unet.config.cross_attention_dim.expand(1, dir, "cross_attention_dim")?[0];
            let x = randn(&be, &mut g, &[2, unet.config.in_channels, 32, 32])?;
            let ctx = randn(&be, &mut g, &[2, 77, ctx_dim])?;
            Box::new(move || unet.forward(&x, &[TIMESTEP], &ctx).map(drop))
        }
        Workload::VaeDecode => {
            let vae = load_model(component(&folder, ComponentKind::Autoencoder, "AutoencoderKL")?, &be, AutoencoderKL::load_decoder)?;
            let side = 256 / vae.config.scale_factor().max(1);
            let z = randn(&be, &mut g, &[1, vae.config.latent_channels, side, side])?;
            Box::new(move || vae.decode(&z).map(drop))
        }
        Workload::SrUnet => {
            let unet = load_model(component(&folder, ComponentKind::UNet, "UNet2DModel")?, &be, UNet2DModel::load)?;
            let x = randn(&be, &mut g, &[1, unet.config.in_channels, 64, 64])?;
            Box::new(move || unet.forward(&x, &[TIMESTEP]).map(drop))
        }
        Workload::VqDecode => {
            let vq = load_model(component(&folder, ComponentKind::Autoencoder, "VQModel")?, &be, VQModel::load_decoder)?;
            let side = 256 / vq.config.scale_factor().max(1);
            let z = randn(&be, &mut g, &[1, vq.config.latent_channels, side, side])?;
            Box::new(move || vq.decode(&z, false).map(drop))
        }
        Workload::Txt2Img => {
            let p = Pipeline::load_folder(dir, &be)?;
            let params = Txt2ImgParams {
                prompts: vec![TXT2IMG_PROMPT.into()],
                steps: TXT2IMG_STEPS,
                guidance: TXT2IMG_GUIDANCE,
                height: Some(256),
                width: Some(256),
                ..Default::default()
            };
            Box::new(move || p.txt2img(&params, None).map(drop))
        }
        Workload::SuperRes => {
            let p = Pipeline::load_folder(dir, &be)?;
            let rgb: Vec<u8> = (0..64 * 64 * 3).map(|_| (g.next_u32() & 0xff) as u8).collect();
            let params = SuperResParams { rgb, width: 64, height: 64, steps: SUPERRES_STEPS, ..Default::default() };
            Box::new(move || p.superres(&params, None).map(drop))
        }
    })
}
