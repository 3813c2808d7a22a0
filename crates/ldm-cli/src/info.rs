//! `ldm info`: what a model folder holds, component by component.

use std::fmt::Write as _;
use std::path::Path;

use clap::Args;
use ldm_core::loading::{format_count, Component, ComponentKind, ModelFolder, WeightsSummary};
use serde_json::Value;

/// Arguments of `ldm info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// The model: a local folder (diffusers pipeline or single model) or a hub id ORG/NAME[@REVISION]
    /// found in the Hugging Face cache (downloaded if missing, unless HF_HUB_OFFLINE=1).
    #[arg(long, short = 'm', value_name = "PATH_OR_ID")]
    pub model: String,
}

/// Config keys worth showing per kind of model; schedulers show their whole config.
fn key_fields(kind: ComponentKind) -> &'static [&'static str] {
    match kind {
        ComponentKind::UNet => &[
            "in_channels",
            "out_channels",
            "sample_size",
            "block_out_channels",
            "layers_per_block",
            "attention_head_dim",
            "num_attention_heads",
            "cross_attention_dim",
            "use_linear_projection",
            "down_block_types",
            "up_block_types",
        ],
        ComponentKind::Autoencoder => &[
            "in_channels",
            "out_channels",
            "latent_channels",
            "block_out_channels",
            "layers_per_block",
            "sample_size",
            "scaling_factor",
            "num_vq_embeddings",
            "vq_embed_dim",
        ],
        ComponentKind::TextEncoder => &[
            "d_model",
            "encoder_layers",
            "encoder_attention_heads",
            "head_dim",
            "encoder_ffn_dim",
            "max_position_embeddings",
            "vocab_size",
        ],
        ComponentKind::Tokenizer | ComponentKind::Scheduler => &[],
    }
}

/// Prints the report for `args.model`.
pub fn run(args: &InfoArgs) -> ldm_core::Result<()> {
    let dir = crate::resolve_model(&args.model)?;
    let folder = ModelFolder::open(&dir)?;
    let mut out = String::new();
    if dir.as_os_str() == args.model.as_str() {
        writeln!(out, "model: {}", dir.display()).ok();
    } else {
        writeln!(out, "model: {} ({})", args.model, dir.display()).ok();
    }
    let version = folder
        .diffusers_version
        .as_deref()
        .map(|v| format!(", diffusers {v}"))
        .unwrap_or_default();
    if folder.is_single() {
        writeln!(out, "class: {} (single component{version})", folder.class_name).ok();
    } else {
        let n = folder.components.len();
        writeln!(out, "pipeline: {} ({n} components{version})", folder.class_name).ok();
    }
    let mut total = 0u64;
    for component in &folder.components {
        out.push('\n');
        total += describe(component, &mut out)?;
    }
    writeln!(out, "\ntotal parameters: {} ({total})", format_count(total)).ok();
    crate::print_stdout(&out);
    Ok(())
}

/// Appends one component's section; returns its parameter count.
fn describe(component: &Component, out: &mut String) -> ldm_core::Result<u64> {
    writeln!(out, "{}: {} ({})", component.name, component.class, component.library).ok();
    let kind = component.class.kind();
    let config = component.config();
    match (kind, config) {
        (ComponentKind::Scheduler, config) => {
            if let Value::Object(map) = config? {
                for (key, value) in map.iter().filter(|(k, _)| !k.starts_with('_')) {
                    writeln!(out, "  {key}: {}", show(value)).ok();
                }
            }
        }
        (ComponentKind::Tokenizer, _) => describe_tokenizer(&component.dir, out),
        (kind, config) => {
            let config = config?;
            for key in key_fields(kind) {
                match config.get(key) {
                    Some(Value::Null) | None => {}
                    Some(value) => {
                        writeln!(out, "  {key}: {}", show(value)).ok();
                    }
                }
            }
        }
    }
    if !component.class.has_weights() {
        return Ok(0);
    }
    let weights = WeightsSummary::of(component.weights()?.as_ref());
    let fp16 = if weights.fp16_variant { ", fp16 variant" } else { "" };
    writeln!(
        out,
        "  weights: {} ({}{fp16}, {}, {} tensors)",
        weights.location,
        weights.format,
        weights.dtypes.join("/"),
        weights.tensors
    )
    .ok();
    writeln!(
        out,
        "  parameters: {} ({})",
        format_count(weights.parameters),
        weights.parameters
    )
    .ok();
    Ok(weights.parameters)
}

/// Tokenizers have no weights: show their files and vocabulary size.
fn describe_tokenizer(dir: &Path, out: &mut String) {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    writeln!(out, "  files: {}", files.join(", ")).ok();
    if let Some(n) = vocab_size(dir) {
        writeln!(out, "  vocab size: {n}").ok();
    }
}

/// The number of tokens in `vocab.txt` (one per line), else in `tokenizer.json`'s model vocabulary.
fn vocab_size(dir: &Path) -> Option<usize> {
    if let Ok(text) = std::fs::read_to_string(dir.join("vocab.txt")) {
        return Some(text.lines().count());
    }
    let text = std::fs::read_to_string(dir.join("tokenizer.json")).ok()?;
    let json: Value = serde_json::from_str(&text).ok()?;
    match json.get("model")?.get("vocab")? {
        Value::Object(map) => Some(map.len()),
        Value::Array(list) => Some(list.len()),
        _ => None,
    }
}

/// A config value as one short line: strings unquoted, lists in brackets.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("[{}]", items.iter().map(show).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}
