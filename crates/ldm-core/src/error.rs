//! The one error type of ldm-core. Every message names the file, field or value at fault and
//! what was expected, so that a front end can print it as it is.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path} is missing ({what})")]
    NotFound { path: PathBuf, what: String },

    #[error("{path}: not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{path}: field `{field}`: {msg}")]
    Config { path: PathBuf, field: String, msg: String },

    #[error("{path}: unknown class `{class}` for component `{component}` (supported: {supported})")]
    UnknownClass { path: PathBuf, component: String, class: String, supported: String },

    #[error("{file}: tensor `{name}` is missing")]
    MissingWeight { file: String, name: String },

    #[error("{file}: tensor `{name}` has shape {found:?}, but the config implies {expected:?}")]
    ShapeMismatch { file: String, name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{file}: tensor `{name}` has dtype {dtype}, which is not supported (expected F32, F16, BF16 or F64)")]
    UnsupportedDtype { file: String, name: String, dtype: String },

    #[error("{path}: not a valid weight file: {msg}")]
    BadWeights { path: PathBuf, msg: String },

    #[error("{0}")]
    Hub(String),

    /// A hub id that is neither in the local Hugging Face cache nor downloadable now.
    #[error(
        "model `{model}` is not in the Hugging Face cache ({cache}) and could not be downloaded ({reason}); \
         download it on a machine with internet access (`{command}`) and copy the folder `{folder}` \
         of that machine's cache into {cache}, or pass a local folder instead"
    )]
    NotCached { model: String, cache: PathBuf, reason: String, command: String, folder: String },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("backend error: {0}")]
    Backend(String),

    #[error("cancelled")]
    Cancelled,

    /// An image or array file that cannot be read or written; `what` names it (a path, an argument).
    #[error("{what}: {msg}")]
    Image { what: String, msg: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::NotFound { path, what: "no such file or directory".into() };
        }
        Error::Io { path, source }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, field: &str, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), field: field.into(), msg: msg.into() }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Backend(e.to_string())
    }
}
