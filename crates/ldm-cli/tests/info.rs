//! `ldm info` run as a user would: the built binary on the fixture folders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ldm_core::loading::{PthFile, TensorSource};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

/// Runs `ldm ARGS` with a Hugging Face environment that can never reach the network.
fn ldm(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldm"));
    cmd.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME");
    cmd.env("HF_ENDPOINT", "http://127.0.0.1:9");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the ldm binary runs")
}

fn info_ok(model: &Path) -> String {
    let out = ldm(&["info", "--model", model.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ldm info {} failed: {stderr}", model.display());
    assert!(stderr.is_empty(), "{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// The one error line and exit status 1, nothing on stdout.
fn info_err(model: &str, env: &[(&str, &str)]) -> String {
    let out = ldm(&["info", "--model", model], env);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    stderr
}

/// Element count of a safetensors file, read from its JSON header here, not through ldm-core.
fn safetensors_params(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| {
            v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum()
}

/// Element count of a PyTorch `.bin`, from the tensor shapes in its pickle.
fn bin_params(path: &Path) -> u64 {
    let file = PthFile::open(path).unwrap();
    file.names()
        .iter()
        .map(|n| file.meta(n).unwrap().shape.iter().map(|&d| d as u64).product::<u64>())
        .sum()
}

/// The lines of one component's section ("name: Class (library)" up to the next blank line).
fn section<'a>(out: &'a str, header: &str) -> Vec<&'a str> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with(header));
    let first = lines.next().unwrap_or_else(|| panic!("no `{header}` in:\n{out}"));
    std::iter::once(first)
        .chain(lines.take_while(|l| !l.is_empty()))
        .collect()
}

fn params_line(n: u64) -> String {
    format!("({n})")
}

#[test]
fn describes_the_txt2img_pipeline() {
    let dir = fixture("txt2img-tiny");
    let out = info_ok(&dir);
    assert!(
        out.contains("pipeline: LDMTextToImagePipeline (5 components, diffusers 0.42.1)"),
        "{out}"
    );

    let bert = bin_params(&dir.join("bert/pytorch_model.bin"));
    let unet = safetensors_params(&dir.join("unet/diffusion_pytorch_model.safetensors"));
    let vae = safetensors_params(&dir.join("vqvae/diffusion_pytorch_model.safetensors"));

    let s = section(&out, "bert: LDMBertModel (latent_diffusion)");
    for line in [
        "  d_model: 32",
        "  encoder_layers: 2",
        "  encoder_attention_heads: 2",
        "  vocab_size: 720",
    ] {
        assert!(s.contains(&line), "{line} not in {s:#?}");
    }
    assert!(
        s.iter().any(|l| l.contains("bert/pytorch_model.bin (pytorch, F32")),
        "{s:#?}"
    );
    assert!(
        s.iter()
            .any(|l| l.starts_with("  parameters: ") && l.ends_with(&params_line(bert))),
        "{s:#?}"
    );

    let s = section(&out, "unet: UNet2DConditionModel (diffusers)");
    for line in [
        "  block_out_channels: [16, 32, 32]",
        "  layers_per_block: 2",
        "  attention_head_dim: 8",
        "  cross_attention_dim: 32",
        "  in_channels: 4",
        "  out_channels: 4",
        "  sample_size: 8",
        "  down_block_types: [CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D]",
        "  up_block_types: [UpBlock2D, CrossAttnUpBlock2D, CrossAttnUpBlock2D]",
    ] {
        assert!(s.contains(&line), "{line} not in {s:#?}");
    }
    assert!(
        s.iter()
            .any(|l| l.contains("unet/diffusion_pytorch_model.safetensors (safetensors, F32")),
        "{s:#?}"
    );
    assert!(s.iter().any(|l| l.ends_with(&params_line(unet))), "{s:#?}");

    let s = section(&out, "vqvae: AutoencoderKL (diffusers)");
    for line in [
        "  latent_channels: 4",
        "  scaling_factor: 0.5",
        "  block_out_channels: [16, 16, 32, 32]",
    ] {
        assert!(s.contains(&line), "{line} not in {s:#?}");
    }
    assert!(s.iter().any(|l| l.ends_with(&params_line(vae))), "{s:#?}");

    let s = section(&out, "scheduler: DDIMScheduler (diffusers)");
    for line in [
        "  beta_schedule: scaled_linear",
        "  steps_offset: 1",
        "  timestep_spacing: leading",
    ] {
        assert!(s.contains(&line), "{line} not in {s:#?}");
    }

    let vocab = std::fs::read_to_string(dir.join("tokenizer/vocab.txt"))
        .unwrap()
        .lines()
        .count();
    let s = section(&out, "tokenizer: BertTokenizer (transformers)");
    assert!(s.contains(&format!("  vocab size: {vocab}").as_str()), "{s:#?}");
    assert!(
        s.contains(&"  files: special_tokens_map.json, tokenizer_config.json, vocab.txt"),
        "{s:#?}"
    );

    let total = bert + unet + vae;
    assert!(
        out.trim_end()
            .ends_with(&format!("total parameters: {} ({total})", short(total))),
        "{out}"
    );
}

/// "1.23 M" style, written out here independently of the binary.
fn short(n: u64) -> String {
    match n {
        0..=999 => n.to_string(),
        1_000..=999_999 => format!("{:.2} K", n as f64 / 1e3),
        _ => format!("{:.2} M", n as f64 / 1e6),
    }
}

#[test]
fn describes_the_superres_pipeline() {
    let dir = fixture("superres-tiny");
    let out = info_ok(&dir);
    assert!(
        out.contains("pipeline: LDMSuperResolutionPipeline (3 components"),
        "{out}"
    );
    let unet = bin_params(&dir.join("unet/diffusion_pytorch_model.bin"));
    let vq = safetensors_params(&dir.join("vqvae/diffusion_pytorch_model.safetensors"));

    let s = section(&out, "unet: UNet2DModel (diffusers)");
    assert!(
        s.contains(&"  in_channels: 6") && s.contains(&"  out_channels: 3"),
        "{s:#?}"
    );
    assert!(s.iter().any(|l| l.contains("(pytorch, F32")), "{s:#?}");
    assert!(s.iter().any(|l| l.ends_with(&params_line(unet))), "{s:#?}");
    let s = section(&out, "vqvae: VQModel (diffusers)");
    assert!(
        s.contains(&"  num_vq_embeddings: 64") && s.contains(&"  latent_channels: 3"),
        "{s:#?}"
    );
    assert!(s.iter().any(|l| l.ends_with(&params_line(vq))), "{s:#?}");
    assert!(
        out.contains(&format!("total parameters: {} ({})", short(unet + vq), unet + vq)),
        "{out}"
    );
}

#[test]
fn describes_each_weight_variant() {
    let shards = fixture("variants/sharded");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shards.join("diffusion_pytorch_model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut files: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    files.sort();
    files.dedup();
    let expected: u64 = files.iter().map(|f| safetensors_params(&shards.join(f))).sum();
    assert_eq!(
        expected,
        bin_params(&fixture("variants/bin/diffusion_pytorch_model.bin"))
    );
    assert_eq!(
        expected,
        safetensors_params(&fixture("variants/fp16/diffusion_pytorch_model.fp16.safetensors"))
    );

    for (dir, format) in [
        ("variants/sharded", "(safetensors, 6 shards, F32, 153 tensors)"),
        ("variants/bin", "(pytorch, F32, 153 tensors)"),
        ("variants/fp16", "(safetensors, fp16 variant, F16, 153 tensors)"),
    ] {
        let out = info_ok(&fixture(dir));
        assert!(out.contains("class: VQModel (single component"), "{out}");
        assert!(out.contains("\n.: VQModel (diffusers)\n"), "{out}");
        assert!(out.contains(format), "{dir}: {out}");
        assert!(
            out.contains(&format!("  parameters: {} ({expected})", short(expected))),
            "{dir}: {out}"
        );
    }
}

#[test]
fn a_missing_folder_is_one_error_line() {
    let err = info_err("/no/such/model-folder", &[]);
    assert!(err.contains("/no/such/model-folder"), "{err}");
    assert!(err.contains("is missing"), "{err}");
}

#[test]
fn a_hub_id_not_in_the_cache_says_what_to_do() {
    let cache = tempfile::tempdir().unwrap();
    let cache_str = cache.path().to_str().unwrap();
    let err = info_err("CompVis/ldm-text2im-large-256", &[("HF_HUB_CACHE", cache_str)]);
    for part in [
        "huggingface-cli download CompVis/ldm-text2im-large-256",
        cache_str,
        "HF_HUB_OFFLINE",
    ] {
        assert!(err.contains(part), "`{part}` not in {err}");
    }
    // Online but the hub is unreachable: the same advice, with the network error.
    let err = info_err(
        "CompVis/ldm-text2im-large-256",
        &[("HF_HUB_CACHE", cache_str), ("HF_HUB_OFFLINE", "0")],
    );
    assert!(
        err.contains("could not be downloaded") && err.contains("127.0.0.1:9"),
        "{err}"
    );
    assert!(err.contains("huggingface-cli download"), "{err}");
}

#[test]
fn a_hub_id_in_the_cache_is_described() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--CompVis--ldm-text2im-large-256");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    copy_dir(&fixture("txt2img-tiny"), &repo.join("snapshots").join(commit));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let hf_home = cache.path().parent().unwrap().to_str().unwrap().to_string();
    let out = ldm(
        &["info", "--model", "CompVis/ldm-text2im-large-256"],
        &[("HF_HUB_CACHE", cache.path().to_str().unwrap()), ("HF_HOME", &hf_home)],
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("model: CompVis/ldm-text2im-large-256 ("), "{stdout}");
    assert!(
        stdout.contains(commit) && stdout.contains("pipeline: LDMTextToImagePipeline"),
        "{stdout}"
    );
}

#[test]
fn bad_folders_are_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pipe");
    copy_dir(&fixture("superres-tiny"), &dir);
    std::fs::remove_dir_all(dir.join("vqvae")).unwrap();
    let err = info_err(dir.to_str().unwrap(), &[]);
    assert!(
        err.contains(&dir.join("vqvae").display().to_string()) && err.contains("VQModel"),
        "{err}"
    );

    copy_dir(&fixture("superres-tiny/vqvae"), &dir.join("vqvae"));
    let weights = dir.join("vqvae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = info_err(dir.to_str().unwrap(), &[]);
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    let index = std::fs::read_to_string(dir.join("model_index.json")).unwrap();
    std::fs::write(dir.join("model_index.json"), index.replace("\"VQModel\"", "\"VQGAN\"")).unwrap();
    let err = info_err(dir.to_str().unwrap(), &[]);
    assert!(
        err.contains("unknown class `VQGAN`") && err.contains("AutoencoderKL"),
        "{err}"
    );
}

#[test]
fn help_documents_every_flag() {
    let out = ldm(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for part in ["info", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "--version"] {
        assert!(help.contains(part), "`{part}` not in {help}");
    }
    let out = ldm(&["info", "--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("--model <PATH_OR_ID>") && help.contains("hub id"),
        "{help}"
    );
    // A missing required flag is a usage error from clap, not a crash.
    let out = ldm(&["info"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}
