//! The files the loaders read: the real file system, with in-memory files "mounted" over it.
//!
//! In the browser there is no file system: the wasm front end fetches a model folder's files and
//! mounts them under a path of its choosing, and the loaders read them there through the same
//! code as on disk. A mounted file is a [`FileData`]: anything that can copy a byte range out,
//! so a weight file can stay outside wasm memory (in a JavaScript `Uint8Array`) and be read one
//! tensor at a time. Natively nothing is mounted and every call goes to `std::fs`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

/// The bytes of a mounted file.
pub trait FileData: Send + Sync {
    fn len(&self) -> u64;
    /// Copies `buf.len()` bytes starting at `offset` into `buf`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FileData for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the file")
}

type Mounts = RwLock<BTreeMap<PathBuf, Arc<dyn FileData>>>;

fn mounts() -> &'static Mounts {
    static MOUNTS: OnceLock<Mounts> = OnceLock::new();
    MOUNTS.get_or_init(Default::default)
}

/// Makes `data` readable at `path` (replacing what was mounted there).
pub fn mount(path: impl Into<PathBuf>, data: Arc<dyn FileData>) {
    if let Ok(mut m) = mounts().write() {
        m.insert(path.into(), data);
    }
}

/// Removes every mounted file under `dir`.
pub fn unmount_all(dir: &Path) {
    if let Ok(mut m) = mounts().write() {
        m.retain(|p, _| !p.starts_with(dir));
    }
}

/// The mounted file at `path`, if any.
pub fn mounted(path: &Path) -> Option<Arc<dyn FileData>> {
    mounts().read().ok()?.get(path).cloned()
}

/// Whether `path` is a mounted file or a file on disk.
pub fn is_file(path: &Path) -> bool {
    mounted(path).is_some() || path.is_file()
}

/// Whether `path` holds mounted files or is a directory on disk.
pub fn is_dir(path: &Path) -> bool {
    let any_mounted = mounts()
        .read()
        .ok()
        .is_some_and(|m| m.range(path.to_path_buf()..).next().is_some_and(|(p, _)| p != path && p.starts_with(path)));
    any_mounted || path.is_dir()
}

/// The whole file.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    match mounted(path) {
        Some(f) => {
            let len = usize::try_from(f.len()).map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "file too large"))?;
            let mut buf = vec![0; len];
            f.read_at(0, &mut buf)?;
            Ok(buf)
        }
        None => std::fs::read(path),
    }
}

/// The whole file, as UTF-8 text.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounted_files_are_seen_as_files_and_folders() {
        let root = Path::new("/ldm-vfs-test/model");
        mount(root.join("unet/config.json"), Arc::new(b"{}".to_vec()));
        assert!(is_file(&root.join("unet/config.json")));
        assert!(is_dir(&root.join("unet")));
        assert!(is_dir(root));
        assert!(!is_dir(&root.join("un")));
        assert!(!is_file(&root.join("unet")));
        assert_eq!(read_to_string(&root.join("unet/config.json")).unwrap(), "{}");
        let f = mounted(&root.join("unet/config.json")).unwrap();
        let mut b = [0u8; 2];
        assert!(f.read_at(1, &mut b).is_err(), "a read past the end fails");
        unmount_all(root);
        assert!(!is_file(&root.join("unet/config.json")));
        assert!(!is_dir(root));
    }
}
