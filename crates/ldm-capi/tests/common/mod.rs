//! Building and running C and C++ programs against include/ldm.h and the libldm that cargo built
//! beside this test binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

pub fn root() -> PathBuf {
    PathBuf::from(ROOT).canonicalize().expect("the repository root exists")
}

#[cfg(target_os = "macos")]
pub const DYLIB: &str = "libldm.dylib";
#[cfg(not(target_os = "macos"))]
pub const DYLIB: &str = "libldm.so";

/// The folder holding the libldm built with this test (`target/<profile>`), or `$LDM_LIB_DIR`.
/// `cargo test` builds only the rlib of the library for its tests, so the cdylib and staticlib are
/// built here when missing, by `cargo build --workspace --all-targets`: the same packages and
/// targets as the test suite's `cargo test --workspace --all-targets`, so that cargo resolves the
/// same features and reuses every dependency it has already compiled (building `-p ldm-capi`
/// alone would resolve other features and compile them all again).
pub fn lib_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LDM_LIB_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let find = || exe.ancestors().skip(1).find(|d| d.join(DYLIB).is_file() && d.file_name().is_some_and(|n| n != "deps")).map(Path::to_path_buf);
    if let Some(d) = find() {
        return d;
    }
    let release = exe.ancestors().any(|d| d.file_name().is_some_and(|n| n == "release"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--workspace", "--all-targets"]).current_dir(root());
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "cargo build --workspace --all-targets failed");
    find().unwrap_or_else(|| panic!("{DYLIB} not found beside {} even after cargo build --workspace --all-targets", exe.display()))
}

/// A program to compile: C (cc, C11) or C++ (c++, C++17), with warnings as errors.
pub fn compile(sources: &[PathBuf], out: &Path, cpp: bool, extra: &[&str]) -> PathBuf {
    let lib = lib_dir();
    let compiler = if cpp { std::env::var("CXX").unwrap_or_else(|_| "c++".into()) } else { std::env::var("CC").unwrap_or_else(|_| "cc".into()) };
    let mut cmd = Command::new(&compiler);
    cmd.arg(if cpp { "-std=c++17" } else { "-std=c11" })
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-g", "-O1", "-pthread"])
        .arg("-I")
        .arg(root().join("include"))
        .arg("-I")
        .arg(root().join("bindings/cpp"))
        .args(sources)
        .args(extra)
        .arg("-L")
        .arg(&lib)
        .arg("-lldm")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(out);
    let o = cmd.output().unwrap_or_else(|e| panic!("{compiler} could not be run ({e}); install a C/C++ compiler (apt-get install -y build-essential)"));
    assert!(o.status.success(), "{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    out.to_path_buf()
}

pub fn c_source(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c").join(name)
}

/// Runs a program with the hub kept offline, returning its output.
pub fn run(exe: &Path, args: &[String]) -> Output {
    Command::new(exe)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap_or_else(|e| panic!("{} could not be run: {e}", exe.display()))
}

/// Asserts a run succeeded, showing what it printed otherwise; returns stdout.
pub fn ok(o: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    stdout
}

/// A float32 .npy file: its shape and values.
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY", "{}: not .npy", path.display());
    let (hlen, start) = if b[6] == 1 { (u16::from_le_bytes([b[8], b[9]]) as usize, 10) } else { (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12) };
    let header = std::str::from_utf8(&b[start..start + hlen]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let data: Vec<f32> = b[start + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{}", path.display());
    (shape, data)
}

pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub fn write_f32(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Copies a fixture model folder into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}
