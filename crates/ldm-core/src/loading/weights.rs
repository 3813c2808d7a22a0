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

pub(crate) fn to_f32(bytes: &[u8], dtype: &str, file: &Path, name: &str) -> Result<Vec<f32>> {
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

/// The bytes of a weight file: memory-mapped, held in memory, or a mounted file read a range at
/// a time (see [`crate::vfs`]).
enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
    Mounted(std::sync::Arc<dyn crate::vfs::FileData>),
}

impl Bytes {
    fn range(&self, start: usize, end: usize) -> std::io::Result<std::borrow::Cow<'_, [u8]>> {
        let whole: &[u8] = match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
            Bytes::Mounted(f) => {
                let mut buf = vec![0; end - start];
                f.read_at(start as u64, &mut buf)?;
                return Ok(buf.into());
            }
        };
        Ok(whole[start..end].into())
    }

    /// Drops the mapped pages of a range that has been read (converted into a tensor of its own),
    /// so that a loaded model holds its weights once, not once converted and again in the page
    /// mapping: the resident memory of a load is then the weights, not twice them.
    fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        if let Bytes::Map(m) = self {
            const PAGE: usize = 4096;
            let lo = start / PAGE * PAGE;
            let hi = end.div_ceil(PAGE).saturating_mul(PAGE).min(m.len());
            if hi > lo {
                // SAFETY: the mapping is shared and read-only, so MADV_DONTNEED only drops page
                // table entries: a later read faults the same file bytes back in. No borrow of
                // the mapping is alive here (the range was copied out by the caller).
                let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo) };
            }
        }
        #[cfg(not(unix))]
        let _ = (start, end);
    }
}

/// Bits per element of the safetensors dtypes (sub-byte float formats included).
fn safetensors_bits(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        _ => return None,
    })
}

/// Tensor name -> (meta, start, end) of its data, relative to the data section.
type TensorTable = HashMap<String, (TensorMeta, usize, usize)>;

/// The largest safetensors header accepted (the safetensors crate's own bound).
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Checks a safetensors file's layout and returns `(header length, tensors)`, with a message
/// naming the tensor and the numbers at fault for each way a file can be truncated or damaged:
/// a header longer than the file, a header that is not JSON, entries that are not
/// `{dtype, shape, data_offsets}`, offsets outside the data or overlapping, and data lengths
/// that disagree with shape and dtype. Dtypes safetensors knows but we do not convert are
/// accepted here and refused when the tensor is loaded.
fn check_safetensors(bytes: &[u8], path: &Path) -> Result<(usize, TensorTable)> {
    check_safetensors_head(bytes, bytes.len() as u64, path)
}

/// [`check_safetensors`] given the file's first bytes (at least the header) and its length.
fn check_safetensors_head(bytes: &[u8], len: u64, path: &Path) -> Result<(usize, TensorTable)> {
    let bad = |msg: String| Error::BadWeights { path: path.to_path_buf(), msg };
    if len < 8 {
        return Err(bad(format!(
            "the file is {len} bytes, too short for a safetensors header (an 8-byte length, then JSON); \
             it is truncated or not a safetensors file"
        )));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > len - 8 {
        return Err(bad(format!(
            "the header length field says {n} bytes, but the file has only {} bytes after it; \
             the file is truncated (an interrupted download?) or not a safetensors file",
            len - 8
        )));
    }
    if n > MAX_SAFETENSORS_HEADER {
        return Err(bad(format!("the header is {n} bytes, more than the {MAX_SAFETENSORS_HEADER} accepted")));
    }
    let n = n as usize;
    let Some(header) = bytes.get(8..8 + n) else {
        return Err(bad(format!("the header ({n} bytes) was not read whole")));
    };
    let header = std::str::from_utf8(header)
        .map_err(|e| bad(format!("the header is not UTF-8 text (byte {} of it); not a safetensors file", e.valid_up_to())))?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header)
        .map_err(|e| bad(format!("the header is not a JSON object ({e}); the file is damaged or not safetensors")))?;
    let data_len = (len - 8 - n as u64) as usize;
    let mut tensors = HashMap::new();
    let mut spans: Vec<(usize, usize, &str)> = Vec::new();
    for (name, entry) in &json {
        if name == "__metadata__" {
            continue;
        }
        let field = |key: &str| entry.get(key).ok_or_else(|| bad(format!("tensor `{name}`: the header entry has no `{key}`")));
        let dtype = field("dtype")?
            .as_str()
            .ok_or_else(|| bad(format!("tensor `{name}`: `dtype` is {}, expected a string", entry["dtype"])))?
            .to_string();
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad(format!("tensor `{name}`: `shape` is {}, expected a list of non-negative integers", entry["shape"])))?;
        let offsets = field("data_offsets")?;
        let (s, e) = match offsets.as_array().map(|a| a.as_slice()) {
            Some([s, e]) => match (s.as_u64(), e.as_u64()) {
                (Some(s), Some(e)) => (s, e),
                _ => return Err(bad(format!("tensor `{name}`: `data_offsets` {offsets} are not two non-negative integers"))),
            },
            _ => return Err(bad(format!("tensor `{name}`: `data_offsets` is {offsets}, expected [start, end]"))),
        };
        if s > e || e > data_len as u64 {
            return Err(bad(format!(
                "tensor `{name}`: data offsets {s}..{e} are outside the {data_len} data bytes (the file is truncated or damaged)"
            )));
        }
        let (s, e) = (s as usize, e as usize);
        let Some(bits) = safetensors_bits(&dtype) else {
            return Err(Error::UnsupportedDtype { file: path.display().to_string(), name: name.clone(), dtype });
        };
        let needed = shape
            .iter()
            .try_fold(bits, |acc, &d| acc.checked_mul(d))
            .map(|b| b.div_ceil(8))
            .ok_or_else(|| bad(format!("tensor `{name}`: shape {shape:?} is too large")))?;
        if needed != e - s {
            return Err(bad(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} needs {needed} bytes, but its data offsets {s}..{e} hold {}",
                e - s
            )));
        }
        spans.push((s, e, name));
        tensors.insert(name.clone(), (TensorMeta { shape, dtype }, s, e));
    }
    spans.sort();
    for w in spans.windows(2) {
        let ((s1, e1, a), (s2, e2, b)) = (w[0], w[1]);
        if e1 > s2 {
            return Err(bad(format!("tensors `{a}` (bytes {s1}..{e1}) and `{b}` (bytes {s2}..{e2}) overlap")));
        }
    }
    // The safetensors crate's own checks (contiguous data, nothing after the last tensor) as a
    // backstop; its messages are terser.
    if bytes.len() as u64 == len {
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("invalid safetensors layout: {e}")))?;
    }
    Ok((n, tensors))
}

/// A `.safetensors` file, memory-mapped; tensors are converted straight from the mapping.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Bytes,
    data_start: usize,
    tensors: TensorTable,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(f) = crate::vfs::mounted(path) {
            return Self::open_mounted(path, f);
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; a file changed underneath us while it is mapped is
        // the documented hazard of memory-mapped weights, shared by every safetensors reader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from(path, Bytes::Map(mmap))
    }

    /// Reads a safetensors file held in memory; `path` names it in messages.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from(path, Bytes::Owned(bytes))
    }

    /// A mounted file: only the header is read now, each tensor when it is loaded.
    fn open_mounted(path: &Path, f: std::sync::Arc<dyn crate::vfs::FileData>) -> Result<Self> {
        let len = f.len();
        let mut head = vec![0u8; len.min(8) as usize];
        f.read_at(0, &mut head).map_err(|e| Error::io(path, e))?;
        if head.len() == 8 {
            let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            if n <= len - 8 && n <= MAX_SAFETENSORS_HEADER {
                head.resize(8 + n as usize, 0);
                f.read_at(8, &mut head[8..]).map_err(|e| Error::io(path, e))?;
            }
        }
        let (n, tensors) = check_safetensors_head(&head, len, path)?;
        Ok(Self { path: path.to_path_buf(), bytes: Bytes::Mounted(f), data_start: 8 + n, tensors })
    }

    fn from(path: &Path, bytes: Bytes) -> Result<Self> {
        let whole: &[u8] = match &bytes {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
            Bytes::Mounted(f) => return Self::open_mounted(path, f.clone()),
        };
        let (n, tensors) = check_safetensors(whole, path)?;
        Ok(Self { path: path.to_path_buf(), bytes, data_start: 8 + n, tensors })
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
        let (start, end) = (self.data_start + s, self.data_start + e);
        let bytes = self.bytes.range(start, end).map_err(|e| Error::io(&self.path, e))?;
        let out = to_f32(&bytes, &meta.dtype, &self.path, name);
        drop(bytes);
        self.bytes.release(start, end);
        out
    }
    fn location(&self, _name: Option<&str>) -> String {
        self.path.display().to_string()
    }
    fn format(&self) -> String {
        "safetensors".into()
    }
}

pub use super::pickle::PthFile;

/// Several files seen as one (sharded checkpoints).
pub struct Sharded {
    index: PathBuf,
    files: Vec<Box<dyn TensorSource>>,
    owner: HashMap<String, usize>,
}

impl Sharded {
    /// Reads a `*.index.json` (`{"weight_map": {name: file}}`) and opens each shard once.
    pub fn open(index: &Path) -> Result<Self> {
        let text = crate::vfs::read_to_string(index).map_err(|e| Error::io(index, e))?;
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
                if crate::vfs::is_file(&single) {
                    return open_weight_file(&single);
                }
                for index in index_names(stem, variant, ext) {
                    let index = dir.join(index);
                    if crate::vfs::is_file(&index) {
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
