//! diffusers `VQModel`: the vector-quantised autoencoder of the super-resolution checkpoint.

use std::path::Path;

use serde::Deserialize;

use crate::backend::Backend;
use crate::models::config::{self, check_size, check_unsupported, MAX_CHANNELS};
use crate::models::vae::{self, CoderCfg, Decoder, Encoder};
use crate::nn::{Conv2d, Weights};
use crate::Result;

/// The keys of `config.json` that this model reads, with diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct VQModelConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub sample_size: Option<usize>,
    pub num_vq_embeddings: usize,
    pub norm_num_groups: usize,
    pub vq_embed_dim: Option<usize>,
    pub scaling_factor: f64,
    pub norm_type: String,
    pub mid_block_add_attention: bool,
    pub lookup_from_codebook: bool,
}

impl Default for VQModelConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 3,
            sample_size: None,
            num_vq_embeddings: 256,
            norm_num_groups: 32,
            vq_embed_dim: None,
            scaling_factor: 0.18215,
            norm_type: "group".into(),
            mid_block_add_attention: true,
            lookup_from_codebook: false,
        }
    }
}

impl VQModelConfig {
    pub fn coder(&self) -> CoderCfg {
        CoderCfg {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            norm_num_groups: self.norm_num_groups,
            mid_block_add_attention: self.mid_block_add_attention,
        }
    }

    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

pub struct VQModel<B: Backend> {
    be: B,
    pub config: VQModelConfig,
    /// The encoding half (encoder, quant_conv); `None` when loaded for decoding only.
    encoder: Option<(Encoder<B>, Conv2d<B>)>,
    codebook: B::Tensor,
    post_quant_conv: Conv2d<B>,
    decoder: Decoder<B>,
}

impl<B: Backend> VQModel<B> {
    /// The whole model, encoder included.
    pub fn load(config: VQModelConfig, path: &Path, w: &Weights<B>) -> Result<Self> {
        Self::load_parts(config, path, w, true)
    }

    /// The decoding half only (codebook, post_quant_conv, decoder): what the pipelines use. The
    /// encoder's tensors are skipped unread, so they take no memory; [`Self::encode`] then
    /// returns an error.
    pub fn load_decoder(config: VQModelConfig, path: &Path, w: &Weights<B>) -> Result<Self> {
        Self::load_parts(config, path, w, false)
    }

    fn load_parts(config: VQModelConfig, path: &Path, w: &Weights<B>, with_encoder: bool) -> Result<Self> {
        let coder = config.coder();
        coder.check(path, &config.act_fn, &config.down_block_types, &config.up_block_types)?;
        check_unsupported(path, "norm_type", &config.norm_type.as_str(), &"group")?;
        let l = config.latent_channels;
        let e = config.vq_embed_dim.unwrap_or(l);
        check_size(path, "latent_channels", l, MAX_CHANNELS)?;
        check_size(path, "vq_embed_dim", e, MAX_CHANNELS)?;
        check_size(path, "num_vq_embeddings", config.num_vq_embeddings, 1 << 20)?;
        check_size(path, "in_channels", config.in_channels, MAX_CHANNELS)?;
        check_size(path, "out_channels", config.out_channels, MAX_CHANNELS)?;
        let encoder = if with_encoder {
            Some((Encoder::load(&w.pp("encoder"), &coder, config.in_channels, l)?, Conv2d::load(&w.pp("quant_conv"), l, e, 1, 1, 0)?))
        } else {
            vae::skip_encoder(w)?;
            None
        };
        Ok(Self {
            be: w.backend().clone(),
            encoder,
            codebook: w.pp("quantize.embedding").get("weight", &[config.num_vq_embeddings, e])?,
            post_quant_conv: Conv2d::load(&w.pp("post_quant_conv"), e, l, 1, 1, 0)?,
            decoder: Decoder::load(&w.pp("decoder"), &coder, l, config.out_channels)?,
            config,
        })
    }

    /// Image to (unquantised) latents, as diffusers' `encode(...).latents`.
    pub fn encode(&self, image: &B::Tensor) -> Result<B::Tensor> {
        let (encoder, quant_conv) = self.encoder.as_ref().ok_or_else(|| vae::no_encoder("VQModel"))?;
        quant_conv.forward(&encoder.forward(image)?)
    }

    /// Each latent vector replaced by its nearest codebook entry.
    pub fn quantize(&self, h: &B::Tensor) -> Result<B::Tensor> {
        let be = &self.be;
        let d = be.dims(h);
        let (b, c, hh, ww) = (d[0], d[1], d[2], d[3]);
        let flat = be.reshape(&be.permute(h, &[0, 2, 3, 1])?, &[b * hh * ww, c])?;
        let q = be.vq_nearest(&flat, &self.codebook)?;
        be.permute(&be.reshape(&q, &[b, hh, ww, c])?, &[0, 3, 1, 2])
    }

    /// Latents to image; quantised first unless `force_not_quantize` (diffusers' default is to
    /// quantise).
    pub fn decode(&self, h: &B::Tensor, force_not_quantize: bool) -> Result<B::Tensor> {
        self.decoder.forward(&self.decoder_input(h, force_not_quantize)?)
    }

    /// What [`Self::decode`] hands its decoder: the latents quantised (unless
    /// `force_not_quantize`) and through `post_quant_conv`.
    pub fn decoder_input(&self, h: &B::Tensor, force_not_quantize: bool) -> Result<B::Tensor> {
        let q = if force_not_quantize { h.clone() } else { self.quantize(h)? };
        self.post_quant_conv.forward(&q)
    }

    pub fn decoder(&self) -> &Decoder<B> {
        &self.decoder
    }
}

/// Reads the config file of a VQModel folder.
pub fn read_config(dir: &Path) -> Result<VQModelConfig> {
    config::read(&config::config_path(dir))
}
