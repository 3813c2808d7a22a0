//! Model folders, weight formats and the hub cache, on the committed fixtures and on small
//! folders built in temporary directories.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ldm_core::loading::hub::{cached_snapshot, HubId};
use ldm_core::loading::{
    find_weights, format_count, resolve_model_in, resolve_model_with, ComponentClass, ComponentKind, HubOptions,
    ModelFolder, TensorSource, WeightsSummary,
};
use ldm_core::Error;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
const DIFFUSERS: &[&str] = &["diffusion_pytorch_model"];
const HUB_ID: &str = "CompVis/ldm-text2im-large-256";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

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

fn write_json(path: &Path, value: serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// Writes a safetensors file of f32 tensors, stored as `dtype` ("F32", "F16" or "BF16").
fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)], dtype: &str) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| match dtype {
            "F32" => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            "F16" => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        })
        .collect();
    let st_dtype = match dtype {
        "F32" => safetensors::Dtype::F32,
        "F16" => safetensors::Dtype::F16,
        _ => safetensors::Dtype::BF16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                name.to_string(),
                safetensors::tensor::TensorView::new(st_dtype, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn sorted_names(src: &dyn TensorSource) -> Vec<String> {
    let mut names = src.names();
    names.sort();
    names
}

// ---------------------------------------------------------------- weight formats (fixtures)

#[test]
fn bin_and_safetensors_read_the_same_values() {
    let bin = find_weights(&fixture("variants/bin"), DIFFUSERS).unwrap();
    let st = find_weights(&fixture("variants/sharded"), DIFFUSERS).unwrap();
    assert_eq!(bin.format(), "pytorch");
    assert!(st.format().starts_with("safetensors"), "{}", st.format());
    let names = sorted_names(bin.as_ref());
    assert_eq!(names.len(), 153);
    assert_eq!(names, sorted_names(st.as_ref()));
    for name in &names {
        assert_eq!(bin.meta(name), st.meta(name), "{name}");
        assert_eq!(bin.load_f32(name).unwrap(), st.load_f32(name).unwrap(), "{name}");
    }
}

#[test]
fn fp16_variant_is_found_and_upcast() {
    let f16 = find_weights(&fixture("variants/fp16"), DIFFUSERS).unwrap();
    let f32s = find_weights(&fixture("variants/sharded"), DIFFUSERS).unwrap();
    assert!(f16.location(None).ends_with("diffusion_pytorch_model.fp16.safetensors"));
    let summary = WeightsSummary::of(f16.as_ref());
    assert!(summary.fp16_variant);
    assert_eq!(summary.dtypes, ["F16"]);
    let names = sorted_names(f16.as_ref());
    assert_eq!(names, sorted_names(f32s.as_ref()));
    let mut max_rel = 0f32;
    for name in &names {
        assert_eq!(f16.meta(name).unwrap().dtype, "F16");
        let (a, b) = (f16.load_f32(name).unwrap(), f32s.load_f32(name).unwrap());
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(&b) {
            // torch's .half() rounds to nearest even, as half::f16::from_f32 does.
            assert_eq!(*x, half::f16::from_f32(*y).to_f32(), "{name}");
            // f16 keeps 11 significant bits; 2^-24 covers the subnormals.
            assert!(
                (x - y).abs() <= y.abs() * 2f32.powi(-11) + 2f32.powi(-24),
                "{name}: {x} vs {y}"
            );
            if y.abs() > 1e-3 {
                max_rel = max_rel.max((x - y).abs() / y.abs());
            }
        }
    }
    assert!(
        max_rel > 0.0,
        "the fp16 values should differ from the f32 ones somewhere"
    );
}

#[test]
fn sharded_index_gives_all_tensors() {
    let dir = fixture("variants/sharded");
    let src = find_weights(&dir, DIFFUSERS).unwrap();
    assert_eq!(src.format(), "safetensors, 6 shards");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("diffusion_pytorch_model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(src.names().len(), map.len());
    let mut elements = 0u64;
    for (name, shard) in map {
        assert!(src.location(Some(name)).ends_with(shard.as_str().unwrap()), "{name}");
        let meta = src.meta(name).unwrap();
        assert_eq!(src.load_f32(name).unwrap().len(), meta.shape.iter().product::<usize>());
        elements += meta.shape.iter().product::<usize>() as u64;
    }
    // total_size is in bytes of f32.
    assert_eq!(elements * 4, index["metadata"]["total_size"].as_u64().unwrap());
    assert_eq!(WeightsSummary::of(src.as_ref()).parameters, elements);
}

// ---------------------------------------------------------------- model folders (fixtures)

#[test]
fn opens_the_txt2img_pipeline_folder() {
    let folder = ModelFolder::open(fixture("txt2img-tiny")).unwrap();
    assert_eq!(folder.class_name, "LDMTextToImagePipeline");
    assert_eq!(folder.diffusers_version.as_deref(), Some("0.42.1"));
    assert!(!folder.is_single());
    let got: Vec<(&str, &str, ComponentClass)> = folder
        .components
        .iter()
        .map(|c| (c.name.as_str(), c.library.as_str(), c.class))
        .collect();
    assert_eq!(
        got,
        [
            ("bert", "latent_diffusion", ComponentClass::LDMBertModel),
            ("scheduler", "diffusers", ComponentClass::DDIMScheduler),
            ("tokenizer", "transformers", ComponentClass::BertTokenizer),
            ("unet", "diffusers", ComponentClass::UNet2DConditionModel),
            ("vqvae", "diffusers", ComponentClass::AutoencoderKL),
        ]
    );
    let scheduler = folder.component("scheduler").unwrap();
    assert_eq!(scheduler.config().unwrap()["_class_name"], "DDIMScheduler");
    assert_eq!(
        folder.component("tokenizer").unwrap().config().unwrap()["do_lower_case"],
        true
    );
    assert_eq!(
        folder.component("unet").unwrap().config().unwrap()["cross_attention_dim"],
        32
    );
    // LDMBert is saved by transformers as pytorch_model.bin.
    let bert = folder.component("bert").unwrap().weights().unwrap();
    assert!(bert.location(None).ends_with("bert/pytorch_model.bin"));
    assert_eq!(bert.format(), "pytorch");
    assert!(folder.component("tokenizer").unwrap().weights().is_err());
    assert_eq!(folder.find_kind(ComponentKind::Autoencoder).unwrap().name, "vqvae");
    assert!(matches!(
        folder.component("safety_checker"),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn opens_single_component_folders() {
    let unet = ModelFolder::open(fixture("unet-linear-proj")).unwrap();
    assert!(unet.is_single());
    assert_eq!(unet.class_name, "UNet2DConditionModel");
    let c = unet.component("unet").unwrap();
    assert_eq!((c.name.as_str(), c.library.as_str()), (".", "diffusers"));
    assert_eq!(c.config().unwrap()["use_linear_projection"], true);
    assert!(c.weights().unwrap().names().len() > 10);

    let sr = ModelFolder::open(fixture("superres-tiny")).unwrap();
    let classes: Vec<_> = sr.components.iter().map(|c| c.class).collect();
    assert_eq!(
        classes,
        [
            ComponentClass::DDIMScheduler,
            ComponentClass::UNet2DModel,
            ComponentClass::VQModel
        ]
    );
    assert_eq!(sr.component("unet").unwrap().weights().unwrap().format(), "pytorch");

    let tok = ModelFolder::open(fixture("tokenizer-json")).unwrap();
    assert_eq!(tok.components[0].class.kind(), ComponentKind::Tokenizer);
}

#[test]
fn folder_errors_name_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();

    // Not a folder at all.
    let err = ModelFolder::open(tmp.path().join("nope")).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { path, .. } if path.ends_with("nope")),
        "{err}"
    );

    // An empty folder: no model_index.json.
    let err = ModelFolder::open(tmp.path()).unwrap_err();
    match &err {
        Error::NotFound { path, .. } => assert!(path.ends_with("model_index.json"), "{err}"),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // A component listed but its folder missing.
    let dir = tmp.path().join("pipe");
    copy_dir(&fixture("txt2img-tiny"), &dir);
    std::fs::remove_dir_all(dir.join("unet")).unwrap();
    let err = ModelFolder::open(&dir).unwrap_err();
    match &err {
        Error::NotFound { path, what } => {
            assert_eq!(path, &dir.join("unet"));
            assert!(what.contains("UNet2DConditionModel"), "{what}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(err.to_string().contains("unet"), "{err}");

    // A component with its weight file missing: found when the weights are asked for.
    copy_dir(&fixture("txt2img-tiny/unet"), &dir.join("unet"));
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let folder = ModelFolder::open(&dir).unwrap();
    let err = folder.component("unet").unwrap().weights().err().unwrap();
    assert!(
        matches!(&err, Error::NotFound { path, .. } if path == &dir.join("unet")),
        "{err}"
    );
    assert!(err.to_string().contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn unknown_class_lists_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_dir(&fixture("superres-tiny"), dir);
    write_json(
        &dir.join("model_index.json"),
        serde_json::json!({
            "_class_name": "LDMSuperResolutionPipeline",
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
            "vqvae": ["diffusers", "VQModel"],
            "feature_extractor": [null, null],
            "requires_safety_checker": true,
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        }),
    );
    std::fs::create_dir(dir.join("safety_checker")).unwrap();
    let err = ModelFolder::open(dir).unwrap_err();
    match &err {
        Error::UnknownClass {
            path,
            component,
            class,
            supported,
        } => {
            assert_eq!(path, &dir.join("model_index.json"));
            assert_eq!(component, "safety_checker");
            assert_eq!(class, "StableDiffusionSafetyChecker");
            for c in ComponentClass::ALL {
                assert!(supported.contains(c.name()), "{supported}");
            }
        }
        other => panic!("expected UnknownClass, got {other:?}"),
    }

    // Without it, [null, null] and non-list entries are not components.
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model_index.json")).unwrap()).unwrap();
    index.as_object_mut().unwrap().remove("safety_checker");
    write_json(&dir.join("model_index.json"), index);
    assert_eq!(ModelFolder::open(dir).unwrap().components.len(), 3);

    // A single-model folder of an unknown class.
    let single = tmp.path().join("single");
    write_json(
        &single.join("config.json"),
        serde_json::json!({"_class_name": "ControlNetModel"}),
    );
    let err = ModelFolder::open(&single).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownClass { class, .. } if class == "ControlNetModel"),
        "{err}"
    );
}

#[test]
fn malformed_model_index_entries_are_config_errors() {
    let tmp = tempfile::tempdir().unwrap();
    write_json(
        &tmp.path().join("model_index.json"),
        serde_json::json!({"_class_name": "P", "unet": ["diffusers"]}),
    );
    let err = ModelFolder::open(tmp.path()).unwrap_err();
    assert!(matches!(&err, Error::Config { field, .. } if field == "unet"), "{err}");

    write_json(
        &tmp.path().join("model_index.json"),
        serde_json::json!({"_class_name": "P", "../unet": ["diffusers", "UNet2DModel"]}),
    );
    let err = ModelFolder::open(tmp.path()).unwrap_err();
    assert!(matches!(&err, Error::Config { field, .. } if field == "../unet"), "{err}");

    std::fs::write(tmp.path().join("model_index.json"), "{ not json").unwrap();
    let err = ModelFolder::open(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Json { path, .. } if path.ends_with("model_index.json")),
        "{err}"
    );
}

// ---------------------------------------------------------------- damaged weight files

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("txt2img-tiny/unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let dir = tmp.path().join("unet");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fixture("txt2img-tiny/unet/config.json"), dir.join("config.json")).unwrap();
    let path = dir.join("diffusion_pytorch_model.safetensors");
    for keep in [bytes.len() - 1000, 1000, 4] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = ModelFolder::open(&dir).unwrap().components[0].weights().err().unwrap();
        match &err {
            Error::BadWeights { path: p, msg } => {
                assert_eq!(p, &path);
                if keep > 8 {
                    assert!(msg.contains("truncated"), "{msg}");
                }
            }
            other => panic!("expected BadWeights for {keep} bytes, got {other:?}"),
        }
    }
}

#[test]
fn truncated_bin_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("variants/bin/diffusion_pytorch_model.bin")).unwrap();
    let path = tmp.path().join("diffusion_pytorch_model.bin");
    for keep in [bytes.len() / 2, bytes.len() - 100, 10, 0] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = find_weights(tmp.path(), DIFFUSERS).err().unwrap();
        assert!(
            matches!(&err, Error::BadWeights { path: p, .. } if p == &path),
            "{keep} bytes: {err:?}"
        );
        assert!(err.to_string().contains("diffusion_pytorch_model.bin"), "{err}");
    }
}

// ---------------------------------------------------------------- folders built here

#[test]
fn reads_every_float_dtype_from_a_built_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
    for dtype in ["F32", "F16", "BF16"] {
        let dir = tmp.path().join(dtype);
        write_json(
            &dir.join("config.json"),
            serde_json::json!({"_class_name": "UNet2DModel"}),
        );
        write_safetensors(
            &dir.join("diffusion_pytorch_model.safetensors"),
            &[
                ("a.weight", vec![2, 3, 4], values.clone()),
                ("a.bias", vec![3], vec![1.0, -2.0, 0.5]),
            ],
            dtype,
        );
        let folder = ModelFolder::open(&dir).unwrap();
        let w = folder.components[0].weights().unwrap();
        assert_eq!(w.meta("a.weight").unwrap().shape, [2, 3, 4]);
        assert_eq!(w.meta("a.weight").unwrap().dtype, dtype);
        // Every value is a multiple of 1/4 below 8, exact in all three types.
        assert_eq!(w.load_f32("a.weight").unwrap(), values);
        assert_eq!(w.load_f32("a.bias").unwrap(), [1.0, -2.0, 0.5]);
        assert_eq!(WeightsSummary::of(w.as_ref()).parameters, 27);
        assert!(matches!(w.load_f32("nope"), Err(Error::MissingWeight { .. })));
    }
}

#[test]
fn finds_sharded_fp16_variants_under_every_index_name() {
    let tmp = tempfile::tempdir().unwrap();
    let index_names = [
        "diffusion_pytorch_model.safetensors.index.fp16.json",
        "diffusion_pytorch_model.safetensors.fp16.index.json",
        "diffusion_pytorch_model.fp16.safetensors.index.json",
    ];
    for (i, index_name) in index_names.iter().enumerate() {
        let dir = tmp.path().join(i.to_string());
        let shards = [
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        ];
        write_safetensors(&dir.join(shards[0]), &[("x", vec![2], vec![1.5, 2.5])], "F16");
        write_safetensors(&dir.join(shards[1]), &[("y", vec![1], vec![-1.0])], "F16");
        write_json(
            &dir.join(index_name),
            serde_json::json!({"weight_map": {"x": shards[0], "y": shards[1]}}),
        );
        let src = find_weights(&dir, DIFFUSERS).unwrap();
        assert_eq!(sorted_names(src.as_ref()), ["x", "y"], "{index_name}");
        assert_eq!(src.load_f32("x").unwrap(), [1.5, 2.5]);
        assert_eq!(src.load_f32("y").unwrap(), [-1.0]);
        assert!(WeightsSummary::of(src.as_ref()).fp16_variant, "{index_name}");
    }
}

#[test]
fn sharded_index_naming_a_missing_shard_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_safetensors(&dir.join("a.safetensors"), &[("x", vec![1], vec![1.0])], "F32");
    write_json(
        &dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}),
    );
    let err = find_weights(dir, DIFFUSERS).err().unwrap();
    assert!(
        matches!(&err, Error::NotFound { path, .. } if path.ends_with("b.safetensors")),
        "{err}"
    );

    write_json(
        &dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}),
    );
    let err = find_weights(dir, DIFFUSERS).err().unwrap();
    assert!(
        matches!(&err, Error::MissingWeight { name, .. } if name == "y"),
        "{err}"
    );

    write_json(
        &dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"x": "../a.safetensors"}}),
    );
    let err = find_weights(dir, DIFFUSERS).err().unwrap();
    assert!(matches!(&err, Error::Config { .. }), "{err}");
}

#[test]
fn formats_counts() {
    assert_eq!(format_count(0), "0");
    assert_eq!(format_count(999), "999");
    assert_eq!(format_count(1_500), "1.50 K");
    assert_eq!(format_count(1_234_567), "1.23 M");
    assert_eq!(format_count(872_000_000), "872.00 M");
    assert_eq!(format_count(2_500_000_000), "2.50 B");
}

// ---------------------------------------------------------------- hub cache

/// A cache holding the txt2img fixture as `CompVis/ldm-text2im-large-256` at COMMIT.
fn build_cache(cache: &Path) -> PathBuf {
    let repo = cache.join("models--CompVis--ldm-text2im-large-256");
    let snapshot = repo.join("snapshots").join(COMMIT);
    copy_dir(&fixture("txt2img-tiny"), &snapshot);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), format!("{COMMIT}\n")).unwrap();
    snapshot
}

#[test]
fn hub_ids_resolve_through_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let snapshot = build_cache(tmp.path());
    assert_eq!(resolve_model_in(HUB_ID, tmp.path(), false).unwrap(), snapshot);
    // A commit hash needs no ref file; a branch does.
    assert_eq!(
        resolve_model_in(&format!("{HUB_ID}@{COMMIT}"), tmp.path(), false).unwrap(),
        snapshot
    );
    let id = HubId::parse(&format!("{HUB_ID}@v2")).unwrap();
    assert_eq!(cached_snapshot(tmp.path(), &id), None);
    // The resolved folder opens as the pipeline.
    let folder = ModelFolder::open(resolve_model_in(HUB_ID, tmp.path(), false).unwrap()).unwrap();
    assert_eq!(folder.components.len(), 5);
    // A local folder wins, whatever the cache holds.
    let local = fixture("superres-tiny");
    assert_eq!(
        resolve_model_in(local.to_str().unwrap(), tmp.path(), false).unwrap(),
        local
    );
}

#[test]
fn a_snapshot_without_model_files_is_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let snapshot = build_cache(tmp.path());
    std::fs::remove_file(snapshot.join("model_index.json")).unwrap();
    let err = resolve_model_in(HUB_ID, tmp.path(), false).unwrap_err();
    assert!(matches!(err, Error::NotCached { .. }), "{err}");
}

#[test]
fn offline_miss_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let err = resolve_model_in(HUB_ID, tmp.path(), false).unwrap_err();
    let msg = err.to_string();
    match &err {
        Error::NotCached { model, cache, .. } => {
            assert_eq!(model, HUB_ID);
            assert_eq!(cache, tmp.path());
        }
        other => panic!("expected NotCached, got {other:?}"),
    }
    for part in [
        "is not in the Hugging Face cache",
        "HF_HUB_OFFLINE",
        "huggingface-cli download CompVis/ldm-text2im-large-256",
        "models--CompVis--ldm-text2im-large-256",
        "pass a local folder",
        tmp.path().to_str().unwrap(),
    ] {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }
    let err = resolve_model_in(&format!("{HUB_ID}@v2"), tmp.path(), false).unwrap_err();
    assert!(err.to_string().contains("--revision v2"), "{err}");
    // The same with the options spelt out: no endpoint is even contacted.
    let options = HubOptions {
        cache_dir: tmp.path().to_path_buf(),
        allow_download: false,
        endpoint: Some("http://127.0.0.1:9".into()),
        token: None,
        progress: false,
    };
    let err = resolve_model_with(HUB_ID, &options).unwrap_err();
    assert!(!err.to_string().contains("127.0.0.1"), "{err}");
    // Nothing was written to the cache.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[cfg(feature = "hub")]
#[test]
fn unreachable_hub_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let options = HubOptions {
        cache_dir: tmp.path().to_path_buf(),
        allow_download: true,
        endpoint: Some("http://127.0.0.1:9".into()),
        token: None,
        progress: false,
    };
    let err = resolve_model_with(HUB_ID, &options).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NotCached { .. }), "{msg}");
    for part in [
        "could not be downloaded",
        "127.0.0.1:9",
        "huggingface-cli download",
        "pass a local folder",
    ] {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }
}

#[test]
fn specs_that_are_neither_folders_nor_ids() {
    let tmp = tempfile::tempdir().unwrap();
    for spec in ["./no/such/folder", "/no/such/folder", "nothing-here"] {
        let err = resolve_model_in(spec, tmp.path(), false).unwrap_err();
        match &err {
            Error::NotFound { path, .. } => assert_eq!(path, Path::new(spec)),
            other => panic!("{spec}: expected NotFound, got {other:?}"),
        }
    }
    let file = fixture("txt2img-tiny/model_index.json");
    let err = resolve_model_in(file.to_str().unwrap(), tmp.path(), false).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn options_come_from_the_environment() {
    // The only test that touches the environment, so it cannot race another.
    let saved: HashMap<&str, Option<String>> = ["HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT"]
        .into_iter()
        .map(|k| (k, std::env::var(k).ok()))
        .collect();
    let set = |k: &str, v: Option<&str>| match v {
        Some(v) => std::env::set_var(k, v),
        None => std::env::remove_var(k),
    };
    set("HF_HUB_CACHE", None);
    set("HF_HOME", Some("/hf-home"));
    set("HF_HUB_OFFLINE", Some("1"));
    set("HF_ENDPOINT", Some("http://127.0.0.1:9"));
    let o = HubOptions::from_env();
    assert_eq!(o.cache_dir, Path::new("/hf-home/hub"));
    assert!(!o.allow_download);
    assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9"));

    let tmp = tempfile::tempdir().unwrap();
    let snapshot = build_cache(tmp.path());
    set("HF_HUB_CACHE", tmp.path().to_str());
    set("HF_HUB_OFFLINE", Some("0"));
    let o = HubOptions::from_env();
    assert_eq!(o.cache_dir, tmp.path());
    assert!(o.allow_download);
    assert_eq!(ldm_core::loading::resolve_model(HUB_ID).unwrap(), snapshot);
    set("HF_HUB_OFFLINE", Some("1"));
    let err = ldm_core::loading::resolve_model("CompVis/not-cached").unwrap_err();
    assert!(matches!(err, Error::NotCached { .. }), "{err}");

    for (k, v) in saved {
        set(k, v.as_deref());
    }
}

#[test]
fn class_table_is_consistent() {
    let mut seen = BTreeMap::new();
    for c in ComponentClass::ALL {
        assert_eq!(ComponentClass::from_name(c.name()), Some(c));
        assert!(seen.insert(c.name(), c).is_none());
        assert_eq!(
            c.has_weights(),
            matches!(
                c.kind(),
                ComponentKind::UNet | ComponentKind::Autoencoder | ComponentKind::TextEncoder
            )
        );
    }
    assert_eq!(ComponentClass::LDMBertModel.weight_stems(), ["model", "pytorch_model"]);
    assert_eq!(ComponentClass::PNDMScheduler.config_file(), "scheduler_config.json");
    assert_eq!(ComponentClass::from_name("StableDiffusionSafetyChecker"), None);
}

// ---------------------------------------------------------------- downloads, from a fake hub

/// A minimal stand-in for the hub's HTTP API on 127.0.0.1, serving the files of `root` as the
/// repository `repo` at COMMIT; it records every path asked for.
#[cfg(feature = "hub")]
struct FakeHub {
    endpoint: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

#[cfg(feature = "hub")]
impl FakeHub {
    fn serve(root: PathBuf, repo: &'static str) -> Self {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut range_start = 0usize;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap() <= 2 {
                        break;
                    }
                    let lower = header.to_ascii_lowercase();
                    if let Some(r) = lower.strip_prefix("range: bytes=") {
                        range_start = r.split('-').next().unwrap().trim().parse().unwrap();
                    }
                }
                log.lock().unwrap().push(path.clone());
                let (status, headers, body) = Self::answer(&root, repo, &path, range_start);
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body));
            }
        });
        Self { endpoint, requests }
    }

    fn answer(root: &Path, repo: &str, path: &str, start: usize) -> (&'static str, String, Vec<u8>) {
        if path == format!("/api/models/{repo}/revision/main") {
            let mut files = Vec::new();
            list_files(root, root, &mut files);
            let siblings: Vec<_> = files.iter().map(|f| serde_json::json!({"rfilename": f})).collect();
            let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
            return ("200 OK", "Content-Type: application/json\r\n".into(), body.into_bytes());
        }
        let prefix = format!("/{repo}/resolve/main/");
        let Some(file) = path.strip_prefix(&prefix) else {
            return ("404 Not Found", String::new(), Vec::new());
        };
        let Ok(bytes) = std::fs::read(root.join(file)) else {
            return ("404 Not Found", String::new(), Vec::new());
        };
        let etag = format!("{:016x}{:08x}", hash(file), bytes.len());
        let body = bytes[start.min(bytes.len())..].to_vec();
        let end = bytes.len().saturating_sub(1);
        let headers = format!(
            "ETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Range: bytes {start}-{end}/{}\r\n",
            bytes.len()
        );
        ("206 Partial Content", headers, body)
    }

    fn requested(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

#[cfg(feature = "hub")]
fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

#[cfg(feature = "hub")]
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            list_files(root, &path, out);
        } else {
            out.push(path.strip_prefix(root).unwrap().to_str().unwrap().replace('\\', "/"));
        }
    }
}

#[cfg(feature = "hub")]
#[test]
fn downloads_a_pipeline_into_the_cache_layout() {
    let served = tempfile::tempdir().unwrap();
    copy_dir(&fixture("txt2img-tiny"), served.path());
    // Files a pipeline does not need: other weight forms, a README, a top-level checkpoint.
    for extra in [
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "README.md",
    ] {
        std::fs::write(served.path().join(extra), b"not needed").unwrap();
    }
    std::fs::write(served.path().join("ldm.ckpt"), b"not needed").unwrap();
    let hub = FakeHub::serve(served.path().to_path_buf(), HUB_ID);

    let cache = tempfile::tempdir().unwrap();
    let options = HubOptions {
        cache_dir: cache.path().to_path_buf(),
        allow_download: true,
        endpoint: Some(hub.endpoint.clone()),
        token: None,
        progress: false,
    };
    let dir = resolve_model_with(HUB_ID, &options).unwrap();
    let repo = cache.path().join("models--CompVis--ldm-text2im-large-256");
    assert_eq!(dir, repo.join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap().trim(), COMMIT);

    let requested = hub.requested();
    for unwanted in ["unet/diffusion_pytorch_model.bin", "fp16", "README.md", "ldm.ckpt"] {
        assert!(
            !requested.iter().any(|r| r.contains(unwanted)),
            "{unwanted} requested: {requested:#?}"
        );
    }
    // Every fixture file came down, byte for byte, and the folder opens.
    let mut files = Vec::new();
    list_files(&fixture("txt2img-tiny"), &fixture("txt2img-tiny"), &mut files);
    for f in &files {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(fixture("txt2img-tiny").join(f)).unwrap(),
            "{f}"
        );
    }
    let folder = ModelFolder::open(&dir).unwrap();
    assert_eq!(folder.components.len(), 5);
    let unet = folder.component("unet").unwrap().weights().unwrap();
    assert!(unet.load_f32("conv_in.weight").is_ok());

    // Resolved again: from the cache, without asking the hub.
    let before = hub.requested().len();
    assert_eq!(resolve_model_with(HUB_ID, &options).unwrap(), dir);
    assert_eq!(hub.requested().len(), before);

    // An interrupted download (a weight file gone) is completed from the hub.
    std::fs::remove_file(dir.join("vqvae/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(resolve_model_with(HUB_ID, &options).unwrap(), dir);
    assert!(dir.join("vqvae/diffusion_pytorch_model.safetensors").is_file());
    assert!(hub.requested().len() > before);

    // ... and, with the hub unreachable, handed back as it is for the loader to report.
    std::fs::remove_file(dir.join("vqvae/diffusion_pytorch_model.safetensors")).unwrap();
    let offline = HubOptions {
        endpoint: Some("http://127.0.0.1:9".into()),
        ..options
    };
    assert_eq!(resolve_model_with(HUB_ID, &offline).unwrap(), dir);
}
