//! Hub ids resolved through the local Hugging Face cache (and downloaded when online).
//!
//! The cache layout is huggingface_hub's: `<cache>/models--ORG--NAME/refs/<revision>` holds a
//! commit hash and `<cache>/models--ORG--NAME/snapshots/<hash>/` the files of that commit, so a
//! cache filled by Python (`huggingface-cli download`) is found here and the other way round.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// How hub ids are resolved: where the cache is and whether to download what is missing.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// The hub cache folder (the one holding `models--ORG--NAME`).
    pub cache_dir: PathBuf,
    /// Download models missing from the cache (needs the crate feature `hub`).
    pub allow_download: bool,
    /// The hub address; `None` for https://huggingface.co.
    pub endpoint: Option<String>,
    /// An access token for gated or private models.
    pub token: Option<String>,
    /// Show download progress bars on stderr.
    pub progress: bool,
}

impl HubOptions {
    /// Options from the environment, as huggingface_hub reads them: the cache is
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1`
    /// turns downloads off; `HF_ENDPOINT` and `HF_TOKEN` are used when set. No progress bars.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Self {
            cache_dir: default_cache_dir(),
            allow_download: !offline,
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
            progress: false,
        }
    }
}

/// The Hugging Face hub cache folder named by the environment (see [`HubOptions::from_env`]).
pub fn default_cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let home = var("HOME")
        .or_else(|| var("USERPROFILE"))
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// A parsed hub id: `ORG/NAME`, optionally `@REVISION` (branch, tag or commit hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    /// `ORG/NAME`.
    pub repo: String,
    /// "main" unless given.
    pub revision: String,
}

impl HubId {
    /// Parses `ORG/NAME[@REV]`; `None` when `spec` does not look like a hub id.
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (spec, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let rev_ok = !revision.is_empty()
            && !revision.contains("..")
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        (part_ok(org) && part_ok(name) && rev_ok).then(|| Self {
            repo: repo.into(),
            revision: revision.into(),
        })
    }

    /// The repository's folder in the cache: `models--ORG--NAME`.
    pub fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    /// The command that downloads it with huggingface_hub's CLI.
    pub fn download_command(&self) -> String {
        match self.revision.as_str() {
            "main" => format!("huggingface-cli download {}", self.repo),
            rev => format!("huggingface-cli download {} --revision {rev}", self.repo),
        }
    }
}

/// Resolves a model given as a folder or a hub id (`ORG/NAME[@REV]`) to a local folder, with
/// the cache and download settings of the environment ([`HubOptions::from_env`]).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_with(spec, &HubOptions::from_env())
}

/// [`resolve_model`] with an explicit cache folder, downloading only if `allow_download`.
pub fn resolve_model_in(spec: &str, cache_dir: &Path, allow_download: bool) -> Result<PathBuf> {
    let options = HubOptions {
        cache_dir: cache_dir.to_path_buf(),
        allow_download,
        ..HubOptions::from_env()
    };
    resolve_model_with(spec, &options)
}

/// [`resolve_model`] with explicit options. An existing folder is returned as it is; a hub id is
/// looked up in the cache, then downloaded if allowed.
pub fn resolve_model_with(spec: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::InvalidArgument(format!(
            "`{spec}` is a file; expected a model folder (with model_index.json or config.json) or a hub id ORG/NAME"
        )));
    }
    let Some(id) = HubId::parse(spec) else {
        let what = "model folder; nor is it a hub id of the form ORG/NAME";
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            what: what.into(),
        });
    };
    if let Some(dir) = cached_snapshot(&options.cache_dir, &id) {
        if !options.allow_download || is_complete(&dir) {
            return Ok(dir);
        }
        // An interrupted download leaves a partial snapshot: complete it if the hub answers, else
        // hand back what is there, and opening it will name what is missing.
        return Ok(download(&id, options).unwrap_or(dir));
    }
    let not_cached = |reason: String| Error::NotCached {
        model: spec.to_string(),
        cache: options.cache_dir.clone(),
        reason,
        command: id.download_command(),
        folder: id.cache_folder(),
    };
    if !options.allow_download {
        return Err(not_cached(format!(
            "HF_HUB_OFFLINE=1 turns downloads off; no folder `{spec}` exists either"
        )));
    }
    download(&id, options).map_err(|reason| not_cached(format!("{reason}; no folder `{spec}` exists either")))
}

/// The cached snapshot folder of `id`, if it holds a model (`model_index.json` or `config.json`).
pub fn cached_snapshot(cache_dir: &Path, id: &HubId) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(id.cache_folder());
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(&id.revision)) {
        Ok(hash) => hash.trim().to_string(),
        // A revision given as a commit hash has no ref file: its snapshot is named by it.
        Err(_) => id.revision.clone(),
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.contains("..") {
        return None;
    }
    let snapshot = repo_dir.join("snapshots").join(commit);
    let is_model = ["model_index.json", "config.json"]
        .iter()
        .any(|f| snapshot.join(f).is_file());
    is_model.then_some(snapshot)
}

/// Whether a snapshot opens as a model folder with the config and weights of every component.
fn is_complete(dir: &Path) -> bool {
    let Ok(folder) = super::folder::ModelFolder::open(dir) else {
        return false;
    };
    folder.components.iter().all(|c| {
        let config_ok = c.config_path().is_file() || c.class.kind() == super::folder::ComponentKind::Tokenizer;
        config_ok && (!c.class.has_weights() || c.weights().is_ok())
    })
}

#[cfg(not(feature = "hub"))]
fn download(_id: &HubId, _options: &HubOptions) -> Result<PathBuf, String> {
    Err("this build has no download support (crate feature `hub` is off)".into())
}

/// Downloads what a pipeline needs into the cache: `model_index.json` (or a single model's
/// `config.json`), then per component its config, tokenizer files and one set of weights (the
/// first that exists in [`super::find_weights`]'s order, so safetensors before `.bin`). The error
/// is the reason, for [`Error::NotCached`].
#[cfg(feature = "hub")]
fn download(id: &HubId, options: &HubOptions) -> Result<PathBuf, String> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};

    let mut builder = ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
        .with_progress(options.progress)
        .with_retries(2);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if options.token.is_some() {
        builder = builder.with_token(options.token.clone());
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    let repo = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    let info = repo.info().map_err(|e| e.to_string())?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let get = |file: &str| repo.get(file).map_err(|e| format!("{file}: {e}"));

    let wanted = plan_downloads(&files, |file| {
        let path = get(file)?;
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    })?;
    let mut root = None;
    for file in &wanted {
        let path = get(file)?;
        if matches!(file.as_str(), "model_index.json" | "config.json") {
            root = path.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| {
        format!(
            "the repository `{}` has neither model_index.json nor config.json",
            id.repo
        )
    })
}

/// The files to fetch from a repository listing `files`; `read` fetches and reads a JSON file
/// (the index and the shard indexes decide what else is needed).
#[cfg_attr(not(feature = "hub"), allow(dead_code))]
fn plan_downloads(files: &[String], read: impl Fn(&str) -> Result<String, String>) -> Result<Vec<String>, String> {
    use super::folder::ComponentClass;
    let has = |f: &str| files.iter().any(|x| x == f);
    let parse = |file: &str| -> Result<serde_json::Value, String> {
        serde_json::from_str(&read(file)?).map_err(|e| format!("{file}: not valid JSON: {e}"))
    };
    let mut wanted = Vec::new();
    // (folder prefix, class name) of each component to fetch.
    let mut components: Vec<(String, Option<String>)> = Vec::new();
    if has("model_index.json") {
        wanted.push("model_index.json".to_string());
        if let serde_json::Value::Object(map) = parse("model_index.json")? {
            for (name, entry) in map {
                let class = entry.get(1).and_then(|c| c.as_str());
                let plain = !name.starts_with(['_', '.']) && !name.contains(['/', '\\']);
                if plain && class.is_some() {
                    components.push((format!("{name}/"), class.map(String::from)));
                }
            }
        }
    } else if has("config.json") {
        let class = parse("config.json")?
            .get("_class_name")
            .and_then(|c| c.as_str())
            .map(String::from);
        components.push((String::new(), class));
    } else {
        return Err("the repository has neither model_index.json nor config.json".into());
    }
    const EXTRA: [&str; 6] = [
        "config.json",
        "scheduler_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "tokenizer.json",
    ];
    for (prefix, class) in components {
        for extra in EXTRA {
            let file = format!("{prefix}{extra}");
            if has(&file) && !wanted.contains(&file) {
                wanted.push(file);
            }
        }
        let known = class.as_deref().and_then(ComponentClass::from_name);
        let stems: &[&str] = match known {
            Some(c) => c.weight_stems(),
            None => &["diffusion_pytorch_model", "model", "pytorch_model"],
        };
        if let Some(weights) = pick_weights(&prefix, stems, &has) {
            if weights.contains(".index") {
                let index = parse(&weights)?;
                let mut shards: Vec<String> = index
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.values()
                            .filter_map(|v| v.as_str())
                            .map(|s| format!("{prefix}{s}"))
                            .collect()
                    })
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                // Only files the repository lists are fetched, so an index cannot point outside it.
                if let Some(missing) = shards.iter().find(|s| !has(s)) {
                    return Err(format!(
                        "{weights} names the shard {missing}, which the repository does not have"
                    ));
                }
                wanted.extend(shards);
            }
            wanted.push(weights);
        }
    }
    Ok(wanted)
}

/// The weight file (or shard index) a component folder would be loaded from, in the order of
/// [`super::find_weights`]: plain before fp16, safetensors before `.bin`, single before sharded.
fn pick_weights(prefix: &str, stems: &[&str], has: &impl Fn(&str) -> bool) -> Option<String> {
    for variant in ["", ".fp16"] {
        for ext in ["safetensors", "bin"] {
            for stem in stems {
                let single = std::iter::once(format!("{stem}{variant}.{ext}"));
                let mut candidates = single.chain(super::weights::index_names(stem, variant, ext));
                if let Some(found) =
                    candidates.find_map(|c| has(&format!("{prefix}{c}")).then(|| format!("{prefix}{c}")))
                {
                    return Some(found);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_ids() {
        let id = HubId::parse("CompVis/ldm-text2im-large-256").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("CompVis/ldm-text2im-large-256", "main")
        );
        let id = HubId::parse("a/b@v1.0").unwrap();
        assert_eq!(id.revision, "v1.0");
        assert_eq!(id.cache_folder(), "models--a--b");
        for bad in ["", "a", "a/b/c", "./a", "../a/b", "/a/b", "a/", "a/b@", "a b/c", "C:/x"] {
            assert!(HubId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn plans_the_files_of_a_pipeline() {
        let files: Vec<String> = [
            "model_index.json",
            "README.md",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "bert/config.json",
            "bert/pytorch_model.bin",
            "tokenizer/vocab.txt",
            "tokenizer/tokenizer_config.json",
            "scheduler/scheduler_config.json",
            "vqvae/config.json",
            "vqvae/diffusion_pytorch_model.safetensors.index.json",
            "vqvae/diffusion_pytorch_model-00001-of-00002.safetensors",
            "vqvae/diffusion_pytorch_model-00002-of-00002.safetensors",
        ]
        .map(String::from)
        .to_vec();
        let read = |f: &str| -> Result<String, String> {
            Ok(match f {
                "model_index.json" => r#"{"_class_name": "P", "bert": ["latent_diffusion", "LDMBertModel"],
                    "scheduler": ["diffusers", "DDIMScheduler"], "tokenizer": ["transformers", "BertTokenizer"],
                    "unet": ["diffusers", "UNet2DConditionModel"], "vqvae": ["diffusers", "AutoencoderKL"],
                    "safety_checker": [null, null]}"#
                    .into(),
                "vqvae/diffusion_pytorch_model.safetensors.index.json" => r#"{"weight_map": {
                    "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                    "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#
                    .into(),
                other => return Err(format!("unexpected read of {other}")),
            })
        };
        let mut plan = plan_downloads(&files, read).unwrap();
        plan.sort();
        let expected = [
            "bert/config.json",
            "bert/pytorch_model.bin",
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vqvae/config.json",
            "vqvae/diffusion_pytorch_model-00001-of-00002.safetensors",
            "vqvae/diffusion_pytorch_model-00002-of-00002.safetensors",
            "vqvae/diffusion_pytorch_model.safetensors.index.json",
        ];
        assert_eq!(plan, expected);
    }
}
