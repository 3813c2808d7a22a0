//! Diffusers model folders: a pipeline folder (`model_index.json` + one folder per component) or
//! a folder holding a single model, tokenizer or scheduler.

use std::fmt;
use std::path::{Path, PathBuf};

use super::weights::{find_weights, TensorSource};
use crate::{Error, Result};

/// What a component is for; decides its config file and whether it has weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComponentKind {
    /// A denoising network (UNet2DModel, UNet2DConditionModel).
    UNet,
    /// An image autoencoder (AutoencoderKL, VQModel).
    Autoencoder,
    /// A text encoder (LDMBertModel).
    TextEncoder,
    /// A tokenizer: vocabulary files, no weights.
    Tokenizer,
    /// A noise scheduler: `scheduler_config.json` only.
    Scheduler,
}

/// The component classes this crate can load, named as in diffusers/transformers.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ComponentClass {
    UNet2DConditionModel,
    UNet2DModel,
    AutoencoderKL,
    VQModel,
    LDMBertModel,
    BertTokenizer,
    BertTokenizerFast,
    DDIMScheduler,
    PNDMScheduler,
    LMSDiscreteScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
}

impl ComponentClass {
    /// Every supported class.
    pub const ALL: [ComponentClass; 13] = [
        Self::UNet2DConditionModel,
        Self::UNet2DModel,
        Self::AutoencoderKL,
        Self::VQModel,
        Self::LDMBertModel,
        Self::BertTokenizer,
        Self::BertTokenizerFast,
        Self::DDIMScheduler,
        Self::PNDMScheduler,
        Self::LMSDiscreteScheduler,
        Self::EulerDiscreteScheduler,
        Self::EulerAncestralDiscreteScheduler,
        Self::DPMSolverMultistepScheduler,
    ];

    /// The class name as written in `model_index.json` / `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::UNet2DConditionModel => "UNet2DConditionModel",
            Self::UNet2DModel => "UNet2DModel",
            Self::AutoencoderKL => "AutoencoderKL",
            Self::VQModel => "VQModel",
            Self::LDMBertModel => "LDMBertModel",
            Self::BertTokenizer => "BertTokenizer",
            Self::BertTokenizerFast => "BertTokenizerFast",
            Self::DDIMScheduler => "DDIMScheduler",
            Self::PNDMScheduler => "PNDMScheduler",
            Self::LMSDiscreteScheduler => "LMSDiscreteScheduler",
            Self::EulerDiscreteScheduler => "EulerDiscreteScheduler",
            Self::EulerAncestralDiscreteScheduler => "EulerAncestralDiscreteScheduler",
            Self::DPMSolverMultistepScheduler => "DPMSolverMultistepScheduler",
        }
    }

    /// The class of that name, if supported.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The supported class names, comma separated, for messages.
    pub fn supported() -> String {
        Self::ALL.map(|c| c.name()).join(", ")
    }

    /// What the class is for.
    pub fn kind(self) -> ComponentKind {
        match self {
            Self::UNet2DConditionModel | Self::UNet2DModel => ComponentKind::UNet,
            Self::AutoencoderKL | Self::VQModel => ComponentKind::Autoencoder,
            Self::LDMBertModel => ComponentKind::TextEncoder,
            Self::BertTokenizer | Self::BertTokenizerFast => ComponentKind::Tokenizer,
            _ => ComponentKind::Scheduler,
        }
    }

    /// The library that saves this class (what a single-model folder is assumed to come from).
    pub fn library(self) -> &'static str {
        match self {
            Self::LDMBertModel | Self::BertTokenizer | Self::BertTokenizerFast => "transformers",
            _ => "diffusers",
        }
    }

    /// The config file of a component folder of this class.
    pub fn config_file(self) -> &'static str {
        match self.kind() {
            ComponentKind::Scheduler => "scheduler_config.json",
            ComponentKind::Tokenizer => "tokenizer_config.json",
            _ => "config.json",
        }
    }

    /// Weight file stems, in the order tried: diffusers' `save_pretrained` writes
    /// `diffusion_pytorch_model.*`, transformers' writes `model.safetensors` or
    /// `pytorch_model.bin`. Empty for classes without weights.
    pub fn weight_stems(self) -> &'static [&'static str] {
        match self.kind() {
            ComponentKind::UNet | ComponentKind::Autoencoder => &["diffusion_pytorch_model"],
            ComponentKind::TextEncoder => &["model", "pytorch_model"],
            ComponentKind::Tokenizer | ComponentKind::Scheduler => &[],
        }
    }

    /// Whether the class has a weight file.
    pub fn has_weights(self) -> bool {
        !self.weight_stems().is_empty()
    }
}

impl fmt::Display for ComponentClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One component of a model folder.
#[derive(Clone, Debug)]
pub struct Component {
    /// The key in `model_index.json` ("unet", "vqvae", ...), or "." for a single-model folder.
    pub name: String,
    /// The library named in `model_index.json` ("diffusers", "transformers", "latent_diffusion").
    pub library: String,
    pub class: ComponentClass,
    /// The component's folder.
    pub dir: PathBuf,
}

impl Component {
    /// The component's config file (`config.json`, `scheduler_config.json` or `tokenizer_config.json`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(self.class.config_file())
    }

    /// The parsed config file.
    pub fn config(&self) -> Result<serde_json::Value> {
        read_json(&self.config_path())
    }

    /// The component's weights (safetensors, PyTorch `.bin`, sharded or the fp16 variant).
    pub fn weights(&self) -> Result<Box<dyn TensorSource>> {
        if !self.class.has_weights() {
            return Err(Error::InvalidArgument(format!(
                "component `{}` ({}) has no weights",
                self.name, self.class
            )));
        }
        find_weights(&self.dir, self.class.weight_stems())
    }
}

/// A diffusers folder opened: its pipeline class and components.
#[derive(Clone, Debug)]
pub struct ModelFolder {
    pub dir: PathBuf,
    /// The pipeline class (`_class_name` of `model_index.json`), or the class of the single model.
    pub class_name: String,
    /// `_diffusers_version`, when recorded.
    pub diffusers_version: Option<String>,
    /// The components present, in `model_index.json` key order (alphabetical).
    pub components: Vec<Component>,
}

impl ModelFolder {
    /// Opens a pipeline folder (`model_index.json`), or a folder holding one model (`config.json`
    /// with `_class_name`, or transformers' `architectures`), one scheduler
    /// (`scheduler_config.json`) or one tokenizer (`tokenizer_config.json`); the lone component
    /// is then named ".". Every class must be supported and every component folder present.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !crate::vfs::is_dir(dir) {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                what: "model folder".into(),
            });
        }
        let index = dir.join("model_index.json");
        if crate::vfs::is_file(&index) {
            return Self::open_pipeline(dir, &index);
        }
        for file in ["config.json", "scheduler_config.json", "tokenizer_config.json"] {
            let path = dir.join(file);
            if crate::vfs::is_file(&path) {
                return Self::open_single(dir, &path);
            }
        }
        Err(Error::NotFound {
            path: index,
            what: "model_index.json (or config.json, scheduler_config.json, tokenizer_config.json \
                   for a single component)"
                .into(),
        })
    }

    fn open_pipeline(dir: &Path, index: &Path) -> Result<Self> {
        let json = read_json(index)?;
        let map = json
            .as_object()
            .ok_or_else(|| Error::config(index, "(root)", "expected a JSON object"))?;
        let class_name = string_field(index, &json, "_class_name")?;
        let diffusers_version = json
            .get("_diffusers_version")
            .and_then(|v| v.as_str())
            .map(String::from);
        let mut components = Vec::new();
        for (name, entry) in map {
            if name.starts_with('_') {
                continue;
            }
            // Non-list entries are pipeline settings (e.g. `requires_safety_checker`), not components.
            let Some(pair) = entry.as_array() else { continue };
            if pair.iter().all(|v| v.is_null()) {
                continue; // `[null, null]`: the component was saved as absent
            }
            let (library, class) = match pair.as_slice() {
                [serde_json::Value::String(l), serde_json::Value::String(c)] => (l.clone(), c.clone()),
                _ => {
                    return Err(Error::config(
                        index,
                        name,
                        format!("expected [\"library\", \"ClassName\"], found {entry}"),
                    ))
                }
            };
            if name.starts_with('.') || name.contains(['/', '\\', ':']) {
                return Err(Error::config(
                    index,
                    name,
                    "a component name must be a plain folder name",
                ));
            }
            let class = ComponentClass::from_name(&class).ok_or_else(|| Error::UnknownClass {
                path: index.to_path_buf(),
                component: name.clone(),
                class: class.clone(),
                supported: ComponentClass::supported(),
            })?;
            let comp_dir = dir.join(name);
            if !crate::vfs::is_dir(&comp_dir) {
                return Err(Error::NotFound {
                    path: comp_dir,
                    what: format!("folder of component `{name}` ({class}) listed in {}", index.display()),
                });
            }
            components.push(Component {
                name: name.clone(),
                library,
                class,
                dir: comp_dir,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            class_name,
            diffusers_version,
            components,
        })
    }

    fn open_single(dir: &Path, config: &Path) -> Result<Self> {
        let json = read_json(config)?;
        let class_name = json
            .get("_class_name")
            .or_else(|| json.get("architectures").and_then(|a| a.get(0)))
            .or_else(|| json.get("tokenizer_class"))
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Error::config(
                    config,
                    "_class_name",
                    "missing: cannot tell which model class this folder holds",
                )
            })?
            .to_string();
        let class = ComponentClass::from_name(&class_name).ok_or_else(|| Error::UnknownClass {
            path: config.to_path_buf(),
            component: ".".into(),
            class: class_name.clone(),
            supported: ComponentClass::supported(),
        })?;
        let diffusers_version = json
            .get("_diffusers_version")
            .and_then(|v| v.as_str())
            .map(String::from);
        let component = Component {
            name: ".".into(),
            library: class.library().into(),
            class,
            dir: dir.to_path_buf(),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            class_name,
            diffusers_version,
            components: vec![component],
        })
    }

    /// Whether this is a folder holding one component rather than a pipeline.
    pub fn is_single(&self) -> bool {
        self.components.len() == 1 && self.components[0].name == "."
    }

    /// The component named `name` (for a single-model folder, "." or any name finds the one).
    pub fn component(&self, name: &str) -> Result<&Component> {
        if self.is_single() {
            return Ok(&self.components[0]);
        }
        self.components
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::NotFound {
                path: self.dir.join(name),
                what: format!("component `{name}` (not listed in model_index.json)"),
            })
    }

    /// The first component of the given kind (e.g. the UNet, the scheduler), if any.
    pub fn find_kind(&self, kind: ComponentKind) -> Option<&Component> {
        self.components.iter().find(|c| c.class.kind() == kind)
    }
}

/// Summary of a component's weights, for `ldm info` and the other front ends.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightsSummary {
    /// The weight file, or the index file of a sharded checkpoint.
    pub location: String,
    /// "safetensors", "pytorch", or e.g. "safetensors, 6 shards".
    pub format: String,
    /// Whether the file is the `fp16` variant (`*.fp16.safetensors` and the like).
    pub fp16_variant: bool,
    /// Stored element types, sorted, e.g. ["F16"].
    pub dtypes: Vec<String>,
    pub tensors: usize,
    /// Total number of elements over all tensors.
    pub parameters: u64,
}

impl WeightsSummary {
    /// Summarises an opened weight source.
    pub fn of(src: &dyn TensorSource) -> Self {
        let names = src.names();
        let mut dtypes = Vec::new();
        let mut parameters = 0u64;
        for name in &names {
            if let Some(meta) = src.meta(name) {
                parameters += meta.shape.iter().map(|&d| d as u64).product::<u64>();
                if !dtypes.contains(&meta.dtype) {
                    dtypes.push(meta.dtype);
                }
            }
        }
        dtypes.sort();
        let location = src.location(None);
        let file = Path::new(&location).file_name().and_then(|f| f.to_str()).unwrap_or("");
        let fp16_variant = file.split('.').any(|part| part == "fp16" || part.starts_with("fp16-"));
        Self {
            location,
            format: src.format(),
            fp16_variant,
            dtypes,
            tensors: names.len(),
            parameters,
        }
    }
}

/// A count written short, as in "1.23 M": K, M and B steps of 1000.
pub fn format_count(n: u64) -> String {
    let n_f = n as f64;
    match n {
        0..=999 => n.to_string(),
        1_000..=999_999 => format!("{:.2} K", n_f / 1e3),
        1_000_000..=999_999_999 => format!("{:.2} M", n_f / 1e6),
        _ => format!("{:.2} B", n_f / 1e9),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = crate::vfs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).or_else(|source| {
        // Python's json writes non-finite floats as bare `Infinity`/`-Infinity`/`NaN` (diffusers
        // saves DPMSolverMultistepScheduler's `lambda_min_clipped` as `-Infinity`), which JSON
        // does not allow. Read them as strings; the schedulers accept "-inf"-like strings there.
        serde_json::from_str(&quote_python_non_finite(&text)).map_err(|_| Error::Json { path: path.to_path_buf(), source })
    })
}

/// Quotes the bare tokens `Infinity`, `-Infinity` and `NaN` outside JSON strings.
fn quote_python_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"].iter().find(|t| rest.starts_with(**t)) {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_non_finite_floats_are_quoted_outside_strings() {
        let text = r#"{"a": -Infinity, "b": "NaN in \"Infinity\"", "c": [NaN, Infinity]}"#;
        let v: serde_json::Value = serde_json::from_str(&super::quote_python_non_finite(text)).unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"], r#"NaN in "Infinity""#);
        assert_eq!(v["c"][0], "NaN");
        assert_eq!(v["c"][1], "Infinity");
    }
}

fn string_field(path: &Path, json: &serde_json::Value, field: &str) -> Result<String> {
    match json.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(Error::config(path, field, format!("expected a string, found {v}"))),
        None => Err(Error::config(path, field, "missing")),
    }
}
