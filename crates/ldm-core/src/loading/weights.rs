//! Host-side weight files: safetensors (memory-mapped) and PyTorch zip pickles, read as data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Shape and element type of one stored tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    /// The stored element type, e.g. "F32", "F16", "BF16".
    pub dtype: String,
}

/// A set of named tensors on the host, read lazily.
pub trait TensorSource: Send + Sync {
    fn names(&self) -> Vec<String>;
    fn meta(&self, name: &str) -> Option<TensorMeta>;
    /// The tensor as float32, whatever its stored type (f16/bf16/f64 are converted).
    fn load_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// The file holding `name` (or the whole set), for messages.
    fn location(&self, name: Option<&str>) -> String;
    /// The weight format, for `ldm info`.
    fn format(&self) -> String;
}

fn to_f32(bytes: &[u8], dtype: &str, file: &Path, name: &str) -> Result<Vec<f32>> {
    let unsupported = || Error::UnsupportedDtype {
        file: file.display().to_string(),
        name: name.to_string(),
        dtype: dtype.to_string(),
    };
    let size = match dtype {
        "F32" => 4,
        "F16" | "BF16" => 2,
        "F64" => 8,
        _ => return Err(unsupported()),
    };
    if bytes.len() % size != 0 {
        return Err(Error::BadWeights {
            path: file.to_path_buf(),
            msg: format!("tensor `{name}`: {} bytes is not a whole number of {dtype} values", bytes.len()),
        });
    }
    let chunks = bytes.chunks_exact(size);
    Ok(match dtype {
        "F32" => chunks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "F16" => chunks.map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "BF16" => chunks.map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => chunks
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    })
}

/// A `.safetensors` file, memory-mapped; tensors are converted straight from the mapping.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: HashMap<String, (TensorMeta, usize, usize)>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; a file changed underneath us while it is mapped is
        // the documented hazard of memory-mapped weights, shared by every safetensors reader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::BadWeights { path: path.to_path_buf(), msg };
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer
            | safetensors::SafeTensorError::InvalidHeaderLength
            | safetensors::SafeTensorError::HeaderTooSmall => bad(format!(
                "{e}: the header and the file size ({} bytes) disagree; the file is truncated or damaged \
                 (an interrupted download?)",
                mmap.len()
            )),
            e => bad(e.to_string()),
        })?;
        let data_start = 8 + n;
        let data_len = mmap.len() - data_start;
        let mut tensors = HashMap::new();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            if e > data_len || s > e {
                return Err(bad(format!("tensor `{name}`: data offsets {s}..{e} outside the {data_len} data bytes")));
            }
            let dtype = format!("{:?}", info.dtype);
            tensors.insert(name, (TensorMeta { shape: info.shape.clone(), dtype }, s, e));
        }
        Ok(Self { path: path.to_path_buf(), mmap, data_start, tensors })
    }
}

impl TensorSource for SafetensorsFile {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.tensors.get(name).map(|t| t.0.clone())
    }
    fn load_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (meta, s, e) = self.tensors.get(name).ok_or_else(|| Error::MissingWeight {
            file: self.path.display().to_string(),
            name: name.to_string(),
        })?;
        let bytes = &self.mmap[self.data_start + s..self.data_start + e];
        to_f32(bytes, &meta.dtype, &self.path, name)
    }
    fn location(&self, _name: Option<&str>) -> String {
        self.path.display().to_string()
    }
    fn format(&self) -> String {
        "safetensors".into()
    }
}

/// A PyTorch `.bin`/`.pt` file (a zip holding `data.pkl` and the storages). The pickle is
/// interpreted as data by candle's reader; nothing in it is executed.
pub struct PthFile {
    path: PathBuf,
    inner: candle_core::pickle::PthTensors,
    metas: HashMap<String, TensorMeta>,
}

impl PthFile {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound { path: path.to_path_buf(), what: "weight file".into() });
        }
        let inner = candle_core::pickle::PthTensors::new(path, None).map_err(|e| Error::BadWeights {
            path: path.to_path_buf(),
            msg: format!(
                "{e} (expected a PyTorch zip checkpoint as torch.save writes it; the file may be truncated \
                 or damaged, or in the pre-1.6 non-zip format, which is not supported)"
            ),
        })?;
        let metas = inner
            .tensor_infos()
            .iter()
            .map(|(k, ti)| {
                let dtype = match ti.dtype {
                    candle_core::DType::F32 => "F32".to_string(),
                    candle_core::DType::F16 => "F16".to_string(),
                    candle_core::DType::BF16 => "BF16".to_string(),
                    candle_core::DType::F64 => "F64".to_string(),
                    d => format!("{d:?}").to_uppercase(),
                };
                (k.clone(), TensorMeta { shape: ti.layout.dims().to_vec(), dtype })
            })
            .collect();
        Ok(Self { path: path.to_path_buf(), inner, metas })
    }
}

impl TensorSource for PthFile {
    fn names(&self) -> Vec<String> {
        self.metas.keys().cloned().collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.metas.get(name).cloned()
    }
    fn load_f32(&self, name: &str) -> Result<Vec<f32>> {
        let file = self.path.display().to_string();
        let meta = self.metas.get(name).ok_or_else(|| Error::MissingWeight { file: file.clone(), name: name.into() })?;
        if !matches!(meta.dtype.as_str(), "F32" | "F16" | "BF16" | "F64") {
            return Err(Error::UnsupportedDtype { file, name: name.into(), dtype: meta.dtype.clone() });
        }
        let bad = |msg: String| Error::BadWeights { path: self.path.clone(), msg: format!("tensor `{name}`: {msg}") };
        let t = self.inner.get(name).map_err(|e| bad(e.to_string()))?.ok_or_else(|| bad("not found".into()))?;
        let t = t.to_dtype(candle_core::DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>());
        t.map_err(|e| bad(e.to_string()))
    }
    fn location(&self, _name: Option<&str>) -> String {
        self.path.display().to_string()
    }
    fn format(&self) -> String {
        "pytorch".into()
    }
}

/// Several files seen as one (sharded checkpoints).
pub struct Sharded {
    index: PathBuf,
    files: Vec<Box<dyn TensorSource>>,
    owner: HashMap<String, usize>,
}

impl Sharded {
    /// Reads a `*.index.json` (`{"weight_map": {name: file}}`) and opens each shard once.
    pub fn open(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: index.to_path_buf(), source })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(index, "weight_map", "expected an object mapping tensor names to files"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut file_ids: HashMap<String, usize> = HashMap::new();
        let mut files: Vec<Box<dyn TensorSource>> = Vec::new();
        let mut owner = HashMap::new();
        let mut shard_names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shard_names.sort();
        shard_names.dedup();
        for shard in shard_names {
            if shard.contains('/') || shard.contains('\\') || shard.contains("..") {
                return Err(Error::config(index, "weight_map", format!("shard name `{shard}` must be a plain file name")));
            }
            file_ids.insert(shard.to_string(), files.len());
            files.push(open_weight_file(&dir.join(shard))?);
        }
        for (name, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| Error::config(index, &format!("weight_map.{name}"), "expected a file name"))?;
            let id = file_ids[shard];
            if files[id].meta(name).is_none() {
                return Err(Error::MissingWeight { file: files[id].location(None), name: name.clone() });
            }
            owner.insert(name.clone(), id);
        }
        Ok(Self { index: index.to_path_buf(), files, owner })
    }
}

impl TensorSource for Sharded {
    fn names(&self) -> Vec<String> {
        self.owner.keys().cloned().collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.owner.get(name).and_then(|&i| self.files[i].meta(name))
    }
    fn load_f32(&self, name: &str) -> Result<Vec<f32>> {
        match self.owner.get(name) {
            Some(&i) => self.files[i].load_f32(name),
            None => Err(Error::MissingWeight { file: self.index.display().to_string(), name: name.into() }),
        }
    }
    fn location(&self, name: Option<&str>) -> String {
        match name.and_then(|n| self.owner.get(n)) {
            Some(&i) => self.files[i].location(None),
            None => self.index.display().to_string(),
        }
    }
    fn format(&self) -> String {
        let inner = self.files.first().map(|f| f.format()).unwrap_or_default();
        format!("{inner}, {} shards", self.files.len())
    }
}

/// The names a sharded checkpoint's index may have. Current diffusers and transformers put the
/// variant before `.json` (`x.safetensors.index.fp16.json`); older diffusers wrote
/// `x.safetensors.fp16.index.json`, and some published repositories use `x.fp16.safetensors.index.json`.
pub fn index_names(stem: &str, variant: &str, ext: &str) -> Vec<String> {
    let mut names = vec![format!("{stem}.{ext}.index{variant}.json")];
    if !variant.is_empty() {
        names.push(format!("{stem}.{ext}{variant}.index.json"));
        names.push(format!("{stem}{variant}.{ext}.index.json"));
    }
    names
}

/// Opens one weight file by its extension.
pub fn open_weight_file(path: &Path) -> Result<Box<dyn TensorSource>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // `x.safetensors.index.json`, and `x.safetensors.index.fp16.json` for a variant.
    if name.ends_with(".json") && name.contains(".index.") {
        Ok(Box::new(Sharded::open(path)?))
    } else if name.ends_with(".safetensors") {
        Ok(Box::new(SafetensorsFile::open(path)?))
    } else {
        Ok(Box::new(PthFile::open(path)?))
    }
}

/// Finds the weights of a component folder: `{stem}.safetensors`, its sharded index, then the
/// PyTorch `.bin` forms, then the same with the `fp16` variant (upcast to float32 on load).
/// `stems` are the file stems the class uses ("diffusion_pytorch_model"; "model" and
/// "pytorch_model" for transformers classes).
pub fn find_weights(dir: &Path, stems: &[&str]) -> Result<Box<dyn TensorSource>> {
    for variant in ["", ".fp16"] {
        for ext in ["safetensors", "bin"] {
            for stem in stems {
                let single = dir.join(format!("{stem}{variant}.{ext}"));
                if single.is_file() {
                    return open_weight_file(&single);
                }
                for index in index_names(stem, variant, ext) {
                    let index = dir.join(index);
                    if index.is_file() {
                        return open_weight_file(&index);
                    }
                }
            }
        }
    }
    let tried: Vec<String> = stems.iter().map(|s| format!("{s}.safetensors, {s}.bin")).collect();
    Err(Error::NotFound {
        path: dir.to_path_buf(),
        what: format!("no weight file ({}, or their .index.json or .fp16 forms)", tried.join(", ")),
    })
}
