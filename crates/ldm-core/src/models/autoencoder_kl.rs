//! diffusers `AutoencoderKL`: the KL-regularised autoencoder of the text-to-image checkpoint.

use std::path::Path;

use serde::Deserialize;

use crate::backend::Backend;
use crate::models::config::{self, check_size, MAX_CHANNELS};
use crate::models::vae::{self, CoderCfg, Decoder, Encoder};
use crate::nn::{Conv2d, Weights};
use crate::{Error, Result};

/// The keys of `config.json` that this model reads, with diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: Option<usize>,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: None,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    pub fn coder(&self) -> CoderCfg {
        CoderCfg {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            norm_num_groups: self.norm_num_groups,
            mid_block_add_attention: self.mid_block_add_attention,
        }
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// The encoded distribution: a diagonal Gaussian per latent.
pub struct LatentDist<T> {
    pub mean: T,
    pub std: T,
}

pub struct AutoencoderKL<B: Backend> {
    be: B,
    pub config: AutoencoderKLConfig,
    /// The encoding half (encoder, quant_conv); `None` when loaded for decoding only.
    encoder: Option<(Encoder<B>, Option<Conv2d<B>>)>,
    decoder: Decoder<B>,
    post_quant_conv: Option<Conv2d<B>>,
}

impl<B: Backend> AutoencoderKL<B> {
    /// The whole model, encoder included.
    pub fn load(config: AutoencoderKLConfig, path: &Path, w: &Weights<B>) -> Result<Self> {
        Self::load_parts(config, path, w, true)
    }

    /// The decoding half only (post_quant_conv, decoder): what the pipelines use. The encoder's
    /// tensors are skipped unread, so they take no memory; [`Self::encode`] then returns an error.
    pub fn load_decoder(config: AutoencoderKLConfig, path: &Path, w: &Weights<B>) -> Result<Self> {
        Self::load_parts(config, path, w, false)
    }

    fn load_parts(config: AutoencoderKLConfig, path: &Path, w: &Weights<B>, with_encoder: bool) -> Result<Self> {
        let coder = config.coder();
        coder.check(path, &config.act_fn, &config.down_block_types, &config.up_block_types)?;
        let l = config.latent_channels;
        check_size(path, "latent_channels", l, MAX_CHANNELS)?;
        check_size(path, "in_channels", config.in_channels, MAX_CHANNELS)?;
        check_size(path, "out_channels", config.out_channels, MAX_CHANNELS)?;
        if !config.scaling_factor.is_finite() || config.scaling_factor == 0.0 {
            return Err(Error::config(path, "scaling_factor", format!("{} is not a usable scale", config.scaling_factor)));
        }
        let encoder = if with_encoder {
            let quant_conv = if config.use_quant_conv { Some(Conv2d::load(&w.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?) } else { None };
            Some((Encoder::load(&w.pp("encoder"), &coder, config.in_channels, 2 * l)?, quant_conv))
        } else {
            vae::skip_encoder(w)?;
            None
        };
        let post_quant_conv = if config.use_post_quant_conv { Some(Conv2d::load(&w.pp("post_quant_conv"), l, l, 1, 1, 0)?) } else { None };
        Ok(Self {
            be: w.backend().clone(),
            encoder,
            decoder: Decoder::load(&w.pp("decoder"), &coder, l, config.out_channels)?,
            post_quant_conv,
            config,
        })
    }

    /// `image (B, C, H, W)` in [-1, 1] to the latent distribution (`latent_dist` in diffusers).
    pub fn encode(&self, image: &B::Tensor) -> Result<LatentDist<B::Tensor>> {
        let be = &self.be;
        let (encoder, quant_conv) = self.encoder.as_ref().ok_or_else(|| vae::no_encoder("AutoencoderKL"))?;
        let mut h = encoder.forward(image)?;
        if let Some(q) = quant_conv {
            h = q.forward(&h)?;
        }
        let l = self.config.latent_channels;
        let mean = be.narrow(&h, 1, 0, l)?;
        let logvar = be.clamp(&be.narrow(&h, 1, l, l)?, -30.0, 20.0)?;
        // std = exp(logvar / 2), computed on the host: the backend has no exp, and this runs
        // once per encoded image.
        let d = be.dims(&logvar);
        let std: Vec<f32> = be.download(&logvar)?.iter().map(|v| (0.5 * v).exp()).collect();
        Ok(LatentDist { mean, std: be.upload(std, &d)? })
    }

    /// Latents (not divided by `scaling_factor`: the caller does) to an image in about [-1, 1].
    pub fn decode(&self, z: &B::Tensor) -> Result<B::Tensor> {
        self.decoder.forward(&self.decoder_input(z)?)
    }

    /// What [`Self::decode`] hands its decoder: the latents through `post_quant_conv`.
    pub fn decoder_input(&self, z: &B::Tensor) -> Result<B::Tensor> {
        match &self.post_quant_conv {
            Some(p) => p.forward(z),
            None => Ok(z.clone()),
        }
    }

    pub fn decoder(&self) -> &Decoder<B> {
        &self.decoder
    }
}

/// Reads the config file of an AutoencoderKL folder.
pub fn read_config(dir: &Path) -> Result<AutoencoderKLConfig> {
    config::read(&config::config_path(dir))
}
