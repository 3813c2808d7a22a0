//! The C ABI from real C and C++ programs, compiled with the system's cc and c++ against
//! include/ldm.h and the libldm that cargo built with these tests:
//! - every shared case of tests/cases through ldm_txt2img/ldm_superres, against diffusers;
//! - four threads at once from C++ (bindings/cpp/ldm.hpp), with a pipeline each and one shared;
//! - cancellation from the progress callback;
//! - every error status, with its message;
//! - a load/generate/free loop under valgrind;
//! - the install script, pkg-config and the two examples of bindings/.

mod common;
#[path = "../../ldm-core/tests/shipped/measure.rs"]
mod measure;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// The command line of tests/c/run_case.c for a case.
fn case_args(case: &Value, out: &Path, scratch: &Path) -> Vec<String> {
    let cases = root().join("tests/cases");
    let p = &case["params"];
    let model = root().join("tests/fixtures").join(case["model"].as_str().unwrap());
    let mut a: Vec<String> = vec![out.display().to_string(), case["pipeline"].as_str().unwrap().into(), model.display().to_string()];
    let mut flag = |name: &str, v: String| {
        a.push(format!("--{name}"));
        a.push(v);
    };
    for pr in p["prompts"].as_array().into_iter().flatten() {
        flag("prompt", pr.as_str().unwrap().into());
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
        let (_, data) = read_npy(&cases.join(l));
        let raw = scratch.join(format!("{}-latents.f32", case["name"].as_str().unwrap()));
        write_f32(&raw, &data);
        flag("latents", raw.display().to_string());
    }
    if let Some(img) = case["image"].as_str() {
        flag("image", cases.join(img).display().to_string());
    }
    a
}

/// LDM_DEVICE_GPU: some shared cases on the GPU backend (lavapipe where there is no GPU), within
/// the GPU bound of 1e-3.
#[test]
fn shared_cases_match_diffusers_on_the_gpu_through_a_c_program() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&[c_source("run_case.c")], &dir.path().join("run_case"), false, &[]);
    for name in ["txt2img-ddim-cfg", "txt2img-euler-a", "superres-resize"] {
        let path = root().join("tests/cases").join(format!("{name}.json"));
        let case: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let out = dir.path().join(format!("{name}.f32"));
        let mut args = case_args(&case, &out, dir.path());
        args.extend(["--device".to_string(), "gpu".to_string()]);
        ok(&run(&exe, &args), name);
        let (_, expected) = read_npy(&root().join("tests/cases").join(case["expected"].as_str().unwrap()));
        let err = max_abs_diff(&read_f32(&out), &expected);
        eprintln!("{name}: max abs error {err:.3e} through C on the GPU (bound 1e-3)");
        assert!(err <= 1e-3, "{name} on the GPU: max abs error {err:e} exceeds 1e-3");
    }
}

#[test]
fn every_shared_case_matches_diffusers_through_a_c_program() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&[c_source("run_case.c")], &dir.path().join("run_case"), false, &[]);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("tests/cases"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 10, "the shared cases are missing");
    let mut worst = 0f32;
    for path in &paths {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.f32"));
        let stdout = ok(&run(&exe, &case_args(&case, &out, dir.path())), name);
        let (eshape, expected) = read_npy(&root().join("tests/cases").join(case["expected"].as_str().unwrap()));
        let dims: Vec<usize> = stdout.split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert_eq!(dims, eshape[..3].to_vec(), "{name}: (count, height, width)");
        let ours = read_f32(&out);
        let err = max_abs_diff(&ours, &expected);
        let tol = case["tolerance"].as_f64().unwrap_or(1e-4) as f32;
        eprintln!("{name}: max abs error {err:.3e} through C (tolerance {tol:e})");
        assert!(err <= tol, "{name}: max abs error {err:e} exceeds {tol:e}");
        worst = worst.max(err);
    }
    eprintln!("{} cases through the C ABI; worst max abs error {worst:.3e}", paths.len());
}

#[test]
fn cancelling_from_the_progress_callback_returns_ldm_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&[c_source("cancel.c")], &dir.path().join("cancel"), false, &[]);
    let fixtures = root().join("tests/fixtures");
    let args = [fixtures.join("txt2img-tiny"), fixtures.join("superres-tiny")].map(|p| p.display().to_string());
    let stdout = ok(&run(&exe, &args), "cancel");
    eprintln!("{stdout}");
    assert!(stdout.contains("txt2img cancelled at step 1: 2 call(s): 0/3 1/3\n"), "{stdout}");
    assert!(stdout.ends_with("0 failure(s)\n"), "{stdout}");
}

/// Writes the broken model folders of the error test into `dir`.
fn broken_models(dir: &Path) -> [PathBuf; 3] {
    let fixtures = root().join("tests/fixtures");
    let bad = dir.join("bad-json");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("model_index.json"), "{ \"_class_name\": \"LDMTextToImagePipeline\", ").unwrap();

    let unsupported = dir.join("unet3d");
    copy_dir(&fixtures.join("superres-tiny"), &unsupported);
    let index = std::fs::read_to_string(unsupported.join("model_index.json")).unwrap();
    std::fs::write(unsupported.join("model_index.json"), index.replace("\"UNet2DModel\"", "\"UNet3DConditionModel\"")).unwrap();

    // Every float of the decoder's safetensors file set to NaN (all bits set), header kept.
    let nan = dir.join("nan-weights");
    copy_dir(&fixtures.join("superres-tiny"), &nan);
    let file = nan.join("vqvae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..].fill(0xff);
    std::fs::write(&file, bytes).unwrap();
    [bad, unsupported, nan]
}

#[test]
fn every_error_status_is_reached_from_c_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&[c_source("errors.c")], &dir.path().join("errors"), false, &["-lm"]);
    let fixtures = root().join("tests/fixtures");
    let [bad, unsupported, nan] = broken_models(dir.path());
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let args = [fixtures.join("txt2img-tiny"), fixtures.join("superres-tiny"), bad, unsupported, nan, scratch.clone()]
        .map(|p| p.display().to_string());
    let stdout = ok(&run(&exe, &args), "errors");
    eprintln!("{stdout}");
    // LDM_ERR_INTERNAL is what a caught panic becomes, which no input reaches; the unit test
    // `a_panic_becomes_ldm_err_internal_with_its_message` covers it.
    assert!(
        stdout.contains(
            "reached: LDM_OK LDM_ERR_INVALID_ARGUMENT LDM_ERR_NOT_FOUND LDM_ERR_BAD_MODEL LDM_ERR_UNSUPPORTED \
             LDM_ERR_OUT_OF_MEMORY LDM_CANCELLED\n"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("unknown status name: LDM_STATUS_UNKNOWN\n"), "{stdout}");
    assert!(stdout.contains(&format!("version: {}\n", env!("CARGO_PKG_VERSION"))), "{stdout}");
    assert!(stdout.ends_with("0 failure(s)\n"), "{stdout}");
    assert!(scratch.join("out.png").is_file());
}

#[test]
fn four_cpp_threads_with_separate_and_shared_pipelines_match_single_threaded_runs() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&[PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cpp/threads.cpp")], &dir.path().join("threads"), true, &[]);
    let model = root().join("tests/fixtures/txt2img-tiny").display().to_string();
    let stdout = ok(&run(&exe, &[model]), "threads");
    eprintln!("{stdout}");
    assert_eq!(stdout.matches("max abs diff to the single-threaded run 0 ").count(), 8, "{stdout}");
    assert!(stdout.ends_with("0 failure(s)\n"), "{stdout}");
}

#[test]
fn a_load_generate_free_loop_is_clean_under_valgrind() {
    let valgrind = ["/usr/bin/valgrind", "/usr/local/bin/valgrind"].into_iter().map(PathBuf::from).find(|p| p.is_file());
    let valgrind = valgrind.unwrap_or_else(|| {
        panic!("valgrind is not installed; this test needs it (apt-get install -y valgrind, or your system's package)")
    });
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&[c_source("leak_loop.c")], &dir.path().join("leak_loop"), false, &[]);
    let fixtures = root().join("tests/fixtures");
    // One thread for candle's own pools: valgrind runs threads one at a time, and idle workers
    // spinning for work would only slow it down. "Possibly lost" blocks are the pools' threads,
    // alive at exit by design; definite leaks fail the test.
    let o = Command::new(valgrind)
        .args(["--leak-check=full", "--errors-for-leak-kinds=definite", "--show-leak-kinds=definite", "--error-exitcode=1"])
        .arg(&exe)
        .arg(fixtures.join("txt2img-tiny"))
        .arg(fixtures.join("superres-tiny"))
        .arg(dir.path().join("scratch.png"))
        .env("HF_HUB_OFFLINE", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("valgrind runs");
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let summary: Vec<&str> = stderr.lines().filter(|l| l.contains(" lost: ") || l.contains("ERROR SUMMARY")).collect();
    eprintln!("{stdout}{}", summary.join("\n"));
    assert!(o.status.success(), "valgrind found errors or leaks ({}):\n{stdout}\n{stderr}", o.status);
    assert!(stdout.contains("round 1: decoded 32x32"), "{stdout}");
    assert!(stderr.contains("ERROR SUMMARY: 0 errors"), "{stderr}");
}

#[test]
fn the_installed_library_builds_the_examples_with_pkg_config() {
    let pkg_config = Command::new("pkg-config").arg("--version").output();
    assert!(pkg_config.is_ok_and(|o| o.status.success()), "pkg-config is not installed; this test needs it (apt-get install -y pkg-config)");
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    let o = Command::new("bash")
        .arg(root().join("scripts/install-capi.sh"))
        .arg(&prefix)
        .env("LDM_LIB_DIR", lib_dir())
        .env("LDM_INSTALL_STATIC", "0")
        .output()
        .unwrap();
    ok(&o, "scripts/install-capi.sh");
    for f in ["include/ldm.h", "include/ldm.hpp", "lib/pkgconfig/ldm.pc", &format!("lib/{DYLIB}")] {
        assert!(prefix.join(f).is_file(), "{f} was not installed");
    }
    let pc_path = prefix.join("lib/pkgconfig");
    let flags = Command::new("pkg-config").args(["--cflags", "--libs", "ldm"]).env("PKG_CONFIG_PATH", &pc_path).output().unwrap();
    let flags = ok(&flags, "pkg-config --cflags --libs ldm");
    assert!(flags.contains("-lldm"), "{flags}");
    let version = Command::new("pkg-config").args(["--modversion", "ldm"]).env("PKG_CONFIG_PATH", &pc_path).output().unwrap();
    assert_eq!(ok(&version, "pkg-config --modversion ldm").trim(), env!("CARGO_PKG_VERSION"));

    // The examples as the README shows them: on the shipped model, which draws the prompt.
    let model = root().join("models/ldm-shapes");
    for (source, compiler, std) in [("bindings/c/example.c", "cc", "-std=c11"), ("bindings/cpp/example.cpp", "c++", "-std=c++17")] {
        let exe = dir.path().join(if compiler == "cc" { "example-c" } else { "example-cpp" });
        // Exactly what a user types: cc app.c $(pkg-config --cflags --libs ldm).
        let script = format!(
            "{compiler} {std} -Wall -Wextra -Werror {} $(pkg-config --cflags --libs ldm) -o {}",
            root().join(source).display(),
            exe.display()
        );
        let o = Command::new("sh").arg("-c").arg(&script).env("PKG_CONFIG_PATH", &pc_path).output().unwrap();
        ok(&o, &script);
        let png = dir.path().join(format!("{}.png", exe.file_name().unwrap().to_str().unwrap()));
        let o = Command::new(&exe)
            .args([model.display().to_string(), "a red circle".into(), png.display().to_string(), "20".into()])
            .env("LD_LIBRARY_PATH", prefix.join("lib"))
            .env("DYLD_LIBRARY_PATH", prefix.join("lib"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let stdout = ok(&o, source);
        eprintln!("{source}: {}", stdout.trim());
        assert!(stdout.contains("(64x64)"), "{stdout}");
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", png.display());
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 64, "PNG width");
        let (px, w, h) = ldm_core::image::decode_image(&bytes, source).unwrap();
        let a = measure::analyse(&px, w as usize, h as usize);
        let e = measure::Expect { colour: measure::colour_index("red"), shape: "circle", background: None };
        let s = measure::score(&a, &e);
        assert!(s.colour_ok, "{source}: \"a red circle\" drew {:?} on {}", a.foreground, measure::PALETTE[a.background].0);
    }
    // The same run from C and from C++ gives the same file.
    let c = std::fs::read(dir.path().join("example-c.png")).unwrap();
    assert_eq!(c, std::fs::read(dir.path().join("example-cpp.png")).unwrap(), "the C and C++ examples differ");
}
