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

    /// Something this build or machine cannot do (e.g. a GPU where there is none).
    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("backend error: {0}")]
    Backend(String),

    #[error("cancelled")]
    Cancelled,

    /// An image or array file that cannot be read or written; `what` names it (a path, an argument).
    #[error("{what}: {msg}")]
    Image { what: String, msg: String },

    /// A run refused before it starts because its estimated peak memory exceeds what the
    /// machine has available.
    #[error(
        "{what} would need about {} of memory, but only {} is available{}; use a smaller size or batch",
        format_bytes(*needed), format_bytes(*available), if *measured { "" } else { " (assumed: the available memory could not be read)" }
    )]
    OutOfMemory { what: String, needed: u64, available: u64, measured: bool },

    /// A model produced NaN or infinite values (NaN/Inf weights, or an overflow); `what` names
    /// the model.
    #[error("{what} produced a non-finite value ({value}) at index {index}; the model's weights are likely damaged (NaN or Inf) or overflow")]
    NonFinite { what: String, value: f32, index: usize },
}

/// The class of an error, for front ends that map errors to exit statuses or status codes (the
/// `ldm` command's exit status, the C ABI's `LdmStatus`, the JavaScript error's `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A parameter, option or input file (image, latents, output path) is not acceptable.
    InvalidArgument,
    /// A model folder, file or hub id does not exist (or is not cached).
    NotFound,
    /// A model's files are damaged or inconsistent: configs, weights, tokenizer.
    BadModel,
    /// A model or file uses something this crate does not support (a class, a dtype, an option).
    Unsupported,
    /// The run would need more memory than is available; refused before allocating.
    OutOfMemory,
    /// The run was cancelled by the caller (progress callback, Ctrl-C).
    Cancelled,
    /// Anything else: a bug, or an I/O failure that is nobody's input.
    Internal,
}

impl ErrorKind {
    /// A short lower-case name ("invalid-argument", "not-found", ...), for messages and bindings.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::NotFound => "not-found",
            ErrorKind::BadModel => "bad-model",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::OutOfMemory => "out-of-memory",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A byte count for messages: "1.5 GiB", "300 MiB", "12 KiB", "100 bytes".
pub fn format_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            return format!("{:.1} {unit}", n as f64 / size as f64);
        }
    }
    format!("{n} bytes")
}

impl Error {
    /// The class of this error; see [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        use std::io::ErrorKind as Io;
        match self {
            Error::Io { source, .. } => match source.kind() {
                Io::NotFound => ErrorKind::NotFound,
                Io::PermissionDenied | Io::IsADirectory | Io::NotADirectory | Io::ReadOnlyFilesystem
                | Io::InvalidInput | Io::InvalidFilename => ErrorKind::InvalidArgument,
                Io::OutOfMemory => ErrorKind::OutOfMemory,
                Io::Interrupted => ErrorKind::Cancelled,
                Io::InvalidData | Io::UnexpectedEof => ErrorKind::BadModel,
                _ => ErrorKind::Internal,
            },
            Error::NotFound { .. } | Error::NotCached { .. } => ErrorKind::NotFound,
            Error::Hub(_) => ErrorKind::NotFound,
            // Config messages say "is not supported" exactly when a valid setting is one this
            // crate does not implement (see `models::config::check_unsupported`).
            Error::Config { msg, .. } if msg.contains("not supported") => ErrorKind::Unsupported,
            Error::Json { .. }
            | Error::Config { .. }
            | Error::MissingWeight { .. }
            | Error::ShapeMismatch { .. }
            | Error::BadWeights { .. }
            | Error::Tokenizer { .. }
            | Error::NonFinite { .. } => ErrorKind::BadModel,
            Error::UnknownClass { .. } | Error::UnsupportedDtype { .. } | Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::InvalidArgument(_) | Error::Image { .. } => ErrorKind::InvalidArgument,
            Error::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Backend(_) => ErrorKind::Internal,
        }
    }

    /// An I/O error on `path` (a missing file becomes [`Error::NotFound`]).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::NotFound { path, what: "no such file or directory".into() };
        }
        Error::Io { path, source }
    }

    /// A bad value in a config file: the file, the field and what is wrong.
    pub fn config(path: impl Into<PathBuf>, field: &str, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), field: field.into(), msg: msg.into() }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Backend(e.to_string())
    }
}
