//! One file per diffusers/transformers model class, its config struct beside it.

pub mod attention;
pub mod config;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod unet_2d;
pub mod vae;
pub mod autoencoder_kl;
pub mod vq_model;
pub mod ldm_bert;
