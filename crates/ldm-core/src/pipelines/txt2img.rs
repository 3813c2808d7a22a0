//! Text to image, as diffusers' `LDMTextToImagePipeline`.
//!
//! One deliberate difference: the initial latents are scaled by the scheduler's
//! `init_noise_sigma` and the UNet input by `scale_model_input`, so that LMS and Euler give
//! proper images; for DDIM and PNDM both are identities and the result is diffusers' own.

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::loading::folder::{ComponentKind, ModelFolder};
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::models::ldm_bert::LDMBertModel;
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::models::vq_model::VQModel;
use crate::loading::folder::ComponentClass;
use crate::pipelines::{memory, tiles};
use crate::pipelines::{check_finite, check_prompt, check_output, component, load_model, report, Images, Pause, ProgressFn, SchedulerSource, Stage};
use crate::rng::TorchGenerator;
use crate::tokenizer::BertTokenizer;
use crate::{Error, Result};

/// The parameters of a text-to-image run. `Default` gives the pipeline's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Txt2ImgParams {
    /// One prompt per image.
    pub prompts: Vec<String>,
    /// Denoising steps (default 50).
    pub steps: usize,
    /// Classifier-free guidance scale (default 1.0: no guidance, no unconditional pass).
    pub guidance: f32,
    /// DDIM's eta (default 0: deterministic).
    pub eta: f32,
    /// The seed of the torch-compatible generator (default 0).
    pub seed: u64,
    /// A scheduler name (`ddim`, `pndm`, `lms`, `euler`, `euler-a`, `dpm++`); `None`: the model's.
    pub scheduler: Option<String>,
    /// Image size in pixels; `None`: the UNet's `sample_size` times the autoencoder's scale.
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Initial latents `(batch, C, H/f, W/f)` instead of drawing them from the seed.
    pub latents: Option<Vec<f32>>,
}

impl Default for Txt2ImgParams {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            steps: 50,
            guidance: 1.0,
            eta: 0.0,
            seed: 0,
            scheduler: None,
            height: None,
            width: None,
            latents: None,
        }
    }
}

/// The most prompts (images) in one run.
pub const MAX_PROMPTS: usize = 64;

/// The decoder of the text-to-image pipeline: the published checkpoint has an AutoencoderKL
/// (in a folder named `vqvae`), but a VQModel works the same way.
pub enum LatentDecoder<B: Backend> {
    Kl(AutoencoderKL<B>),
    Vq(VQModel<B>),
}

impl<B: Backend> LatentDecoder<B> {
    pub fn scaling_factor(&self) -> f64 {
        match self {
            Self::Kl(m) => m.config.scaling_factor,
            Self::Vq(m) => m.config.scaling_factor,
        }
    }
    pub fn scale_factor(&self) -> usize {
        match self {
            Self::Kl(m) => m.config.scale_factor(),
            Self::Vq(m) => m.config.scale_factor(),
        }
    }
    pub fn decode(&self, z: &B::Tensor) -> Result<B::Tensor> {
        match self {
            Self::Kl(m) => m.decode(z),
            Self::Vq(m) => m.decode(z, false),
        }
    }
    /// [`Self::decode`] of one sample `(1, C, h, w)` in tiles ([`tiles::decode_tiled`]), as
    /// `(C, H, W)` planes and their shape; `tick` hears of its passes.
    pub fn decode_tiled(&self, be: &B, z: &B::Tensor, tick: tiles::Tick<'_>) -> Result<(Vec<f32>, [usize; 3])> {
        match self {
            Self::Kl(m) => tiles::decode_tiled(be, m.decoder(), &m.decoder_input(z)?, tiles::TILE, tick),
            Self::Vq(m) => tiles::decode_tiled(be, m.decoder(), &m.decoder_input(z, false)?, tiles::TILE, tick),
        }
    }
}

pub struct TextToImage<B: Backend> {
    be: B,
    pub dir: PathBuf,
    tokenizer: BertTokenizer,
    pub bert: LDMBertModel<B>,
    pub unet: UNet2DConditionModel<B>,
    pub vae: LatentDecoder<B>,
    scheduler: SchedulerSource,
}

impl<B: Backend> TextToImage<B> {
    pub fn load(folder: &ModelFolder, be: &B) -> Result<Self> {
        let tok = component(folder, ComponentKind::Tokenizer, "tokenizer")?;
        crate::pipelines::check_tokenizer_files(&tok.dir)?;
        let tokenizer = BertTokenizer::from_folder(&tok.dir)?;
        let bert = load_model(component(folder, ComponentKind::TextEncoder, "text encoder (LDMBertModel)")?, be, LDMBertModel::load)?;
        let unet = load_model(component(folder, ComponentKind::UNet, "UNet2DConditionModel")?, be, UNet2DConditionModel::load)?;
        let vc = component(folder, ComponentKind::Autoencoder, "autoencoder (AutoencoderKL or VQModel)")?;
        let vae = if vc.class == ComponentClass::VQModel {
            LatentDecoder::Vq(load_model(vc, be, VQModel::load_decoder)?)
        } else {
            LatentDecoder::Kl(load_model(vc, be, AutoencoderKL::load_decoder)?)
        };
        let d = bert.config.d_model;
        if unet.config.cross_attention_dim.expand(1, &vc.dir, "cross_attention_dim").map(|v| v[0]).unwrap_or(d) != d {
            return Err(Error::config(
                &folder.dir,
                "unet.cross_attention_dim",
                format!("{:?} differs from the text encoder's d_model {d}", unet.config.cross_attention_dim),
            ));
        }
        if tokenizer.vocab_size() > bert.config.vocab_size {
            return Err(Error::config(&folder.dir, "bert.vocab_size", format!(
                "{} is smaller than the tokenizer's vocabulary of {}",
                bert.config.vocab_size,
                tokenizer.vocab_size()
            )));
        }
        Ok(Self { be: be.clone(), dir: folder.dir.clone(), tokenizer, bert, unet, vae, scheduler: SchedulerSource::load(folder)? })
    }

    /// The default image size: the UNet's `sample_size` times the autoencoder's scale factor.
    pub fn default_size(&self) -> usize {
        self.unet.config.sample_size.unwrap_or(32) * self.vae.scale_factor()
    }

    /// Checks the parameters and returns `(height, width)` of the images.
    pub fn check(&self, p: &Txt2ImgParams) -> Result<(usize, usize)> {
        if p.prompts.is_empty() {
            return Err(Error::InvalidArgument("at least one prompt is needed".into()));
        }
        if p.prompts.len() > MAX_PROMPTS {
            return Err(Error::InvalidArgument(format!("{} prompts: at most {MAX_PROMPTS} images per run", p.prompts.len())));
        }
        for (i, prompt) in p.prompts.iter().enumerate() {
            check_prompt(i, prompt)?;
        }
        check_finite("guidance", p.guidance)?;
        check_finite("eta", p.eta)?;
        if p.eta < 0.0 {
            return Err(Error::InvalidArgument(format!("eta must be >= 0, got {}", p.eta)));
        }
        let f = self.vae.scale_factor();
        let h = p.height.unwrap_or_else(|| self.default_size());
        let w = p.width.unwrap_or_else(|| self.default_size());
        for (name, v) in [("height", h), ("width", w)] {
            if v == 0 || v % 8 != 0 || v % f != 0 {
                return Err(Error::InvalidArgument(format!("{name} {v} must be a positive multiple of {}", f.max(8))));
            }
            if v > 8192 {
                return Err(Error::InvalidArgument(format!("{name} {v} is larger than the supported 8192 pixels")));
            }
        }
        if let Some(l) = &p.latents {
            let n = p.prompts.len() * self.unet.config.in_channels * (h / f) * (w / f);
            if l.len() != n {
                return Err(Error::InvalidArgument(format!(
                    "latents hold {} values; this run needs shape [{}, {}, {}, {}] ({n} values)",
                    l.len(),
                    p.prompts.len(),
                    self.unet.config.in_channels,
                    h / f,
                    w / f
                )));
            }
            if let Some(i) = l.iter().position(|v| !v.is_finite()) {
                return Err(Error::InvalidArgument(format!("latents hold a non-finite value ({}) at index {i}", l[i])));
            }
        }
        let guided = p.guidance != 1.0;
        let needed = self.estimate_memory(p.prompts.len(), guided, h, w);
        memory::check_memory(
            &format!("text to image at {w}x{h} pixels for {} prompt(s){}", p.prompts.len(), if guided { " with guidance" } else { "" }),
            needed,
        )?;
        Ok((h, w))
    }

    /// Estimated peak memory in bytes of a run of `batch` prompts at `height x width` pixels
    /// (guidance doubles the UNet's rows); see [`memory`].
    pub fn estimate_memory(&self, batch: usize, guided: bool, height: usize, width: usize) -> u64 {
        let c = &self.unet.config;
        let f = self.vae.scale_factor().max(1);
        let (h0, w0) = (height / f, width / f);
        let n = c.block_out_channels.len();
        let layers = c.layers_per_block.expand(n, Path::new(""), "").unwrap_or_else(|_| vec![2; n]);
        let heads = match &c.num_attention_heads {
            Some(h) => h.expand(n, Path::new(""), ""),
            None => c.attention_head_dim.expand(n, Path::new(""), ""),
        }
        .unwrap_or_else(|_| vec![8; n]);
        let mut levels: Vec<memory::Level> = (0..n)
            .map(|i| memory::Level {
                positions: memory::positions_at(h0, w0, i),
                channels: c.block_out_channels[i] as u64,
                layers: layers[i] as u64,
                heads: if c.down_block_types.get(i).is_some_and(|t| t.contains("Attn")) { heads[i] as u64 } else { 0 },
                context: crate::tokenizer::MAX_LENGTH as u64,
            })
            .collect();
        if n > 0 {
            levels.push(memory::Level { layers: 1, heads: heads[n - 1] as u64, ..levels[n - 1] });
        }
        let rows = (batch * if guided { 2 } else { 1 }) as u64;
        let t = self.be.transients();
        let unet = memory::unet_peak(rows, &levels, t);
        let (ch, lpb, mid) = match &self.vae {
            LatentDecoder::Kl(m) => (&m.config.block_out_channels, m.config.layers_per_block, m.config.mid_block_add_attention),
            LatentDecoder::Vq(m) => (&m.config.block_out_channels, m.config.layers_per_block, m.config.mid_block_add_attention),
        };
        let decode = (batch as u64).saturating_mul(memory::decode_peak(ch, lpb, mid, height / f, width / f, f, t));
        unet.max(decode)
    }

    /// Checks the parameters and returns the shape `(batch, C, H/f, W/f)` of the initial latents
    /// of a run with them, which given `latents` must match.
    pub fn latent_shape(&self, p: &Txt2ImgParams) -> Result<[usize; 4]> {
        let (height, width) = self.check(p)?;
        let f = self.vae.scale_factor();
        Ok([p.prompts.len(), self.unet.config.in_channels, height / f, width / f])
    }

    /// Runs the pipeline: returns `(batch, height, width, 3)` pixels in [0, 1].
    pub fn generate(&self, p: &Txt2ImgParams, progress: Option<ProgressFn<'_>>) -> Result<Images> {
        crate::executor::block_on(self.generate_async(p, progress, None))
    }

    /// The asynchronous form of [`TextToImage::generate`]: tensors are read back with
    /// `download_async`, and `pause` is awaited before each model call.
    pub async fn generate_async(&self, p: &Txt2ImgParams, mut progress: Option<ProgressFn<'_>>, pause: Option<Pause<'_>>) -> Result<Images> {
        let be = &self.be;
        let (height, width) = self.check(p)?;
        let mut scheduler = self.scheduler.build(p.scheduler.as_deref())?;
        scheduler.set_timesteps(p.steps)?;
        let batch = p.prompts.len();
        let f = self.vae.scale_factor();
        let c = self.unet.config.in_channels;
        let shape = [batch, c, height / f, width / f];
        let n: usize = shape.iter().product();

        report(&mut progress, Stage::Encode, 0, 1)?;
        let guided = p.guidance != 1.0;
        let prompts: Vec<&str> = p.prompts.iter().map(|s| s.as_str()).collect();
        let mut ids = Vec::new();
        if guided {
            ids.extend(self.tokenizer.encode_batch(&vec![""; batch])?);
        }
        ids.extend(self.tokenizer.encode_batch(&prompts)?);
        let context = self.bert.forward(&ids)?;
        report(&mut progress, Stage::Encode, 1, 1)?;

        let mut generator = TorchGenerator::new(p.seed);
        let mut latents = match &p.latents {
            Some(l) if l.len() != n => {
                return Err(Error::InvalidArgument(format!(
                    "latents hold {} values; this run needs shape {shape:?} ({n} values)",
                    l.len()
                )))
            }
            Some(l) => l.clone(),
            None => generator.randn(n),
        };
        let sigma = scheduler.init_noise_sigma();
        if sigma != 1.0 {
            latents.iter_mut().for_each(|v| *v *= sigma);
        }

        let total = scheduler.timesteps().len();
        for i in 0..total {
            report(&mut progress, Stage::Denoise, i, total)?;
            crate::pipelines::pause(pause).await;
            let t = scheduler.timesteps()[i];
            let input = scheduler.scale_model_input(&latents, i);
            let mut model_in = Vec::with_capacity(if guided { 2 * n } else { n });
            if guided {
                model_in.extend_from_slice(&input);
            }
            model_in.extend_from_slice(&input);
            let rows = if guided { 2 * batch } else { batch };
            let x = be.upload(model_in, &[rows, shape[1], shape[2], shape[3]])?;
            let out = be.download_async(&self.unet.forward(&x, &[t], &context)?).await?;
            let noise_pred = if guided {
                let (uncond, text) = out.split_at(n);
                uncond.iter().zip(text).map(|(u, t)| u + p.guidance * (t - u)).collect()
            } else {
                out
            };
            check_output("the UNet", &noise_pred)?;
            latents = scheduler.step(&noise_pred, i, &latents, p.eta, &mut generator)?;
        }
        report(&mut progress, Stage::Denoise, total, total)?;

        report(&mut progress, Stage::Decode, 0, 1)?;
        let inv = (1.0 / self.vae.scaling_factor()) as f32;
        latents.iter_mut().for_each(|v| *v *= inv);
        let z = be.upload(latents, &shape)?;
        let tiled = tiles::tiled(shape[2], shape[3]);
        let (image, d) = if tiled {
            let mut all = Vec::new();
            let mut dims = [batch, 0, 0, 0];
            for i in 0..batch {
                let mut tick = |done: usize, total: usize| report(&mut progress, Stage::Decode, i * total + done, batch * total);
                let (chw, [oc, oh, ow]) = self.vae.decode_tiled(be, &be.narrow(&z, 0, i, 1)?, &mut tick)?;
                all.extend(crate::pipelines::superres::chw_to_hwc(&chw, oc, oh * ow));
                dims = [batch, oc, oh, ow];
            }
            (all, dims)
        } else {
            let image = self.vae.decode(&z)?;
            let d = be.dims(&image);
            (be.download_async(&be.permute(&image, &[0, 2, 3, 1])?).await?, [d[0], d[1], d[2], d[3]])
        };
        let pixels: Vec<f32> = image.iter().map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0)).collect();
        check_output("the decoder", &pixels)?;
        if !tiled {
            // (a tiled decode reported its own passes)
            report(&mut progress, Stage::Decode, 1, 1)?;
        }
        Ok(Images { count: d[0], height: d[2], width: d[3], pixels })
    }
}
