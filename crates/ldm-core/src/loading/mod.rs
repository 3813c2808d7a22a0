//! Reading models as published: diffusers folders, weight files, the Hugging Face cache.

pub mod folder;
pub mod hub;
pub mod pickle;
pub mod weights;

pub use weights::{find_weights, open_weight_file, PthFile, SafetensorsFile, Sharded, TensorMeta, TensorSource};
pub use folder::{format_count, Component, ComponentClass, ComponentKind, ModelFolder, WeightsSummary};
pub use hub::{resolve_model, resolve_model_in, resolve_model_with, HubId, HubOptions};
