//! Helpers for reading diffusers' `config.json` files: values that may be one number or one per
//! block, and checks that turn absurd or unsupported settings into errors naming the field.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{Error, Result};

/// A config value given either once for all blocks or as a list with one entry per block.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// One value per block, checking a list has exactly `n` entries.
    pub fn expand(&self, n: usize, path: &Path, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => {
                Err(Error::config(path, field, format!("has {} entries, but there are {n} blocks", v.len())))
            }
        }
    }
}

/// Parses a config JSON value into `T`; the error names the file and serde's account of the
/// field at fault.
pub fn parse<T: DeserializeOwned>(value: &serde_json::Value, path: &Path) -> Result<T> {
    T::deserialize(value).map_err(|e| {
        // serde's message does not name the field when a value has the wrong type ("invalid
        // type: string, expected usize"). The config structs default every field, so parsing
        // each key on its own finds the one at fault.
        let culprit = value.as_object().and_then(|map| {
            map.iter().find_map(|(k, v)| {
                let alone = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
                T::deserialize(&alone).err().map(|e| (k.clone(), v.clone(), e))
            })
        });
        match culprit {
            Some((field, v, e)) => {
                let shown = v.to_string();
                let shown = if shown.chars().count() > 80 { format!("{}...", shown.chars().take(80).collect::<String>()) } else { shown };
                Error::Config { path: path.to_path_buf(), field, msg: format!("{shown} is not valid: {e}") }
            }
            None => Error::Config { path: path.to_path_buf(), field: field_of(&e), msg: e.to_string() },
        }
    })
}

fn field_of(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    msg.split('`').nth(1).unwrap_or("?").to_string()
}

/// Reads and parses a `config.json`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = crate::vfs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    parse(&value, path)
}

/// Bounds for sizes read from configs: large enough for any published model, small enough
/// that a hostile config cannot make us allocate the machine away.
pub const MAX_CHANNELS: usize = 16384;
pub const MAX_LAYERS: usize = 256;

/// Checks `1 <= value <= max`.
pub fn check_size(path: &Path, field: &str, value: usize, max: usize) -> Result<()> {
    if value == 0 || value > max {
        return Err(Error::config(path, field, format!("{value} is out of range (expected 1 to {max})")));
    }
    Ok(())
}

/// The largest `sample_size` (latent side) accepted; images are at most 8192 pixels a side.
pub const MAX_SAMPLE_SIZE: usize = 8192;

/// Checks `lo <= value <= hi`.
pub fn check_range(path: &Path, field: &str, value: usize, lo: usize, hi: usize) -> Result<()> {
    if value < lo || value > hi {
        return Err(Error::config(path, field, format!("{value} is out of range (expected {lo} to {hi})")));
    }
    Ok(())
}

/// Checks that an option diffusers supports but the LDM models do not use has its default.
pub fn check_unsupported<T: PartialEq + std::fmt::Debug>(path: &Path, field: &str, value: &T, default: &T) -> Result<()> {
    if value != default {
        return Err(Error::config(path, field, format!("{value:?} is not supported (only {default:?})")));
    }
    Ok(())
}

/// The path to use in messages about a component's config.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
