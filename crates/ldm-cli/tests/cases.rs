//! The shared cases of `tests/cases/` through the `ldm` binary, as a user runs it: every case's
//! `.npy` output must match diffusers' within the case's tolerance (1e-4), and bad input must
//! end with one `error:` line, a non-zero status and no output file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

fn ldm(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .expect("the ldm binary runs")
}

fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ldm_core::image::read_npy_f32(&bytes, &path.display().to_string()).unwrap()
}

/// The command line a case stands for.
fn case_args(case: &Value, output: &Path) -> Vec<String> {
    let cases = root().join("tests/cases");
    let p = &case["params"];
    let pipeline = case["pipeline"].as_str().unwrap();
    let model = root().join("tests/fixtures").join(case["model"].as_str().unwrap());
    let mut a: Vec<String> = vec![pipeline.into(), "--model".into(), model.display().to_string()];
    let mut flag = |name: &str, v: String| {
        a.push(format!("--{name}"));
        a.push(v);
    };
    if let Some(prompts) = p["prompts"].as_array() {
        for pr in prompts {
            flag("prompt", pr.as_str().unwrap().into());
        }
    }
    for key in ["steps", "guidance", "eta", "seed", "height", "width"] {
        if !p[key].is_null() {
            flag(key, p[key].to_string());
        }
    }
    if let Some(s) = p["scheduler"].as_str() {
        flag("scheduler", s.into());
    }
    if let Some(l) = case["latents"].as_str() {
        flag("latents", cases.join(l).display().to_string());
    }
    if let Some(img) = case["image"].as_str() {
        flag("image", cases.join(img).display().to_string());
    }
    flag("output", output.display().to_string());
    a.push("--quiet".into());
    a
}

#[test]
fn every_shared_case_matches_diffusers_through_the_ldm_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("tests/cases"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 10);
    for path in paths {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.npy"));
        let o = ldm(&case_args(&case, &out));
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let (shape, ours) = read_npy(&out);
        let (eshape, expected) = read_npy(&root().join("tests/cases").join(case["expected"].as_str().unwrap()));
        assert_eq!(shape, eshape, "{name}: shape");
        let err = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let tol = case["tolerance"].as_f64().unwrap_or(1e-4) as f32;
        eprintln!("{name}: max abs error {err:.3e}");
        assert!(err <= tol, "{name}: max abs error {err:e} exceeds {tol:e}");
    }
}

/// `--device gpu`: some shared cases on the GPU backend (lavapipe where there is no GPU), within
/// the GPU bound of 1e-3; an unknown device is refused by name.
#[test]
fn shared_cases_match_diffusers_with_device_gpu() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["txt2img-ddim-cfg", "txt2img-dpmpp", "superres-ddim"] {
        let case: Value =
            serde_json::from_str(&std::fs::read_to_string(root().join("tests/cases").join(format!("{name}.json"))).unwrap()).unwrap();
        let out = dir.path().join(format!("{name}.npy"));
        let mut args = case_args(&case, &out);
        args.extend(["--device".to_string(), "gpu".to_string()]);
        let o = ldm(&args);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let (_, ours) = read_npy(&out);
        let (_, expected) = read_npy(&root().join("tests/cases").join(case["expected"].as_str().unwrap()));
        let err = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{name}: max abs error {err:.3e} on the GPU (bound 1e-3)");
        assert!(err <= 1e-3, "{name} on the GPU: max abs error {err:e}");
    }
    let case: Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/cases/txt2img-ddim-cfg.json")).unwrap()).unwrap();
    let out = dir.path().join("tpu.npy");
    let mut args = case_args(&case, &out);
    args.extend(["--device".to_string(), "tpu".to_string()]);
    let o = ldm(&args);
    assert_eq!(o.status.code(), Some(2), "an unknown device is an invalid argument");
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown device `tpu`"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.exists());
}

/// `--threads N` gives the same numbers as the default pools; an absurd count is refused by name.
#[test]
fn threads_do_not_change_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let case: Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/cases/txt2img-ddim-cfg.json")).unwrap()).unwrap();
    let mut outs = Vec::new();
    for threads in ["0", "1", "3"] {
        let out = dir.path().join(format!("t{threads}.npy"));
        let mut args = case_args(&case, &out);
        args.extend(["--threads".to_string(), threads.to_string()]);
        let o = ldm(&args);
        assert!(o.status.success(), "--threads {threads}: {}", String::from_utf8_lossy(&o.stderr));
        outs.push(read_npy(&out).1);
    }
    assert_eq!(outs[0], outs[1], "--threads 1 differs from the default");
    assert_eq!(outs[0], outs[2], "--threads 3 differs from the default");
    let out = dir.path().join("many.npy");
    let mut args = case_args(&case, &out);
    args.extend(["--threads".to_string(), "100000".to_string()]);
    let o = ldm(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("threads 100000"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.exists());
}

#[test]
fn png_output_carries_the_parameters_and_a_batch_writes_one_file_per_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/txt2img-tiny").display().to_string();
    let out = dir.path().join("cat.png");
    let args: Vec<String> = ["txt2img", "--model", &model, "--prompt", "a cat", "--prompt", "a dog", "--steps", "2", "--seed", "7", "--output", out.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let o = ldm(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.exists());
    for (i, prompt) in ["a cat", "a dog"].iter().enumerate() {
        let bytes = std::fs::read(dir.path().join(format!("cat-{i}.png"))).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (64, 64));
        let text: Vec<(String, String)> = info
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone()))
            .chain(info.utf8_text.iter().map(|t| (t.keyword.clone(), t.get_text().unwrap_or_default())))
            .collect();
        assert!(text.contains(&("prompt".into(), prompt.to_string())), "{text:?}");
        assert!(text.contains(&("seed".into(), "7".into())), "{text:?}");
        assert!(text.contains(&("steps".into(), "2".into())), "{text:?}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty());
}

#[test]
fn bad_input_ends_with_one_error_line_and_no_output_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/txt2img-tiny").display().to_string();
    let sr_model = root().join("tests/fixtures/superres-tiny").display().to_string();
    let out = dir.path().join("out.png");
    let o = out.to_str().unwrap().to_string();
    let not_image = root().join("tests/cases/README.md").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["txt2img", "--model", &model, "--prompt", "x", "--scheduler", "heun", "-o", &o], "unknown scheduler `heun`"),
        (vec!["txt2img", "--model", &model, "--prompt", "x", "--height", "60", "-o", &o], "height 60"),
        (vec!["txt2img", "--model", &model, "--prompt", "x", "--steps", "0", "-o", &o], "0 inference steps"),
        (vec!["txt2img", "--model", "/no/such/model", "--prompt", "x", "-o", &o], "/no/such/model"),
        (vec!["txt2img", "--model", &model, "--prompt", "x", "-o", "/no/such/dir/out.png"], "/no/such/dir"),
        (vec!["txt2img", "--model", &model, "--prompt", "x", "-o", dir.path().to_str().unwrap()], "is a directory"),
        (vec!["txt2img", "--model", &model, "--prompt", "x", "-o", "out.jpg"], ".png or .npy"),
        (vec!["superres", "--model", &sr_model, "--image", &not_image, "-o", &o], "README.md"),
        (vec!["superres", "--model", &sr_model, "--image", "/no/such.png", "-o", &o], "/no/such.png"),
    ];
    for (args, needle) in cases {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let r = ldm(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains(needle), "`{stderr}` should mention `{needle}`");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}
