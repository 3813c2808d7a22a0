//! 4x super-resolution, as diffusers' `LDMSuperResolutionPipeline`: the low-resolution image is
//! concatenated to the latents at every step, and the VQModel decodes at four times the size.

use std::path::PathBuf;

use crate::backend::Backend;
use crate::loading::folder::{ComponentKind, ModelFolder};
use crate::models::unet_2d::UNet2DModel;
use crate::models::vq_model::VQModel;
use crate::pipelines::{memory, tiles};
use crate::pipelines::{check_finite, check_output, component, load_model, report, Images, Pause, ProgressFn, SchedulerSource, Stage};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// The parameters of a super-resolution run. `Default` gives the pipeline's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SuperResParams {
    /// The input image as 8-bit RGB, row-major, `width * height * 3` bytes.
    pub rgb: Vec<u8>,
    pub width: usize,
    pub height: usize,
    /// Denoising steps (default 100).
    pub steps: usize,
    /// DDIM's eta (default 0).
    pub eta: f32,
    /// The seed of the torch-compatible generator (default 0).
    pub seed: u64,
    /// A scheduler name; `None`: the model's.
    pub scheduler: Option<String>,
}

impl Default for SuperResParams {
    fn default() -> Self {
        Self { rgb: Vec::new(), width: 0, height: 0, steps: 100, eta: 0.0, seed: 0, scheduler: None }
    }
}

/// The largest input side accepted (the output is four times larger).
pub const MAX_INPUT_SIDE: usize = 4096;

pub struct SuperResolution<B: Backend> {
    be: B,
    pub dir: PathBuf,
    pub unet: UNet2DModel<B>,
    pub vqvae: VQModel<B>,
    scheduler: SchedulerSource,
}

impl<B: Backend> SuperResolution<B> {
    pub fn load(folder: &ModelFolder, be: &B) -> Result<Self> {
        let unet = load_model(component(folder, ComponentKind::UNet, "UNet2DModel")?, be, UNet2DModel::load)?;
        let vqvae = load_model(component(folder, ComponentKind::Autoencoder, "VQModel")?, be, VQModel::load_decoder)?;
        if unet.config.in_channels != 6 || vqvae.config.latent_channels != 3 {
            return Err(Error::config(&folder.dir, "unet.in_channels", format!(
                "{} UNet input channels and {} latent channels; super-resolution takes 3 latent channels plus the 3 of the image",
                unet.config.in_channels, vqvae.config.latent_channels
            )));
        }
        Ok(Self { be: be.clone(), dir: folder.dir.clone(), unet, vqvae, scheduler: SchedulerSource::load(folder)? })
    }

    /// The input as the UNet sees it: cropped by resizing down to a multiple of 32 per side with
    /// Pillow-compatible Lanczos (unchanged when already a multiple), mapped to [-1, 1],
    /// `(1, 3, h, w)`. Returns the pixels and `(h, w)`.
    pub fn preprocess(&self, p: &SuperResParams) -> Result<(Vec<f32>, usize, usize)> {
        let (w, h) = (p.width, p.height);
        if w < 32 || h < 32 {
            return Err(Error::InvalidArgument(format!("the input image is {w}x{h}; super-resolution needs at least 32x32 pixels")));
        }
        if w > MAX_INPUT_SIDE || h > MAX_INPUT_SIDE {
            return Err(Error::InvalidArgument(format!("the input image is {w}x{h}; at most {MAX_INPUT_SIDE} pixels a side")));
        }
        if p.rgb.len() != w * h * 3 {
            return Err(Error::InvalidArgument(format!("{} bytes of RGB for a {w}x{h} image ({} expected)", p.rgb.len(), w * h * 3)));
        }
        let (nw, nh) = (w - w % 32, h - h % 32);
        memory::check_memory(
            &format!("super-resolution of a {w}x{h} image (to {}x{})", 4 * nw, 4 * nh),
            self.estimate_memory(nh, nw),
        )?;
        let rgb = if (nw, nh) == (w, h) {
            p.rgb.clone()
        } else {
            crate::image::resize_lanczos(&p.rgb, w as u32, h as u32, nw as u32, nh as u32)
        };
        // HWC bytes to CHW in [-1, 1], computed as diffusers does: x / 255 in float32, then 2x - 1.
        let mut out = vec![0f32; 3 * nh * nw];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * nh * nw + i] = 2.0 * (px[c] as f32 / 255.0) - 1.0;
            }
        }
        Ok((out, nh, nw))
    }

    /// Estimated peak memory in bytes of upscaling an input of `height x width` pixels (after
    /// cropping to multiples of 32); see [`memory`].
    pub fn estimate_memory(&self, height: usize, width: usize) -> u64 {
        let c = &self.unet.config;
        let n = c.block_out_channels.len();
        let heads = |ch: usize| (ch / c.attention_head_dim.unwrap_or(ch).max(1)).max(1) as u64;
        let mut levels: Vec<memory::Level> = (0..n)
            .map(|i| {
                let ch = c.block_out_channels[i];
                memory::Level {
                    positions: memory::positions_at(height, width, i),
                    channels: ch as u64,
                    layers: c.layers_per_block as u64,
                    heads: if c.down_block_types.get(i).is_some_and(|t| t.contains("Attn")) { heads(ch) } else { 0 },
                    context: 0,
                }
            })
            .collect();
        if n > 0 && c.add_attention {
            levels.push(memory::Level { layers: 1, heads: heads(c.block_out_channels[n - 1]), ..levels[n - 1] });
        }
        let t = self.be.transients();
        let unet = memory::unet_peak(1, &levels, t);
        let v = &self.vqvae.config;
        let f = self.vqvae.config.scale_factor();
        let decode = memory::decode_peak(&v.block_out_channels, v.layers_per_block, v.mid_block_add_attention, height, width, f, t);
        unet.max(decode)
    }

    pub fn generate(&self, p: &SuperResParams, progress: Option<ProgressFn<'_>>) -> Result<Images> {
        crate::executor::block_on(self.generate_async(p, progress, None))
    }

    /// The asynchronous form of [`SuperResolution::generate`]: tensors are read back with
    /// `download_async`, and `pause` is awaited before each model call.
    pub async fn generate_async(&self, p: &SuperResParams, mut progress: Option<ProgressFn<'_>>, pause: Option<Pause<'_>>) -> Result<Images> {
        let be = &self.be;
        check_finite("eta", p.eta)?;
        if p.eta < 0.0 {
            return Err(Error::InvalidArgument(format!("eta must be >= 0, got {}", p.eta)));
        }
        let mut scheduler = self.scheduler.build(p.scheduler.as_deref())?;
        scheduler.set_timesteps(p.steps)?;
        report(&mut progress, Stage::Encode, 0, 1)?;
        let (image, h, w) = self.preprocess(p)?;
        report(&mut progress, Stage::Encode, 1, 1)?;

        let c = self.unet.config.in_channels / 2;
        let n = c * h * w;
        let mut generator = TorchGenerator::new(p.seed);
        let mut latents = generator.randn(n);
        let sigma = scheduler.init_noise_sigma();
        if sigma != 1.0 {
            latents.iter_mut().for_each(|v| *v *= sigma);
        }
        let total = scheduler.timesteps().len();
        for i in 0..total {
            report(&mut progress, Stage::Denoise, i, total)?;
            crate::pipelines::pause(pause).await;
            let t = scheduler.timesteps()[i];
            let mut input = latents.clone();
            input.extend_from_slice(&image);
            let input = scheduler.scale_model_input(&input, i);
            let x = be.upload(input, &[1, 2 * c, h, w])?;
            let out = be.download_async(&self.unet.forward(&x, &[t])?).await?;
            check_output("the UNet", &out)?;
            latents = scheduler.step(&out, i, &latents, p.eta, &mut generator)?;
        }
        report(&mut progress, Stage::Denoise, total, total)?;

        report(&mut progress, Stage::Decode, 0, 1)?;
        let z = be.upload(latents, &[1, c, h, w])?;
        let tiled = tiles::tiled(h, w);
        let (decoded, d) = if tiled {
            let x = self.vqvae.decoder_input(&z, false)?;
            let mut tick = |done: usize, total: usize| report(&mut progress, Stage::Decode, done, total);
            let (chw, [oc, oh, ow]) = tiles::decode_tiled(be, self.vqvae.decoder(), &x, tiles::TILE, &mut tick)?;
            (chw_to_hwc(&chw, oc, oh * ow), [1, oc, oh, ow])
        } else {
            let decoded = self.vqvae.decode(&z, false)?;
            let d = be.dims(&decoded);
            (be.download_async(&be.permute(&decoded, &[0, 2, 3, 1])?).await?, [d[0], d[1], d[2], d[3]])
        };
        let pixels: Vec<f32> = decoded.iter().map(|v| v.clamp(-1.0, 1.0) / 2.0 + 0.5).collect();
        check_output("the decoder", &pixels)?;
        if !tiled {
            // (a tiled decode reported its own passes)
            report(&mut progress, Stage::Decode, 1, 1)?;
        }
        Ok(Images { count: d[0], height: d[2], width: d[3], pixels })
    }
}

/// `(C, P)` planes to `(P, C)` pixels.
pub(crate) fn chw_to_hwc(chw: &[f32], c: usize, plane: usize) -> Vec<f32> {
    let mut out = vec![0f32; chw.len()];
    for (ci, p) in chw.chunks_exact(plane.max(1)).enumerate().take(c) {
        for (i, &v) in p.iter().enumerate() {
            out[i * c + ci] = v;
        }
    }
    out
}
