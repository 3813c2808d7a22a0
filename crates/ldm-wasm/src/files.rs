//! Fetching a diffusers folder over HTTP and mounting its files for ldm-core's loaders.
//!
//! `model_index.json` names the components; each component's config, tokenizer files and
//! weight file are fetched (through the Cache API) into JavaScript `Uint8Array`s and mounted
//! with [`ldm_core::vfs`]. A weight file stays in JavaScript memory: the loaders copy one tensor
//! at a time into wasm memory and on to the GPU, so a file is never held whole in wasm memory.

use std::path::Path;
use std::sync::Arc;

use ldm_core::loading::folder::{ComponentClass, ComponentKind};
use ldm_core::{Error, Result};
use wasm_bindgen::prelude::*;

use crate::options::ProgressSink;

#[wasm_bindgen(module = "/js/fetch.js")]
extern "C" {
    #[wasm_bindgen(catch, js_name = ldmFetch)]
    async fn ldm_fetch(url: &str, use_cache: bool, on_bytes: &js_sys::Function) -> std::result::Result<JsValue, JsValue>;
    #[wasm_bindgen(js_name = ldmNextTurn)]
    fn ldm_next_turn() -> js_sys::Promise;
}

/// Resolves on the next turn of the event loop.
pub(crate) async fn next_turn() -> std::result::Result<JsValue, JsValue> {
    wasm_bindgen_futures::JsFuture::from(ldm_next_turn()).await
}

/// A mounted file held in a JavaScript `Uint8Array`.
struct JsBytes(js_sys::Uint8Array);

// SAFETY: wasm32-unknown-unknown without the atomics feature has one thread; the array is never
// reached from another.
unsafe impl Send for JsBytes {}
unsafe impl Sync for JsBytes {}

impl ldm_core::vfs::FileData for JsBytes {
    fn len(&self) -> u64 {
        self.0.length() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.len() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end of the file"));
        }
        self.0.subarray(offset as u32, end as u32).copy_to(buf);
        Ok(())
    }
}

fn fetch_error(url: &str, e: JsValue) -> Error {
    let msg = e
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"));
    Error::Io { path: url.into(), source: std::io::Error::other(msg) }
}

/// Fetches `url`: `Some(bytes)`, or `None` when the server answers 404.
async fn fetch(url: &str, cache: bool, progress: &ProgressSink, file: &str) -> Result<Option<js_sys::Uint8Array>> {
    let on_bytes = progress.download_callback(file);
    let v = ldm_fetch(url, cache, on_bytes.as_ref().unchecked_ref()).await.map_err(|e| fetch_error(url, e))?;
    if v.is_null() || v.is_undefined() {
        return Ok(None);
    }
    v.dyn_into::<js_sys::Uint8Array>().map(Some).map_err(|_| Error::Backend(format!("fetching {url}: not bytes")))
}

/// Fetches the first of `names` (relative to the folder) that exists and mounts it; returns its
/// name, or `None` when none exists.
async fn fetch_first(base: &str, root: &Path, names: &[String], cache: bool, progress: &ProgressSink) -> Result<Option<String>> {
    for name in names {
        if let Some(bytes) = fetch(&format!("{base}/{name}"), cache, progress, name).await? {
            ldm_core::vfs::mount(root.join(name), Arc::new(JsBytes(bytes)));
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// Fetches the folder at `base_url` and mounts it at `root`.
pub(crate) async fn fetch_folder(base_url: &str, root: &Path, cache: bool, progress: &ProgressSink) -> Result<()> {
    let base = base_url.trim_end_matches('/');
    let index_name = "model_index.json".to_string();
    let found = fetch_first(base, root, std::slice::from_ref(&index_name), cache, progress).await?;
    if found.is_none() {
        return Err(Error::NotFound {
            path: format!("{base}/model_index.json").into(),
            what: "model_index.json of the model folder (is the model URL right?)".into(),
        });
    }
    let text = ldm_core::vfs::read_to_string(&root.join(&index_name)).map_err(|e| Error::io(&root.join(&index_name), e))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|source| Error::Json { path: format!("{base}/model_index.json").into(), source })?;
    let Some(map) = index.as_object() else {
        return Err(Error::config(Path::new(&format!("{base}/model_index.json")), "(root)", "expected a JSON object"));
    };
    for (name, entry) in map {
        // The same rules as the folder reader, which reports what is wrong with odd entries.
        let Some([_, serde_json::Value::String(class)]) = entry.as_array().map(|a| a.as_slice()) else { continue };
        if name.starts_with(['_', '.']) || name.contains(['/', '\\', ':']) {
            continue;
        }
        let Some(class) = ComponentClass::from_name(class) else { continue };
        let dir = name.as_str();
        let one = |f: &str| vec![format!("{dir}/{f}")];
        if class.kind() == ComponentKind::Tokenizer {
            for f in ["tokenizer_config.json", "special_tokens_map.json"] {
                fetch_first(base, root, &one(f), cache, progress).await?;
            }
            let names = vec![format!("{dir}/tokenizer.json"), format!("{dir}/vocab.txt")];
            if fetch_first(base, root, &names, cache, progress).await?.is_none() {
                return Err(Error::NotFound { path: format!("{base}/{dir}/vocab.txt").into(), what: "the tokenizer's tokenizer.json or vocab.txt".into() });
            }
            continue;
        }
        if fetch_first(base, root, &one(class.config_file()), cache, progress).await?.is_none() {
            return Err(Error::NotFound {
                path: format!("{base}/{dir}/{}", class.config_file()).into(),
                what: format!("config of component `{name}` ({class})"),
            });
        }
        if class.has_weights() {
            let mut names = Vec::new();
            for variant in ["", ".fp16"] {
                for ext in ["safetensors", "bin"] {
                    for stem in class.weight_stems() {
                        names.push(format!("{dir}/{stem}{variant}.{ext}"));
                    }
                }
            }
            if fetch_first(base, root, &names, cache, progress).await?.is_none() {
                return Err(Error::NotFound {
                    path: format!("{base}/{dir}").into(),
                    what: format!(
                        "a weight file of component `{name}` (tried {}; sharded checkpoints are not read in the browser)",
                        names.iter().map(|n| n.rsplit('/').next().unwrap_or(n)).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
    }
    Ok(())
}
