//! Writing results: `.npy` or `.png`, always through a temporary file in the same folder that is
//! renamed into place, so an interrupted run never leaves a partial image.

use std::path::{Path, PathBuf};

use ldm_core::pipelines::Images;
use ldm_core::{Error, Result};

enum Format {
    Npy,
    Png,
}

fn format_of(path: &Path) -> Result<Format> {
    match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("npy") => Ok(Format::Npy),
        Some("png") => Ok(Format::Png),
        _ => Err(Error::InvalidArgument(format!(
            "output {}: the file name must end in .png or .npy",
            path.display()
        ))),
    }
}

/// Checks, before any work is done, that the output can be written: a known extension, not a
/// directory, and an existing, writable folder.
pub fn check_target(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::InvalidArgument(format!("output {} is a directory; name a .png or .npy file", path.display())));
    }
    format_of(path)?;
    let dir = parent(path);
    if !dir.is_dir() {
        return Err(Error::NotFound { path: dir.to_path_buf(), what: "the output's folder".into() });
    }
    let unwritable = |e: Error| match e {
        Error::Io { source, .. } => Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(source.kind(), format!("the output cannot be written ({source})")),
        },
        e => e,
    };
    let probe = tempfile_in(dir).map_err(unwritable)?;
    drop(probe);
    // The name itself must be creatable too (not too long, not a special file), so that a run
    // is not wasted on an output that cannot be written. An existing file stays untouched.
    if path.exists() {
        if !path.is_file() {
            return Err(Error::InvalidArgument(format!("output {} exists and is not a regular file", path.display())));
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| unwritable(Error::Io { path: path.to_path_buf(), source: e }))?;
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| unwritable(Error::Io { path: path.to_path_buf(), source: e }))?;
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A hidden temporary file beside the target, removed when dropped unless persisted.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn tempfile_in(dir: &Path) -> Result<TempFile> {
    for i in 0..1000u32 {
        let path = dir.join(format!(".ldm-{}-{i}.tmp", std::process::id()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => return Ok(TempFile { path, keep: false }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::Io { path: dir.to_path_buf(), source: e }),
        }
    }
    Err(Error::InvalidArgument(format!("cannot create a temporary file in {}", dir.display())))
}

/// Writes `bytes` to `path` atomically.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = tempfile_in(parent(path))?;
    std::fs::write(&tmp.path, bytes).map_err(|e| Error::Io { path: tmp.path.clone(), source: e })?;
    if crate::interrupt::requested() {
        return Err(Error::Cancelled); // `tmp` is removed as it drops
    }
    std::fs::rename(&tmp.path, path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    tmp.keep = true;
    Ok(())
}

/// The file names of a batch: `NAME.png` for one image, `NAME-0.png`, `NAME-1.png`, ... for more.
pub fn png_names(path: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![path.to_path_buf()];
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    (0..count).map(|i| path.with_file_name(format!("{stem}-{i}.png"))).collect()
}

/// Writes the images as the extension of `path` says; `meta(i)` gives image i's PNG text chunks.
pub fn write_images(path: &Path, images: &Images, meta: impl Fn(usize) -> Vec<(String, String)>) -> Result<()> {
    match format_of(path)? {
        Format::Npy => {
            let shape = [images.count, images.height, images.width, 3];
            write_atomic(path, &ldm_core::image::write_npy_f32(&shape, &images.pixels))
        }
        Format::Png => {
            // Encode every image first, so a failure leaves no file of the batch behind.
            let mut files = Vec::new();
            for (i, name) in png_names(path, images.count).into_iter().enumerate() {
                let png = ldm_core::image::encode_png(&images.rgb8(i), images.width as u32, images.height as u32, &meta(i))?;
                files.push((name, png));
            }
            for (name, png) in files {
                write_atomic(&name, &png)?;
            }
            Ok(())
        }
    }
}
