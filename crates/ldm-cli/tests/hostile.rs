//! Hostile and broken input through the `ldm` command (issue 6): for every input, one
//! `error: ...` line naming the file, field or value at fault, the exit status of its class
//! (documented in `ldm --help`), no panic text, and no output file (nor temporary file) left.
//!
//! Exit statuses: 2 invalid argument, 3 not found, 4 bad model, 5 unsupported, 6 out of memory,
//! 7 cancelled/interrupted, 1 internal.
//!
//! Broken models are copies of the fixtures in temporary folders.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ldm_core::loading::{SafetensorsFile, TensorSource};
use serde_json::{json, Value};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

const INVALID: i32 = 2;
const NOT_FOUND: i32 = 3;
const BAD_MODEL: i32 = 4;
const UNSUPPORTED: i32 = 5;
const OUT_OF_MEMORY: i32 = 6;
const CANCELLED: i32 = 7;

fn fixture(rel: &str) -> PathBuf {
    Path::new(ROOT).join("tests/fixtures").join(rel)
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

/// A temporary folder with a copy of a fixture model (`model/`) and an empty `out/`.
struct Scratch {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    out: PathBuf,
}

impl Scratch {
    fn new(fixture_name: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        copy_dir(&fixture(fixture_name), &model);
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        Scratch { _tmp: tmp, model, out }
    }

    fn output(&self) -> String {
        self.out.join("image.png").display().to_string()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.model.join(rel)
    }

    fn edit_json(&self, rel: &str, edit: impl FnOnce(&mut Value)) {
        let path = self.path(rel);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }

    /// `ldm txt2img` on the copy with a small run and the given extra arguments.
    fn txt2img(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["txt2img", "--model", self.model.to_str().unwrap(), "--prompt", "a red circle", "--steps", "2", "--output"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(self.output());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn superres(&self, image: &Path, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec!["superres".into(), "--model".into(), self.model.display().to_string()];
        a.extend(["--image".into(), image.display().to_string(), "--steps".into(), "2".into(), "--output".into(), self.output()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Runs `ldm` expecting failure with `code`; checks the one-line message mentions every
    /// needle and that the output folder is still empty. Returns the message.
    fn fails(&self, args: &[String], code: i32, needles: &[&str]) -> String {
        let o = ldm(args);
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line expected: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "`{}` should mention `{n}`", stderr.trim_end());
        }
        let left: Vec<_> = std::fs::read_dir(&self.out).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
        eprintln!("[status {code}] {}", stderr.trim_end());
        stderr
    }
}

fn ldm(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .expect("the ldm binary runs")
}

fn raw_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Rewrites a safetensors file through `edit` on (name, dtype, shape, bytes) entries.
fn rewrite_safetensors(path: &Path, edit: impl Fn(&mut Vec<(String, String, Vec<usize>, Vec<u8>)>)) {
    let src = SafetensorsFile::open(path).unwrap();
    let mut names = src.names();
    names.sort();
    let mut tensors: Vec<(String, String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| (n.clone(), "F32".into(), src.meta(n).unwrap().shape, src.load_f32(n).unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()))
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

/// `GLOBAL module name`, one string argument, `TUPLE1 REDUCE STOP`: `module.name(arg)`.
fn call_pickle(module: &str, name: &str, arg: &str) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend_from_slice(format!("c{module}\n{name}\n").as_bytes());
    p.push(b'X');
    p.extend_from_slice(&(arg.len() as u32).to_le_bytes());
    p.extend_from_slice(arg.as_bytes());
    p.extend_from_slice(b"\x85R.");
    p
}

// ------------------------------------------------------------------------------------------------
// Exit statuses are documented
// ------------------------------------------------------------------------------------------------

#[test]
fn help_documents_the_exit_statuses() {
    let o = ldm(&["--help".to_string()]);
    let help = String::from_utf8_lossy(&o.stdout);
    for line in ["2  invalid argument", "3  not found", "4  bad model", "5  unsupported", "6  out of memory", "7  cancelled", "1  internal"] {
        assert!(help.contains(line), "--help lacks `{line}`:\n{help}");
    }
    // Usage errors (clap's) use status 2 as well.
    assert_eq!(ldm(&["txt2img".to_string(), "--bogus".to_string()]).status.code(), Some(INVALID));
}

// ------------------------------------------------------------------------------------------------
// Model folders
// ------------------------------------------------------------------------------------------------

#[test]
fn missing_model_index() {
    let s = Scratch::new("txt2img-tiny");
    std::fs::remove_file(s.path("model_index.json")).unwrap();
    s.fails(&s.txt2img(&[]), NOT_FOUND, &["model_index.json"]);
}

#[test]
fn missing_component_folder() {
    let s = Scratch::new("txt2img-tiny");
    std::fs::remove_dir_all(s.path("bert")).unwrap();
    s.fails(&s.txt2img(&[]), NOT_FOUND, &["bert", "LDMBertModel"]);
}

#[test]
fn missing_weight_file() {
    let s = Scratch::new("txt2img-tiny");
    std::fs::remove_file(s.path("unet/diffusion_pytorch_model.safetensors")).unwrap();
    s.fails(&s.txt2img(&[]), NOT_FOUND, &["unet", "no weight file"]);
}

#[test]
fn unknown_component_class() {
    let s = Scratch::new("txt2img-tiny");
    s.edit_json("model_index.json", |v| v["vqvae"] = json!(["diffusers", "ConsistencyDecoderVAE"]));
    s.fails(&s.txt2img(&[]), UNSUPPORTED, &["ConsistencyDecoderVAE", "vqvae"]);
}

#[test]
fn config_that_is_not_json() {
    let s = Scratch::new("txt2img-tiny");
    std::fs::write(s.path("vqvae/config.json"), "{\"latent_channels\": 4,,}").unwrap();
    s.fails(&s.txt2img(&[]), BAD_MODEL, &["vqvae/config.json", "not valid JSON"]);
}

#[test]
fn config_with_wrong_types() {
    let s = Scratch::new("txt2img-tiny");
    s.edit_json("unet/config.json", |v| v["layers_per_block"] = json!("two"));
    s.fails(&s.txt2img(&[]), BAD_MODEL, &["unet/config.json", "layers_per_block", "\"two\""]);
}

#[test]
fn config_with_zero_negative_or_absurd_sizes() {
    for (file, field, value) in [
        ("unet/config.json", "in_channels", json!(0)),
        ("unet/config.json", "block_out_channels", json!([1_000_000_000, 32, 32])),
        ("unet/config.json", "layers_per_block", json!(1_000_000)),
        ("vqvae/config.json", "latent_channels", json!(-3)),
        ("bert/config.json", "encoder_layers", json!(1_000_000)),
        ("bert/config.json", "d_model", json!(1_000_000_000)),
    ] {
        let s = Scratch::new("txt2img-tiny");
        s.edit_json(file, |v| v[field] = value.clone());
        let started = Instant::now();
        s.fails(&s.txt2img(&[]), BAD_MODEL, &[file, field]);
        assert!(started.elapsed() < Duration::from_secs(20), "{field}: {:?}", started.elapsed());
    }
}

#[test]
fn weights_whose_shapes_disagree_with_the_config() {
    let s = Scratch::new("txt2img-tiny");
    s.edit_json("unet/config.json", |v| v["cross_attention_dim"] = json!(16));
    s.edit_json("bert/config.json", |v| {
        v["d_model"] = json!(16);
    });
    s.fails(&s.txt2img(&[]), BAD_MODEL, &["has shape", "but the config implies"]);
}

#[test]
fn a_missing_tensor_is_named() {
    let s = Scratch::new("txt2img-tiny");
    rewrite_safetensors(&s.path("unet/diffusion_pytorch_model.safetensors"), |t| t.retain(|(n, ..)| n != "time_embedding.linear_1.bias"));
    s.fails(&s.txt2img(&[]), BAD_MODEL, &["time_embedding.linear_1.bias", "missing"]);
}

#[test]
fn an_extra_tensor_is_named() {
    let s = Scratch::new("txt2img-tiny");
    rewrite_safetensors(&s.path("vqvae/diffusion_pytorch_model.safetensors"), |t| {
        t.push(("decoder.surprise".into(), "F32".into(), vec![1], 1f32.to_le_bytes().to_vec()))
    });
    s.fails(&s.txt2img(&[]), BAD_MODEL, &["decoder.surprise", "not used"]);
}

#[test]
fn tensors_of_an_unsupported_dtype() {
    let s = Scratch::new("txt2img-tiny");
    rewrite_safetensors(&s.path("unet/diffusion_pytorch_model.safetensors"), |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "conv_in.weight").unwrap();
        e.1 = "I32".into();
    });
    s.fails(&s.txt2img(&[]), UNSUPPORTED, &["conv_in.weight", "I32"]);
}

// ------------------------------------------------------------------------------------------------
// safetensors
// ------------------------------------------------------------------------------------------------

fn broken_unet_weights(bytes: Vec<u8>, needles: &[&str]) {
    let s = Scratch::new("txt2img-tiny");
    let path = s.path("unet/diffusion_pytorch_model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let mut all = vec!["unet/diffusion_pytorch_model.safetensors"];
    all.extend_from_slice(needles);
    s.fails(&s.txt2img(&[]), BAD_MODEL, &all);
}

fn unet_bytes() -> Vec<u8> {
    std::fs::read(fixture("txt2img-tiny/unet/diffusion_pytorch_model.safetensors")).unwrap()
}

#[test]
fn safetensors_truncated() {
    let b = unet_bytes();
    broken_unet_weights(b[..b.len() - 4096].to_vec(), &["truncated"]);
    broken_unet_weights(b[..5].to_vec(), &["truncated"]);
}

#[test]
fn safetensors_header_length_larger_than_the_file() {
    let mut b = unet_bytes();
    b[..8].copy_from_slice(&(1u64 << 33).to_le_bytes());
    broken_unet_weights(b, &["8589934592", "truncated"]);
}

#[test]
fn safetensors_header_not_json() {
    let mut b = unet_bytes();
    b[8] = b'#';
    broken_unet_weights(b, &["not a JSON object"]);
}

#[test]
fn safetensors_offsets_out_of_range() {
    broken_unet_weights(raw_safetensors(&json!({"conv_in.bias": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}), &[0; 32]), &[
        "conv_in.bias",
        "0..64",
    ]);
}

#[test]
fn safetensors_overlapping_offsets() {
    broken_unet_weights(
        raw_safetensors(
            &json!({"conv_in.bias": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
                    "conv_out.bias": {"dtype": "F32", "shape": [4], "data_offsets": [48, 64]}}),
            &[0; 64],
        ),
        &["conv_in.bias", "conv_out.bias", "overlap"],
    );
}

#[test]
fn safetensors_data_length_disagreeing_with_shape_and_dtype() {
    broken_unet_weights(raw_safetensors(&json!({"conv_in.bias": {"dtype": "F16", "shape": [16], "data_offsets": [0, 64]}}), &[0; 64]), &[
        "conv_in.bias",
        "32 bytes",
        "0..64",
    ]);
}

// ------------------------------------------------------------------------------------------------
// PyTorch .bin
// ------------------------------------------------------------------------------------------------

fn broken_bert_weights(bytes: Vec<u8>, needles: &[&str]) -> Scratch {
    let s = Scratch::new("txt2img-tiny");
    std::fs::write(s.path("bert/pytorch_model.bin"), bytes).unwrap();
    let mut all = vec!["bert/pytorch_model.bin"];
    all.extend_from_slice(needles);
    s.fails(&s.txt2img(&[]), BAD_MODEL, &all);
    s
}

#[test]
fn pth_truncated_zip() {
    let b = std::fs::read(fixture("txt2img-tiny/bert/pytorch_model.bin")).unwrap();
    broken_bert_weights(b[..b.len() / 2].to_vec(), &["zip"]);
    broken_bert_weights(Vec::new(), &["empty"]);
}

#[test]
fn pth_pickle_calling_os_system_is_refused_and_nothing_runs() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("pwned");
    let pickle = call_pickle("posix", "system", &format!("touch {}", marker.display()));
    broken_bert_weights(torch_zip(&pickle, &[]), &["`posix.system`", "not tensor data", "refusing"]);
    assert!(!marker.exists(), "the pickle's command ran");
}

#[test]
fn pth_pickle_calling_builtins_eval_is_refused() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("pwned");
    let pickle = call_pickle("builtins", "eval", &format!("open({:?}, 'w')", marker.display().to_string()));
    broken_bert_weights(torch_zip(&pickle, &[]), &["`builtins.eval`"]);
    assert!(!marker.exists());
}

#[test]
fn pth_storage_shorter_than_its_tensor() {
    // The fixture's own pickle with its first storage cut short.
    let src = std::fs::read(fixture("txt2img-tiny/bert/pytorch_model.bin")).unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(src)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let name = f.name().to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
        if name.ends_with("/data/0") {
            bytes.truncate(bytes.len() / 2);
        }
        out.start_file(name, opts).unwrap();
        out.write_all(&bytes).unwrap();
    }
    let bytes = out.finish().unwrap().into_inner();
    broken_bert_weights(bytes, &["model.embed_tokens.weight", "shorter"]);
}

// ------------------------------------------------------------------------------------------------
// Parameters
// ------------------------------------------------------------------------------------------------

#[test]
fn size_not_a_multiple_of_8() {
    let s = Scratch::new("txt2img-tiny");
    s.fails(&s.txt2img(&["--height", "100"]), INVALID, &["height 100", "multiple"]);
}

#[test]
fn size_zero() {
    let s = Scratch::new("txt2img-tiny");
    s.fails(&s.txt2img(&["--width", "0"]), INVALID, &["width 0"]);
    s.fails(&s.txt2img(&["--width", "-8"]), INVALID, &["-8"]);
}

#[test]
fn size_needing_more_memory_than_the_machine_has() {
    let s = Scratch::new("txt2img-tiny");
    let started = Instant::now();
    // 64 images (the most one run takes): the CPU backend's blocked kernels and tiled decoding
    // fit a few images of this size in a large machine's memory.
    let mut args: Vec<&str> = ["--prompt", "b"].repeat(63);
    args.extend(["--height", "8192", "--width", "8192"]);
    s.fails(&s.txt2img(&args), OUT_OF_MEMORY, &["8192x8192", "would need about", "available"]);
    assert!(started.elapsed() < Duration::from_secs(10), "refused after {:?}", started.elapsed());
}

/// The arguments with `flag`'s value replaced.
fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let n = args.iter().position(|a| a == flag).unwrap();
    args[n + 1] = value.into();
    args
}

#[test]
fn steps_zero_or_beyond_the_schedulers_range() {
    let s = Scratch::new("txt2img-tiny");
    s.fails(&with(s.txt2img(&[]), "--steps", "0"), INVALID, &["0 inference steps"]);
    s.fails(&with(s.txt2img(&[]), "--steps", "5000"), INVALID, &["5000"]);
    s.fails(&with(s.txt2img(&["--scheduler", "dpm++"]), "--steps", "5000"), INVALID, &["5000"]);
    s.fails(&with(s.txt2img(&[]), "--steps", "99999999999999999999999"), INVALID, &["99999999999999999999999"]);
}

#[test]
fn nan_or_infinite_guidance_and_eta() {
    let s = Scratch::new("txt2img-tiny");
    s.fails(&s.txt2img(&["--guidance", "NaN"]), INVALID, &["guidance", "NaN"]);
    s.fails(&s.txt2img(&["--guidance", "inf"]), INVALID, &["guidance", "inf"]);
    s.fails(&s.txt2img(&["--eta=-inf"]), INVALID, &["eta", "-inf"]);
    s.fails(&s.txt2img(&["--eta", "nan"]), INVALID, &["eta"]);
}

#[test]
fn unknown_scheduler() {
    let s = Scratch::new("txt2img-tiny");
    s.fails(&s.txt2img(&["--scheduler", "k_dpm_2"]), INVALID, &["`k_dpm_2`", "ddim, pndm, lms"]);
}

#[test]
fn latents_of_the_wrong_shape() {
    let s = Scratch::new("txt2img-tiny");
    let latents = s.out.parent().unwrap().join("latents.npy");
    std::fs::write(&latents, ldm_core::image::write_npy_f32(&[1, 4, 4, 4], &[0.0; 64])).unwrap();
    s.fails(&s.txt2img(&["--latents", latents.to_str().unwrap()]), INVALID, &["latents hold 64 values", "[1, 4, 8, 8]"]);
    std::fs::write(&latents, b"\x93NUMPY garbage").unwrap();
    s.fails(&s.txt2img(&["--latents", latents.to_str().unwrap()]), INVALID, &["latents.npy"]);
    s.fails(&s.txt2img(&["--latents", "/no/such/latents.npy"]), NOT_FOUND, &["/no/such/latents.npy"]);
}

#[test]
fn prompt_of_100000_characters() {
    let s = Scratch::new("txt2img-tiny");
    let mut args = s.txt2img(&[]);
    let long = "x".repeat(100_000);
    args.extend(["--prompt".to_string(), long]);
    s.fails(&args, INVALID, &["prompt 2", "100000 characters"]);
}

#[test]
fn prompt_with_nul_bytes_cannot_reach_the_command() {
    // A NUL cannot be part of a command-line argument (the OS refuses to start the process);
    // the core refuses it for the other front ends (crates/ldm-core/tests/hostile.rs). What the
    // command can get is other control characters, which BERT's cleaning drops.
    let r = Command::new(env!("CARGO_BIN_EXE_ldm")).args(["txt2img", "--prompt", "a\0b"]).output();
    assert!(r.is_err(), "an argument with a NUL was passed");
    let s = Scratch::new("txt2img-tiny");
    let mut args = s.txt2img(&[]);
    args[4] = "a red\u{1}\u{7f} circle".into();
    let o = ldm(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

// ------------------------------------------------------------------------------------------------
// Images for super-resolution
// ------------------------------------------------------------------------------------------------

fn image_case(bytes: &[u8], code: i32, needles: &[&str]) {
    let s = Scratch::new("superres-tiny");
    let image = s.out.parent().unwrap().join("input.png");
    std::fs::write(&image, bytes).unwrap();
    let mut all = vec!["input.png"];
    all.extend_from_slice(needles);
    s.fails(&s.superres(&image, &[]), code, &all);
}

/// A PNG of `w x h` pixels with a header and an empty pixel stream.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
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
    for (kind, data) in [
        (&b"IHDR"[..], [w.to_be_bytes(), h.to_be_bytes()].concat().into_iter().chain([8, 2, 0, 0, 0]).collect::<Vec<u8>>()),
        (b"IDAT", vec![0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]),
        (b"IEND", vec![]),
    ] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let c: Vec<u8> = kind.iter().chain(&data).copied().collect();
        out.extend_from_slice(&c);
        out.extend_from_slice(&crc32(&c).to_be_bytes());
    }
    out
}

#[test]
fn image_that_is_not_an_image() {
    image_case(b"%PDF-1.7 not an image", INVALID, &["not a PNG, JPEG or WebP"]);
}

#[test]
fn image_truncated_png() {
    let png = std::fs::read(fixture("images/rgba8.png")).unwrap();
    image_case(&png[..png.len() / 2], INVALID, &["PNG"]);
}

#[test]
fn image_truncated_jpeg() {
    let jpg = std::fs::read(fixture("images/rgb_q90.jpg")).unwrap();
    image_case(&jpg[..jpg.len() / 2], INVALID, &["JPEG"]);
}

#[test]
fn image_of_zero_size() {
    image_case(&png_header_only(0, 64), INVALID, &["empty", "0x64"]);
    image_case(&[], INVALID, &["empty"]);
}

#[test]
fn image_smaller_than_32_pixels() {
    let png = ldm_core::image::encode_png(&[200; 31 * 64 * 3], 31, 64, &[]).unwrap();
    let s = Scratch::new("superres-tiny");
    let image = s.out.parent().unwrap().join("small.png");
    std::fs::write(&image, png).unwrap();
    s.fails(&s.superres(&image, &[]), INVALID, &["31x64", "at least 32x32"]);
}

#[test]
fn image_with_absurd_header_dimensions() {
    image_case(&png_header_only(2_000_000, 2_000_000), INVALID, &["2000000x2000000", "larger than supported"]);
}

// ------------------------------------------------------------------------------------------------
// Numerical trouble
// ------------------------------------------------------------------------------------------------

#[test]
fn weights_holding_nan() {
    let s = Scratch::new("txt2img-tiny");
    rewrite_safetensors(&s.path("vqvae/diffusion_pytorch_model.safetensors"), |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "decoder.conv_in.bias").unwrap();
        e.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    s.fails(&s.txt2img(&[]), BAD_MODEL, &["decoder.conv_in.bias", "non-finite"]);
}

#[test]
fn a_model_whose_outputs_overflow() {
    let s = Scratch::new("txt2img-tiny");
    rewrite_safetensors(&s.path("unet/diffusion_pytorch_model.safetensors"), |t| {
        for (name, _, _, bytes) in t.iter_mut() {
            if name == "conv_out.weight" || name == "conv_out.bias" {
                let n = bytes.len() / 4;
                *bytes = (0..n).flat_map(|_| 3.0e38f32.to_le_bytes()).collect();
            }
        }
    });
    s.fails(&s.txt2img(&[]), BAD_MODEL, &["UNet", "non-finite"]);
}

// ------------------------------------------------------------------------------------------------
// Output
// ------------------------------------------------------------------------------------------------

#[test]
fn unwritable_output_path() {
    let s = Scratch::new("txt2img-tiny");
    let mut args = s.txt2img(&[]);
    let n = args.iter().position(|a| a == "--output").unwrap();
    if Path::new("/sys").is_dir() {
        // Not writable even by root.
        args[n + 1] = "/sys/ldm-out.png".into();
        s.fails(&args, INVALID, &["/sys/ldm-out.png", "cannot be written"]);
    }
    args[n + 1] = "/no/such/folder/out.png".into();
    s.fails(&args, NOT_FOUND, &["/no/such/folder"]);
    // A name the file system refuses (longer than 255 bytes), found before the run.
    args[n + 1] = s.out.join(format!("{}.png", "x".repeat(300))).display().to_string();
    let started = Instant::now();
    s.fails(&args, INVALID, &["xxxx"]);
    assert!(started.elapsed() < Duration::from_secs(10));
    args[n + 1] = s.out.join("image.gif").display().to_string();
    s.fails(&args, INVALID, &[".png or .npy"]);
}

#[test]
fn existing_directory_named_as_output() {
    let s = Scratch::new("txt2img-tiny");
    let dir = s.out.parent().unwrap().join("taken.png");
    std::fs::create_dir(&dir).unwrap();
    let mut args = s.txt2img(&[]);
    let n = args.iter().position(|a| a == "--output").unwrap();
    args[n + 1] = dir.display().to_string();
    s.fails(&args, INVALID, &["taken.png", "is a directory"]);
}

/// Starts a long run, sends `signal` once it is denoising, and returns the result.
#[cfg(unix)]
fn interrupted_run(signal: i32) -> (Scratch, Output, Duration) {
    let s = Scratch::new("txt2img-tiny");
    let mut args = s.txt2img(&[]);
    let n = args.iter().position(|a| a == "--steps").unwrap();
    args[n + 1] = "900".into();
    let child = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Loading the tiny model takes well under a second; 900 steps take tens of seconds.
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let sent = Instant::now();
    let out = child.wait_with_output().unwrap();
    (s, out, sent.elapsed())
}

#[cfg(unix)]
fn assert_no_files(s: &Scratch) {
    let left: Vec<_> = std::fs::read_dir(&s.out).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left {left:?}");
}

#[cfg(unix)]
#[test]
fn sigterm_mid_run_stops_within_a_step_and_leaves_nothing() {
    let (s, out, took) = interrupted_run(libc::SIGTERM);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(CANCELLED), "{stderr}");
    assert!(stderr.starts_with("error: interrupted"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
    assert_no_files(&s);
}

#[cfg(unix)]
#[test]
fn ctrl_c_mid_run_stops_within_a_step_and_leaves_nothing() {
    let (s, out, took) = interrupted_run(libc::SIGINT);
    assert_eq!(out.status.code(), Some(CANCELLED), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
    assert_no_files(&s);
}

#[cfg(unix)]
#[test]
fn sigkill_mid_run_leaves_nothing() {
    let (s, out, _) = interrupted_run(libc::SIGKILL);
    assert_eq!(out.status.code(), None);
    assert_no_files(&s);
}
