//! ldm-core: the Latent Diffusion models, schedulers and pipelines of diffusers, in Rust.
//!
//! Everything that computes lives here; the front ends (`ldm` CLI, C ABI, wasm) only translate.

pub mod backend;
pub mod bench;
pub mod error;
pub mod executor;
pub mod image;
pub mod loading;
pub mod models;
pub mod nn;
pub mod pipelines;
pub mod rng;
pub mod schedulers;
pub mod threads;
pub mod tokenizer;
pub mod vfs;

pub use error::{Error, ErrorKind, Result};
