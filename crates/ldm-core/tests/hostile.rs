//! Hostile and broken input through the core API (issue 6): every input gives an error of the
//! right kind whose message names the file, field or value at fault, nothing panics, nothing
//! from a pickle runs, and a loaded pipeline stays usable after refusing bad parameters.
//!
//! Broken files are built in temporary folders from the committed fixtures.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ldm_core::backend::cpu::Cpu;
use ldm_core::loading::{find_weights, ModelFolder, PthFile, SafetensorsFile, TensorSource};
use ldm_core::pipelines::{Images, Pipeline, SuperResParams, Txt2ImgParams};
use ldm_core::{Error, ErrorKind};
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of a fixture pipeline in a temporary folder.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy_dir(&fixture(name), &dir);
    (tmp, dir)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Loads a folder, expecting an error; checks it is of `kind` and its message holds every
/// needle. Returns the message.
fn load_err(dir: &Path, kind: ErrorKind, needles: &[&str]) -> String {
    let r = std::panic::catch_unwind(|| Pipeline::load_folder(dir, &Cpu));
    let err = match r {
        Ok(Ok(_)) => panic!("{} loaded", dir.display()),
        Ok(Err(e)) => e,
        Err(_) => panic!("loading {} panicked", dir.display()),
    };
    check_err(&err, kind, needles)
}

fn check_err(err: &Error, kind: ErrorKind, needles: &[&str]) -> String {
    let msg = err.to_string();
    assert_eq!(err.kind(), kind, "{msg} ({err:?})");
    for n in needles {
        assert!(msg.contains(n), "`{msg}` should mention `{n}`");
    }
    assert!(!msg.contains("panicked"), "{msg}");
    eprintln!("[{kind}] {msg}");
    msg
}

// ------------------------------------------------------------------------------------------------
// Hand-built weight files
// ------------------------------------------------------------------------------------------------

/// A safetensors file from a header object and data bytes, exactly as given.
fn raw_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Rewrites a safetensors file with its tensors changed by `edit` (name, dtype, shape, bytes).
fn rewrite_safetensors(path: &Path, edit: impl Fn(&mut Vec<(String, String, Vec<usize>, Vec<u8>)>)) {
    let src = SafetensorsFile::open(path).unwrap();
    let mut names = src.names();
    names.sort();
    let mut tensors: Vec<(String, String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let m = src.meta(n).unwrap();
            let bytes = src.load_f32(n).unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
            (n.clone(), "F32".to_string(), m.shape, bytes)
        })
        .collect();
    drop(src);
    edit(&mut tensors);
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in &tensors {
        header.insert(name.clone(), json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}));
        data.extend_from_slice(bytes);
    }
    std::fs::write(path, raw_safetensors(&Value::Object(header), &data)).unwrap();
}

/// Pickle opcodes, written by hand (protocol 2, as torch.save writes).
#[derive(Default)]
struct Pkl(Vec<u8>);

impl Pkl {
    fn op(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn proto(self) -> Self {
        self.op(&[0x80, 2])
    }
    fn global(self, module: &str, name: &str) -> Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn str(self, s: &str) -> Self {
        let mut b = vec![b'X'];
        b.extend_from_slice(&(s.len() as u32).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
        self.op(&b)
    }
    fn int(self, v: u32) -> Self {
        let mut b = vec![b'J'];
        b.extend_from_slice(&v.to_le_bytes());
        self.op(&b)
    }
    fn ints(mut self, vs: &[u32]) -> Self {
        self = self.op(b"(");
        for &v in vs {
            self = self.int(v);
        }
        self.op(b"t")
    }
    /// `name: _rebuild_tensor_v2(storage(key, numel, F32), offset, shape, stride)` as a dict item.
    fn tensor(self, name: &str, key: &str, numel: u32, offset: u32, shape: &[u32], stride: &[u32]) -> Self {
        self.str(name)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"(")
            .op(b"(")
            .str("storage")
            .global("torch", "FloatStorage")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(offset)
            .ints(shape)
            .ints(stride)
            .op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")R")
            .op(b"tR")
    }
}

/// A state dict pickle of the given tensors (`Pkl::tensor` items).
fn state_dict(items: impl FnOnce(Pkl) -> Pkl) -> Vec<u8> {
    items(Pkl::default().proto().global("collections", "OrderedDict").op(b")R(")).op(b"u.").0
}

/// A torch.save-style zip: `archive/data.pkl` and `archive/data/KEY` entries.
fn torch_zip(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn pth_err(bytes: Vec<u8>, needles: &[&str]) -> String {
    let path = Path::new("/models/evil/pytorch_model.bin");
    let err = match std::panic::catch_unwind(|| PthFile::from_bytes(path, bytes)) {
        Ok(Ok(_)) => panic!("the file was accepted"),
        Ok(Err(e)) => e,
        Err(_) => panic!("reading the file panicked"),
    };
    let mut all = vec!["pytorch_model.bin"];
    all.extend_from_slice(needles);
    check_err(&err, ErrorKind::BadModel, &all)
}

fn st_err(bytes: Vec<u8>, kind: ErrorKind, needles: &[&str]) -> String {
    let path = Path::new("/models/broken/model.safetensors");
    let err = match std::panic::catch_unwind(|| SafetensorsFile::from_bytes(path, bytes)) {
        Ok(Ok(_)) => panic!("the file was accepted"),
        Ok(Err(e)) => e,
        Err(_) => panic!("reading the file panicked"),
    };
    let mut all = vec!["model.safetensors"];
    all.extend_from_slice(needles);
    check_err(&err, kind, &all)
}

// ------------------------------------------------------------------------------------------------
// Model folders
// ------------------------------------------------------------------------------------------------

#[test]
fn missing_model_index() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    load_err(&dir, ErrorKind::NotFound, &["model_index.json"]);
}

#[test]
fn missing_component_folder() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    std::fs::remove_dir_all(dir.join("unet")).unwrap();
    load_err(&dir, ErrorKind::NotFound, &["unet", "UNet2DConditionModel"]);
}

#[test]
fn missing_weight_file() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    std::fs::remove_file(dir.join("vqvae/diffusion_pytorch_model.safetensors")).unwrap();
    load_err(&dir, ErrorKind::NotFound, &["vqvae", "diffusion_pytorch_model.safetensors"]);
}

#[test]
fn unknown_component_class() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    let mut index = read_json(&dir.join("model_index.json"));
    index["unet"] = json!(["diffusers", "UNet3DConditionModel"]);
    write_json(&dir.join("model_index.json"), &index);
    load_err(&dir, ErrorKind::Unsupported, &["UNet3DConditionModel", "unet"]);
}

#[test]
fn config_that_is_not_json() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    std::fs::write(dir.join("unet/config.json"), "{\"in_channels\": 4,").unwrap();
    load_err(&dir, ErrorKind::BadModel, &["unet/config.json", "JSON"]);
    std::fs::write(dir.join("unet/config.json"), [0xff, 0xfe, 0x00, 0x12]).unwrap();
    load_err(&dir, ErrorKind::BadModel, &["unet/config.json"]);
    std::fs::write(dir.join("model_index.json"), "").unwrap();
    load_err(&dir, ErrorKind::BadModel, &["model_index.json"]);
}

#[test]
fn config_with_wrong_types() {
    for (component, field, value) in [
        ("unet", "block_out_channels", json!("wide")),
        ("unet", "in_channels", json!(4.5)),
        ("unet", "layers_per_block", json!([1, "two", 3])),
        ("vqvae", "latent_channels", json!(null)),
        ("vqvae", "scaling_factor", json!("0.18")),
        ("bert", "d_model", json!({"value": 32})),
    ] {
        let (_t, dir) = copy_fixture("txt2img-tiny");
        let path = dir.join(component).join("config.json");
        let mut cfg = read_json(&path);
        cfg[field] = value.clone();
        write_json(&path, &cfg);
        let msg = load_err(&dir, ErrorKind::BadModel, &[&format!("{component}/config.json")]);
        assert!(msg.contains(field) || msg.contains("invalid type"), "{field}={value}: {msg}");
    }
}

#[test]
fn config_with_zero_negative_or_absurd_sizes() {
    let started = std::time::Instant::now();
    for (component, field, value) in [
        ("unet", "in_channels", json!(0)),
        ("unet", "in_channels", json!(-4)),
        ("unet", "block_out_channels", json!([1_000_000_000, 32, 32])),
        ("unet", "block_out_channels", json!([])),
        ("unet", "layers_per_block", json!(1_000_000)),
        ("unet", "norm_num_groups", json!(0)),
        ("unet", "cross_attention_dim", json!(1_000_000_000)),
        ("unet", "attention_head_dim", json!(0)),
        ("unet", "sample_size", json!(u64::MAX)),
        ("unet", "downsample_padding", json!(1_000_000_000)),
        ("vqvae", "block_out_channels", json!([16, 16, 32, 1_000_000_000])),
        ("vqvae", "layers_per_block", json!(1_000_000)),
        ("vqvae", "latent_channels", json!(0)),
        ("vqvae", "norm_num_groups", json!(0)),
        ("bert", "d_model", json!(1_000_000_000)),
        ("bert", "encoder_layers", json!(1_000_000)),
        ("bert", "vocab_size", json!(0)),
        ("bert", "max_position_embeddings", json!(0)),
        ("bert", "max_position_embeddings", json!(10)),
        ("bert", "head_dim", json!(-1)),
    ] {
        let (_t, dir) = copy_fixture("txt2img-tiny");
        let path = dir.join(component).join("config.json");
        let mut cfg = read_json(&path);
        cfg[field] = value.clone();
        write_json(&path, &cfg);
        let r = std::panic::catch_unwind(|| Pipeline::load_folder(&dir, &Cpu));
        let err = match r {
            Ok(Ok(_)) => panic!("{component}.{field} = {value} loaded"),
            Ok(Err(e)) => e,
            Err(_) => panic!("{component}.{field} = {value} panicked"),
        };
        let msg = err.to_string();
        assert_eq!(err.kind(), ErrorKind::BadModel, "{component}.{field} = {value}: {msg}");
        assert!(msg.contains(&format!("{component}/config.json")), "{component}.{field} = {value}: {msg}");
        assert!(msg.contains(field), "{component}.{field} = {value}: {msg}");
    }
    // Refused from the config alone: nothing of the absurd sizes was allocated.
    assert!(started.elapsed().as_secs() < 60, "took {:?}", started.elapsed());
}

#[test]
fn weights_whose_shapes_disagree_with_the_config() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    let path = dir.join("unet/config.json");
    let mut cfg = read_json(&path);
    cfg["in_channels"] = json!(3);
    write_json(&path, &cfg);
    let msg = load_err(&dir, ErrorKind::BadModel, &["conv_in.weight", "[16, 3, 3, 3]", "[16, 4, 3, 3]"]);
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
}

#[test]
fn a_missing_tensor_is_named() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    rewrite_safetensors(&dir.join("vqvae/diffusion_pytorch_model.safetensors"), |t| {
        t.retain(|(n, ..)| n != "decoder.conv_out.weight")
    });
    load_err(&dir, ErrorKind::BadModel, &["decoder.conv_out.weight", "missing", "vqvae"]);
}

#[test]
fn an_extra_tensor_is_named() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    rewrite_safetensors(&dir.join("unet/diffusion_pytorch_model.safetensors"), |t| {
        t.push(("mystery.weight".into(), "F32".into(), vec![2], f32_bytes(&[1.0, 2.0])))
    });
    load_err(&dir, ErrorKind::BadModel, &["mystery.weight", "not used"]);
}

#[test]
fn tensors_of_an_unsupported_dtype() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    rewrite_safetensors(&dir.join("unet/diffusion_pytorch_model.safetensors"), |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "conv_in.bias").unwrap();
        e.1 = "I32".into();
    });
    load_err(&dir, ErrorKind::Unsupported, &["conv_in.bias", "I32"]);
    // A dtype safetensors itself does not know.
    let bytes = raw_safetensors(&json!({"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}), &[0; 8]);
    st_err(bytes, ErrorKind::Unsupported, &["`w`", "Q4_K"]);
}

// ------------------------------------------------------------------------------------------------
// safetensors
// ------------------------------------------------------------------------------------------------

fn good_safetensors() -> Vec<u8> {
    raw_safetensors(
        &json!({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}),
        &f32_bytes(&[1.0, 2.0, 3.0]),
    )
}

#[test]
fn safetensors_control_file_is_read() {
    let f = SafetensorsFile::from_bytes(Path::new("x.safetensors"), good_safetensors()).unwrap();
    assert_eq!(f.load_f32("a").unwrap(), vec![1.0, 2.0]);
    assert_eq!(f.load_f32("b").unwrap(), vec![3.0]);
}

#[test]
fn safetensors_truncated() {
    let full = good_safetensors();
    for keep in [0, 3, 8, 20, full.len() - 1] {
        st_err(full[..keep].to_vec(), ErrorKind::BadModel, &["truncated"]);
    }
}

#[test]
fn safetensors_header_length_larger_than_the_file() {
    let mut b = good_safetensors();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    st_err(b.clone(), ErrorKind::BadModel, &["1099511627776", "truncated"]);
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    st_err(b, ErrorKind::BadModel, &["header length"]);
}

#[test]
fn safetensors_header_not_json() {
    let text = b"this is not json at all";
    let mut b = (text.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(text);
    st_err(b, ErrorKind::BadModel, &["not a JSON object"]);
    let bin = [0xffu8, 0xfe, 0x00, 0x01];
    let mut b = (bin.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&bin);
    st_err(b, ErrorKind::BadModel, &["UTF-8"]);
    st_err(raw_safetensors(&json!([1, 2, 3]), &[]), ErrorKind::BadModel, &["JSON object"]);
    st_err(raw_safetensors(&json!({"a": {"dtype": "F32", "shape": [1]}}), &[0; 4]), ErrorKind::BadModel, &["`a`", "data_offsets"]);
    st_err(raw_safetensors(&json!({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), &[0; 4]), ErrorKind::BadModel, &["`a`", "shape"]);
}

#[test]
fn safetensors_offsets_out_of_range() {
    let b = raw_safetensors(&json!({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}), &[0; 8]);
    st_err(b, ErrorKind::BadModel, &["`a`", "0..16", "8 data bytes"]);
    let b = raw_safetensors(&json!({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}), &[0; 8]);
    st_err(b, ErrorKind::BadModel, &["`a`", "8..4"]);
    let b = raw_safetensors(&json!({"a": {"dtype": "F32", "shape": [1], "data_offsets": [u64::MAX - 2, u64::MAX]}}), &[0; 8]);
    st_err(b, ErrorKind::BadModel, &["`a`"]);
}

#[test]
fn safetensors_overlapping_offsets() {
    let b = raw_safetensors(
        &json!({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
        &[0; 12],
    );
    st_err(b, ErrorKind::BadModel, &["`a`", "`b`", "overlap"]);
}

#[test]
fn safetensors_data_length_disagreeing_with_shape_and_dtype() {
    let b = raw_safetensors(&json!({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), &[0; 8]);
    st_err(b, ErrorKind::BadModel, &["`a`", "[3]", "12 bytes", "0..8"]);
    let b = raw_safetensors(&json!({"a": {"dtype": "F16", "shape": [1_000_000_000, 1_000_000_000, 1_000_000_000], "data_offsets": [0, 8]}}), &[0; 8]);
    st_err(b, ErrorKind::BadModel, &["`a`", "too large"]);
}

// ------------------------------------------------------------------------------------------------
// PyTorch .bin
// ------------------------------------------------------------------------------------------------

#[test]
fn pth_control_file_is_read_with_strides_and_offsets() {
    // w: 2x3 contiguous; t: the transpose of a 3x2 storage; o: 2 values at offset 4.
    let pickle = state_dict(|p| {
        p.tensor("w", "0", 6, 0, &[2, 3], &[3, 1]).tensor("t", "1", 6, 0, &[2, 3], &[1, 2]).tensor("o", "0", 6, 4, &[2], &[1])
    });
    let bytes = torch_zip(&pickle, &[("0", f32_bytes(&[0., 1., 2., 3., 4., 5.])), ("1", f32_bytes(&[0., 1., 2., 3., 4., 5.]))]);
    let f = PthFile::from_bytes(Path::new("ok.bin"), bytes).unwrap();
    assert_eq!(f.load_f32("w").unwrap(), vec![0., 1., 2., 3., 4., 5.]);
    assert_eq!(f.load_f32("t").unwrap(), vec![0., 2., 4., 1., 3., 5.]);
    assert_eq!(f.load_f32("o").unwrap(), vec![4., 5.]);
    assert_eq!(f.meta("t").unwrap().shape, vec![2, 3]);
}

#[test]
fn pth_truncated_zip() {
    let bytes = std::fs::read(fixture("variants/bin/diffusion_pytorch_model.bin")).unwrap();
    for keep in [0, 2, 100, bytes.len() / 2, bytes.len() - 30] {
        pth_err(bytes[..keep].to_vec(), &[]);
    }
    pth_err(b"PK\x03\x04 definitely not a zip".to_vec(), &["zip"]);
}

#[test]
fn pth_pickle_calling_os_system_is_refused_and_nothing_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    let command = format!("touch {}", marker.display());
    for module in ["posix", "os", "nt", "subprocess"] {
        let name = if module == "subprocess" { "call" } else { "system" };
        let pickle = Pkl::default().proto().global(module, name).str(&command).op(&[0x85]).op(b"R.").0;
        let msg = pth_err(torch_zip(&pickle, &[]), &[&format!("`{module}.{name}`"), "not tensor data", "refusing"]);
        assert!(msg.contains("pickle calls"), "{msg}");
    }
    // The same call inside an otherwise valid state dict, after a real tensor.
    let pickle = state_dict(|p| {
        p.tensor("w", "0", 1, 0, &[1], &[1]).str("x").global("posix", "system").str(&command).op(&[0x85]).op(b"R")
    });
    pth_err(torch_zip(&pickle, &[("0", f32_bytes(&[1.0]))]), &["`posix.system`"]);
    // Through the whole loader, from a file on disk.
    let dir = tmp.path().join("bert");
    copy_dir(&fixture("txt2img-tiny/bert"), &dir);
    let pickle = Pkl::default().proto().global("posix", "system").str(&command).op(&[0x85]).op(b"R.").0;
    std::fs::write(dir.join("pytorch_model.bin"), torch_zip(&pickle, &[])).unwrap();
    let err = find_weights(&dir, &["model", "pytorch_model"]).err().unwrap();
    check_err(&err, ErrorKind::BadModel, &["pytorch_model.bin", "posix.system"]);
    assert!(!marker.exists(), "the pickle's command ran");
}

#[test]
fn pth_pickle_calling_builtins_eval_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    let code = format!("open({:?}, 'w')", marker.display().to_string());
    let pickle = Pkl::default().proto().global("builtins", "eval").str(&code).op(&[0x85]).op(b"R.").0;
    pth_err(torch_zip(&pickle, &[]), &["`builtins.eval`"]);
    // STACK_GLOBAL (protocol 4) spelling, and the protocol 2 `__builtin__` module.
    let pickle = Pkl::default().op(&[0x80, 4]).str("builtins").str("eval").op(&[0x93]).str(&code).op(&[0x85]).op(b"R.").0;
    pth_err(torch_zip(&pickle, &[]), &["`builtins.eval`"]);
    let pickle = Pkl::default().proto().global("__builtin__", "exec").str(&code).op(&[0x85]).op(b"R.").0;
    pth_err(torch_zip(&pickle, &[]), &["`__builtin__.exec`"]);
    // Object-building opcodes that call classes without a global are refused too (INST).
    let pickle = Pkl::default().op(b"(").str(&code).op(b"ibuiltins\neval\n.").0;
    pth_err(torch_zip(&pickle, &[]), &["INST"]);
    assert!(!marker.exists());
}

#[test]
fn pth_storage_shorter_than_its_tensor() {
    // The pickle says a 4-element storage holds an 8-element tensor.
    let pickle = state_dict(|p| p.tensor("weight", "0", 4, 0, &[8], &[1]));
    pth_err(torch_zip(&pickle, &[("0", f32_bytes(&[0.0; 8]))]), &["shorter than its tensor", "[8]"]);
    // Offset past the end.
    let pickle = state_dict(|p| p.tensor("weight", "0", 4, 3, &[2], &[1]));
    pth_err(torch_zip(&pickle, &[("0", f32_bytes(&[0.0; 4]))]), &["shorter than its tensor", "offset 3"]);
    // Strides reaching past the end.
    let pickle = state_dict(|p| p.tensor("weight", "0", 6, 0, &[2, 3], &[3, 2]));
    pth_err(torch_zip(&pickle, &[("0", f32_bytes(&[0.0; 6]))]), &["shorter than its tensor"]);
    // The zip entry holds fewer bytes than the storage declares.
    let pickle = state_dict(|p| p.tensor("weight", "0", 8, 0, &[8], &[1]));
    pth_err(torch_zip(&pickle, &[("0", f32_bytes(&[0.0; 3]))]), &["`weight`", "12 bytes", "shorter"]);
    // The storage entry is missing.
    pth_err(torch_zip(&pickle, &[]), &["`weight`", "missing"]);
    // Sizes whose product overflows.
    let pickle = state_dict(|p| p.tensor("weight", "0", 8, 0, &[u32::MAX, u32::MAX, u32::MAX], &[1, 1, 1]));
    pth_err(torch_zip(&pickle, &[("0", f32_bytes(&[0.0; 8]))]), &[]);
}

#[test]
fn pth_legacy_and_damaged_pickles() {
    pth_err(vec![0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8], &["legacy"]);
    pth_err(torch_zip(b"\x80\x02}q\x00(X\x01", &[]), &["truncated"]);
    pth_err(torch_zip(b"", &[]), &["STOP"]);
    pth_err(torch_zip(b"\x80\x02h\x07.", &[]), &["memo"]);
    pth_err(torch_zip(b"\x80\x02\xff.", &[]), &["unknown pickle opcode"]);
    pth_err(torch_zip(b"\x80\x02K\x01.", &[]), &["not a state dict"]);
    // A deep stack of marks and a billion-laughs of memo references stay bounded.
    let mut deep = vec![0x80, 0x02];
    deep.extend(std::iter::repeat_n(b'(', 100_000));
    deep.push(b'.');
    pth_err(torch_zip(&deep, &[]), &[]);
    let mut laughs = b"\x80\x02]q\x00".to_vec();
    for _ in 0..200_000 {
        laughs.extend_from_slice(b"h\x00h\x00\x86");
        laughs.push(b'0');
    }
    laughs.push(b'.');
    pth_err(torch_zip(&laughs, &[]), &["not a state dict"]);
}

// ------------------------------------------------------------------------------------------------
// Parameters
// ------------------------------------------------------------------------------------------------

fn txt2img() -> &'static Pipeline<Cpu> {
    static P: OnceLock<Pipeline<Cpu>> = OnceLock::new();
    P.get_or_init(|| Pipeline::load_folder(&fixture("txt2img-tiny"), &Cpu).unwrap())
}

fn superres() -> &'static Pipeline<Cpu> {
    static P: OnceLock<Pipeline<Cpu>> = OnceLock::new();
    P.get_or_init(|| Pipeline::load_folder(&fixture("superres-tiny"), &Cpu).unwrap())
}

fn params() -> Txt2ImgParams {
    Txt2ImgParams { prompts: vec!["a red circle".into()], steps: 2, seed: 3, ..Default::default() }
}

fn t2i_err(p: Txt2ImgParams, kind: ErrorKind, needles: &[&str]) -> String {
    let err = match std::panic::catch_unwind(|| txt2img().txt2img(&p, None)) {
        Ok(Ok(_)) => panic!("{p:?} succeeded"),
        Ok(Err(e)) => e,
        Err(_) => panic!("panicked"),
    };
    check_err(&err, kind, needles)
}

fn reference_run() -> &'static Images {
    static R: OnceLock<Images> = OnceLock::new();
    R.get_or_init(|| txt2img().txt2img(&params(), None).unwrap())
}

/// After refusing a parameter, the same pipeline still gives the same image.
fn still_usable() {
    assert_eq!(&txt2img().txt2img(&params(), None).unwrap(), reference_run());
}

#[test]
fn size_not_a_multiple_of_8() {
    t2i_err(Txt2ImgParams { height: Some(60), ..params() }, ErrorKind::InvalidArgument, &["height 60", "multiple"]);
    t2i_err(Txt2ImgParams { width: Some(65), ..params() }, ErrorKind::InvalidArgument, &["width 65"]);
    still_usable();
}

#[test]
fn size_zero() {
    t2i_err(Txt2ImgParams { height: Some(0), ..params() }, ErrorKind::InvalidArgument, &["height 0"]);
    t2i_err(Txt2ImgParams { width: Some(0), ..params() }, ErrorKind::InvalidArgument, &["width 0"]);
}

#[test]
fn size_needing_more_memory_than_the_machine_has() {
    let started = std::time::Instant::now();
    // 64 images (the most one run takes): the CPU backend's blocked kernels and tiled decoding
    // fit a few images of this size in a large machine's memory.
    let many = vec!["a red circle".to_string(); 64];
    let msg = t2i_err(Txt2ImgParams { prompts: many, height: Some(8192), width: Some(8192), ..params() }, ErrorKind::OutOfMemory, &[
        "8192x8192",
        "would need about",
        "available",
    ]);
    assert!(msg.contains("TiB") || msg.contains("GiB"), "{msg}");
    t2i_err(Txt2ImgParams { height: Some(16384), ..params() }, ErrorKind::InvalidArgument, &["16384", "8192"]);
    assert!(started.elapsed().as_secs() < 5, "refused only after {:?}", started.elapsed());
    // The estimate grows with the size and the batch, and the default size fits.
    let Pipeline::TextToImage(p) = txt2img() else { unreachable!() };
    let small = p.estimate_memory(1, false, 64, 64);
    assert!(small < 1 << 30, "{small}");
    assert!(p.estimate_memory(2, true, 64, 64) > small);
    // 64 times the pixels: the maps grow with them (a fixed working allowance does not)
    assert!(p.estimate_memory(1, false, 512, 512) > 4 * small);
    still_usable();
}

#[test]
fn superres_input_needing_more_memory_than_the_machine_has() {
    let Pipeline::SuperResolution(p) = superres() else { unreachable!() };
    use ldm_core::pipelines::memory::set_thread_limit;
    // The estimate grows with the input's area (the tiny fixture model needs about 10 GB for the
    // largest input, which a large machine has); under a 4 GiB cap on this thread it is refused.
    let need = p.estimate_memory(4096, 4096);
    assert!(need > 4 * p.estimate_memory(1024, 1024) && need > 4 << 30, "{need}");
    set_thread_limit(Some(4 << 30));
    let params = SuperResParams { rgb: vec![128; 4096 * 4096 * 3], width: 4096, height: 4096, steps: 1, ..Default::default() };
    let err = superres().superres(&params, None).err().unwrap();
    set_thread_limit(None);
    check_err(&err, ErrorKind::OutOfMemory, &["4096x4096", "would need about", "4.0 GiB"]);
}

#[test]
fn steps_zero_or_beyond_the_schedulers_range() {
    t2i_err(Txt2ImgParams { steps: 0, ..params() }, ErrorKind::InvalidArgument, &["0 inference steps"]);
    for scheduler in [None, Some("pndm"), Some("lms"), Some("euler"), Some("euler-a"), Some("dpm++")] {
        let p = Txt2ImgParams { steps: 100_000, scheduler: scheduler.map(String::from), ..params() };
        t2i_err(p, ErrorKind::InvalidArgument, &["100000"]);
    }
    t2i_err(Txt2ImgParams { steps: usize::MAX, ..params() }, ErrorKind::InvalidArgument, &[&usize::MAX.to_string()]);
    still_usable();
}

#[test]
fn nan_or_infinite_guidance_and_eta() {
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        t2i_err(Txt2ImgParams { guidance: v, ..params() }, ErrorKind::InvalidArgument, &["guidance", "finite"]);
        t2i_err(Txt2ImgParams { eta: v, ..params() }, ErrorKind::InvalidArgument, &["eta"]);
        let sp = SuperResParams { rgb: vec![0; 32 * 32 * 3], width: 32, height: 32, steps: 1, eta: v, ..Default::default() };
        check_err(&superres().superres(&sp, None).err().unwrap(), ErrorKind::InvalidArgument, &["eta"]);
    }
    t2i_err(Txt2ImgParams { eta: -1.0, ..params() }, ErrorKind::InvalidArgument, &["eta", "-1"]);
    still_usable();
}

#[test]
fn unknown_scheduler() {
    t2i_err(Txt2ImgParams { scheduler: Some("heun".into()), ..params() }, ErrorKind::InvalidArgument, &["`heun`", "ddim"]);
    t2i_err(Txt2ImgParams { scheduler: Some(String::new()), ..params() }, ErrorKind::InvalidArgument, &["scheduler"]);
}

#[test]
fn latents_of_the_wrong_shape() {
    for n in [0, 1, 4 * 8 * 8 - 1, 4 * 8 * 8 + 1, 2 * 4 * 8 * 8] {
        t2i_err(Txt2ImgParams { latents: Some(vec![0.0; n]), ..params() }, ErrorKind::InvalidArgument, &[&format!("{n} values"), "[1, 4, 8, 8]"]);
    }
    let mut l = vec![0.0; 4 * 8 * 8];
    l[7] = f32::NAN;
    t2i_err(Txt2ImgParams { latents: Some(l), ..params() }, ErrorKind::InvalidArgument, &["latents", "index 7"]);
    still_usable();
}

#[test]
fn prompt_of_100000_characters() {
    let long = "a".repeat(100_000);
    t2i_err(Txt2ImgParams { prompts: vec!["ok".into(), long], ..params() }, ErrorKind::InvalidArgument, &["prompt 2", "100000 characters"]);
    // At the limit it is accepted (and truncated to 77 tokens, as diffusers does).
    let edge = "word ".repeat(2_000);
    assert_eq!(edge.len(), ldm_core::pipelines::MAX_PROMPT_CHARS);
    txt2img().txt2img(&Txt2ImgParams { prompts: vec![edge], steps: 1, ..params() }, None).unwrap();
}

#[test]
fn prompt_with_nul_bytes() {
    t2i_err(Txt2ImgParams { prompts: vec!["a red\0circle".into()], ..params() }, ErrorKind::InvalidArgument, &["prompt 1", "NUL", "position 5"]);
    t2i_err(Txt2ImgParams { prompts: vec![], ..params() }, ErrorKind::InvalidArgument, &["prompt"]);
    still_usable();
}

#[test]
fn a_txt2img_model_refuses_superres_and_back() {
    let sp = SuperResParams { rgb: vec![0; 32 * 32 * 3], width: 32, height: 32, steps: 1, ..Default::default() };
    check_err(&txt2img().superres(&sp, None).err().unwrap(), ErrorKind::InvalidArgument, &["text-to-image"]);
    check_err(&superres().txt2img(&params(), None).err().unwrap(), ErrorKind::InvalidArgument, &["super-resolution"]);
}

// ------------------------------------------------------------------------------------------------
// Images for super-resolution
// ------------------------------------------------------------------------------------------------

fn img_err(bytes: &[u8], needles: &[&str]) -> String {
    let err = match std::panic::catch_unwind(|| ldm_core::image::decode_image(bytes, "input.png")) {
        Ok(Ok(_)) => panic!("decoded"),
        Ok(Err(e)) => e,
        Err(_) => panic!("decoding panicked"),
    };
    let mut all = vec!["input.png"];
    all.extend_from_slice(needles);
    check_err(&err, ErrorKind::InvalidArgument, &all)
}

/// A PNG of `w x h` pixels that only has a header (IHDR) and an end (IEND).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(data);
        out.extend_from_slice(&c);
        out.extend_from_slice(&crc32(&c).to_be_bytes());
    }
    fn crc32(b: &[u8]) -> u32 {
        let mut c = !0u32;
        for &x in b {
            c ^= x as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    // An IDAT with an empty zlib stream: the decoder reads the header and stops at the pixels.
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn image_that_is_not_an_image() {
    img_err(b"just some text, not pixels", &["not a PNG, JPEG or WebP"]);
    img_err(&[], &["empty"]);
    img_err(b"GIF89a\x01\x00\x01\x00", &["not supported"]);
}

#[test]
fn image_truncated_png_and_jpeg() {
    let png = std::fs::read(fixture("images/rgba8.png")).unwrap();
    for keep in [10, 40, png.len() / 2, png.len() - 13] {
        img_err(&png[..keep], &["PNG"]);
    }
    let jpg = std::fs::read(fixture("images/rgb_q90.jpg")).unwrap();
    for keep in [4, 100, jpg.len() / 2, jpg.len() - 2] {
        img_err(&jpg[..keep], &["JPEG"]);
    }
}

#[test]
fn image_of_zero_size() {
    img_err(&png_header_only(0, 10), &["empty", "0x10"]);
    img_err(&png_header_only(10, 0), &["empty", "10x0"]);
}

#[test]
fn image_smaller_than_32_pixels() {
    let (rgb, w, h) = ldm_core::image::decode_image(&std::fs::read(fixture("images/src_37x50.png")).unwrap(), "x").unwrap();
    let small = ldm_core::image::resize_lanczos(&rgb, w, h, 31, 40);
    let sp = SuperResParams { rgb: small, width: 31, height: 40, steps: 1, ..Default::default() };
    check_err(&superres().superres(&sp, None).err().unwrap(), ErrorKind::InvalidArgument, &["31x40", "at least 32x32"]);
    let sp = SuperResParams { rgb: vec![0; 5], width: 32, height: 32, steps: 1, ..Default::default() };
    check_err(&superres().superres(&sp, None).err().unwrap(), ErrorKind::InvalidArgument, &["5 bytes"]);
}

#[test]
fn image_with_absurd_header_dimensions() {
    let started = std::time::Instant::now();
    img_err(&png_header_only(1_000_000, 1_000_000), &["1000000x1000000", "larger than supported"]);
    img_err(&png_header_only(u32::MAX >> 1, 1), &["larger than supported"]);
    assert!(started.elapsed().as_secs() < 2);
}

// ------------------------------------------------------------------------------------------------
// Numerical trouble
// ------------------------------------------------------------------------------------------------

#[test]
fn weights_holding_nan_or_inf() {
    for bad in [f32::NAN, f32::INFINITY] {
        let (_t, dir) = copy_fixture("txt2img-tiny");
        rewrite_safetensors(&dir.join("unet/diffusion_pytorch_model.safetensors"), |t| {
            let e = t.iter_mut().find(|(n, ..)| n == "conv_out.weight").unwrap();
            e.3[8..12].copy_from_slice(&bad.to_le_bytes());
        });
        load_err(&dir, ErrorKind::BadModel, &["conv_out.weight", "non-finite", "index 2"]);
    }
}

#[test]
fn a_model_whose_outputs_overflow_gives_an_error_not_a_black_image() {
    let (_t, dir) = copy_fixture("txt2img-tiny");
    rewrite_safetensors(&dir.join("unet/diffusion_pytorch_model.safetensors"), |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "conv_out.bias").unwrap();
        let n = e.3.len() / 4;
        e.3 = f32_bytes(&vec![3.0e38; n]);
        let e = t.iter_mut().find(|(n, ..)| n == "conv_out.weight").unwrap();
        let n = e.3.len() / 4;
        e.3 = f32_bytes(&vec![3.0e38; n]);
    });
    let p = Pipeline::load_folder(&dir, &Cpu).unwrap();
    let err = p.txt2img(&params(), None).err().unwrap();
    check_err(&err, ErrorKind::BadModel, &["UNet", "non-finite"]);
}

// ------------------------------------------------------------------------------------------------
// Error kinds
// ------------------------------------------------------------------------------------------------

#[test]
fn every_error_variant_has_a_kind() {
    let io = |k| Error::Io { path: "p".into(), source: std::io::Error::from(k) };
    assert_eq!(io(std::io::ErrorKind::PermissionDenied).kind(), ErrorKind::InvalidArgument);
    assert_eq!(io(std::io::ErrorKind::NotFound).kind(), ErrorKind::NotFound);
    assert_eq!(io(std::io::ErrorKind::Other).kind(), ErrorKind::Internal);
    assert_eq!(Error::Cancelled.kind(), ErrorKind::Cancelled);
    assert_eq!(Error::Backend("x".into()).kind(), ErrorKind::Internal);
    assert_eq!(Error::Config { path: "c.json".into(), field: "act_fn".into(), msg: "`gelu` is not supported (silu)".into() }.kind(), ErrorKind::Unsupported);
    assert_eq!(Error::Config { path: "c.json".into(), field: "in_channels".into(), msg: "0 is out of range".into() }.kind(), ErrorKind::BadModel);
    let oom = Error::OutOfMemory { what: "x".into(), needed: 3 << 30, available: 1 << 30, measured: true };
    assert_eq!(oom.kind(), ErrorKind::OutOfMemory);
    assert!(oom.to_string().contains("3.0 GiB") && oom.to_string().contains("1.0 GiB"), "{oom}");
    let names: Vec<&str> = [
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::BadModel,
        ErrorKind::Unsupported,
        ErrorKind::OutOfMemory,
        ErrorKind::Cancelled,
        ErrorKind::Internal,
    ]
    .iter()
    .map(|k| k.name())
    .collect();
    assert_eq!(names.len(), 7);
}

#[test]
fn single_model_folder_errors() {
    // `ModelFolder::open` on things that are not model folders.
    let tmp = tempfile::tempdir().unwrap();
    check_err(&ModelFolder::open(tmp.path().join("nope")).err().unwrap(), ErrorKind::NotFound, &["nope"]);
    let file = tmp.path().join("file.txt");
    std::fs::write(&file, "x").unwrap();
    check_err(&ModelFolder::open(&file).err().unwrap(), ErrorKind::NotFound, &["file.txt"]);
}

#[test]
fn tokenizer_json_that_makes_the_tokenizers_crate_panic() {
    // Found by fuzzing (crates/ldm-fuzz/regressions/tokenizer/tokenizer-json-control-char.bin):
    // `tokenizers` panics on a raw control character inside a string of the decoder section.
    let (_t, dir) = copy_fixture("txt2img-tiny");
    let tok = dir.join("tokenizer");
    let mut text = std::fs::read_to_string(fixture("tokenizer-json/tokenizer.json")).unwrap();
    let at = text.find("\"decoder\"").unwrap();
    let quote = at + text[at..].find(": {").unwrap() + 3;
    text.insert_str(quote, "\"ty\u{1}pe\": 1, ");
    std::fs::write(tok.join("tokenizer.json"), text).unwrap();
    load_err(&dir, ErrorKind::BadModel, &["tokenizer.json", "not valid JSON"]);
}

#[test]
fn pth_big_endian_checkpoint_is_unsupported() {
    let pickle = state_dict(|p| p.tensor("w", "0", 1, 0, &[1], &[1]));
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in [("archive/data.pkl", pickle), ("archive/byteorder", b"big".to_vec()), ("archive/data/0", vec![0x3f, 0x80, 0, 0])] {
        zip.start_file(name, opts).unwrap();
        zip.write_all(&bytes).unwrap();
    }
    let bytes = zip.finish().unwrap().into_inner();
    let err = PthFile::from_bytes(Path::new("be.bin"), bytes).err().unwrap();
    check_err(&err, ErrorKind::Unsupported, &["be.bin", "big-endian"]);
}

#[test]
fn tokenizer_json_whose_template_names_an_undefined_token() {
    // Found by fuzzing (crates/ldm-fuzz/regressions/tokenizer/template-undefined-special-token.bin):
    // `tokenizers` reads the file, then panics on the first encode.
    let (_t, dir) = copy_fixture("txt2img-tiny");
    let mut json = read_json(&fixture("tokenizer-json/tokenizer.json"));
    json["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLSM", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [7], "tokens": ["[CLS]"]}}
    });
    write_json(&dir.join("tokenizer/tokenizer.json"), &json);
    load_err(&dir, ErrorKind::BadModel, &["tokenizer.json", "`[CLSM`", "special_tokens"]);
}
