//! `LDMBertModel`, the text encoder of the LDM text-to-image checkpoint (defined in diffusers'
//! `pipeline_latent_diffusion.py`): learned token and position embeddings, pre-norm encoder
//! layers with bias-free q/k/v projections and exact GELU, and a final LayerNorm.
//!
//! As in diffusers, no attention mask is used: padding tokens are attended to.

use std::path::Path;

use serde::Deserialize;

use crate::backend::Backend;
use crate::models::config::{self, check_size, check_unsupported, MAX_CHANNELS, MAX_LAYERS};
use crate::nn::{LayerNorm, Linear, Weights};
use crate::{Error, Result};

/// The keys of `config.json` (transformers' `LDMBertConfig`) that this model reads.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LDMBertConfig {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub encoder_layers: usize,
    pub encoder_ffn_dim: usize,
    pub encoder_attention_heads: usize,
    pub head_dim: usize,
    pub d_model: usize,
    pub activation_function: String,
    pub scale_embedding: bool,
}

impl Default for LDMBertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            max_position_embeddings: 77,
            encoder_layers: 32,
            encoder_ffn_dim: 5120,
            encoder_attention_heads: 8,
            head_dim: 64,
            d_model: 1280,
            activation_function: "gelu".into(),
            scale_embedding: false,
        }
    }
}

struct EncoderLayer<B: Backend> {
    be: B,
    self_attn_layer_norm: LayerNorm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    out_proj: Linear<B>,
    final_layer_norm: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    heads: usize,
    scale: f32,
}

impl<B: Backend> EncoderLayer<B> {
    fn load(w: &Weights<B>, c: &LDMBertConfig) -> Result<Self> {
        let inner = c.head_dim * c.encoder_attention_heads;
        let a = w.pp("self_attn");
        Ok(Self {
            be: w.backend().clone(),
            self_attn_layer_norm: LayerNorm::load(&w.pp("self_attn_layer_norm"), c.d_model, 1e-5)?,
            q_proj: Linear::load(&a.pp("q_proj"), c.d_model, inner, false)?,
            k_proj: Linear::load(&a.pp("k_proj"), c.d_model, inner, false)?,
            v_proj: Linear::load(&a.pp("v_proj"), c.d_model, inner, false)?,
            out_proj: Linear::load(&a.pp("out_proj"), inner, c.d_model, true)?,
            final_layer_norm: LayerNorm::load(&w.pp("final_layer_norm"), c.d_model, 1e-5)?,
            fc1: Linear::load(&w.pp("fc1"), c.d_model, c.encoder_ffn_dim, true)?,
            fc2: Linear::load(&w.pp("fc2"), c.encoder_ffn_dim, c.d_model, true)?,
            heads: c.encoder_attention_heads,
            scale: (c.head_dim as f32).powf(-0.5),
        })
    }

    fn forward(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let be = &self.be;
        let h = self.self_attn_layer_norm.forward(x)?;
        // LDMBert scales the queries before the product (diffusers does the same).
        let q = be.affine(&self.q_proj.forward(&h)?, self.scale, 0.0)?;
        let k = self.k_proj.forward(&h)?;
        let v = self.v_proj.forward(&h)?;
        let o = be.attention_heads(&q, &k, &v, self.heads, 1.0)?;
        let x = self.out_proj.forward_add(&o, x)?;
        let h = self.final_layer_norm.forward(&x)?;
        self.fc2.forward_add(&self.fc1.forward_gelu(&h)?, &x)
    }
}

pub struct LDMBertModel<B: Backend> {
    be: B,
    pub config: LDMBertConfig,
    embed_tokens: B::Tensor,
    embed_positions: B::Tensor,
    layers: Vec<EncoderLayer<B>>,
    layer_norm: LayerNorm<B>,
}

impl<B: Backend> LDMBertModel<B> {
    pub fn load(config: LDMBertConfig, path: &Path, w: &Weights<B>) -> Result<Self> {
        let c = &config;
        check_size(path, "d_model", c.d_model, MAX_CHANNELS)?;
        check_size(path, "encoder_layers", c.encoder_layers, MAX_LAYERS)?;
        check_size(path, "encoder_attention_heads", c.encoder_attention_heads, MAX_CHANNELS)?;
        check_size(path, "head_dim", c.head_dim, MAX_CHANNELS)?;
        check_size(path, "encoder_ffn_dim", c.encoder_ffn_dim, 8 * MAX_CHANNELS)?;
        check_size(path, "vocab_size", c.vocab_size, 1 << 22)?;
        check_size(path, "max_position_embeddings", c.max_position_embeddings, 1 << 16)?;
        if c.max_position_embeddings < crate::tokenizer::MAX_LENGTH {
            return Err(Error::config(path, "max_position_embeddings", format!(
                "{} is out of range: the pipeline encodes {} tokens per prompt",
                c.max_position_embeddings,
                crate::tokenizer::MAX_LENGTH
            )));
        }
        check_unsupported(path, "activation_function", &c.activation_function.as_str(), &"gelu")?;
        check_unsupported(path, "scale_embedding", &c.scale_embedding, &false)?;
        // transformers saves the encoder under `model.`; the unused `to_logits` head sits beside it.
        let m = w.pp("model");
        let layers = (0..c.encoder_layers)
            .map(|i| EncoderLayer::load(&m.pp("layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        for name in ["to_logits.weight", "to_logits.bias"] {
            if w.contains(name) {
                let shape = w.source().meta(name).map(|m| m.shape).unwrap_or_default();
                let _ = w.get(name, &shape)?;
            }
        }
        Ok(Self {
            be: w.backend().clone(),
            embed_tokens: m.pp("embed_tokens").get("weight", &[c.vocab_size, c.d_model])?,
            embed_positions: m.pp("embed_positions").get("weight", &[c.max_position_embeddings, c.d_model])?,
            layers,
            layer_norm: LayerNorm::load(&m.pp("layer_norm"), c.d_model, 1e-5)?,
            config,
        })
    }

    /// Token ids, one row of equal length per prompt, to `last_hidden_state (B, L, d_model)`.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<B::Tensor> {
        let be = &self.be;
        let b = ids.len();
        let l = ids.first().map(|r| r.len()).unwrap_or(0);
        if b == 0 || l == 0 || ids.iter().any(|r| r.len() != l) {
            return Err(Error::InvalidArgument("LDMBert needs a non-empty batch of equal-length token rows".into()));
        }
        if l > self.config.max_position_embeddings {
            return Err(Error::InvalidArgument(format!("{l} tokens exceed max_position_embeddings {}", self.config.max_position_embeddings)));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let d = self.config.d_model;
        let tok = be.reshape(&be.embedding(&flat, &self.embed_tokens)?, &[b, l, d])?;
        let positions: Vec<u32> = (0..l as u32).collect();
        let pos = be.reshape(&be.embedding(&positions, &self.embed_positions)?, &[1, l, d])?;
        let mut h = be.add(&tok, &pos)?;
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        self.layer_norm.forward(&h)
    }
}

/// Reads the config file of an LDMBertModel folder.
pub fn read_config(dir: &Path) -> Result<LDMBertConfig> {
    config::read(&config::config_path(dir))
}
