//! The fuzz targets: each takes arbitrary bytes, runs one of ldm-core's readers on them, and
//! returns a short "feature" naming what happened (the kind of error with its numbers blanked,
//! or what was read). Any input must give `Ok` or an error: a panic, an abort, a hang or a huge
//! allocation is a bug. The features steer the fuzzer: an input producing a feature not seen
//! before joins the working corpus.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ldm_core::backend::cpu::Cpu;
use ldm_core::loading::{PthFile, SafetensorsFile, TensorMeta, TensorSource};
use ldm_core::models::{autoencoder_kl, config, ldm_bert, unet_2d, unet_2d_condition, vq_model};
use ldm_core::nn::Weights;
use ldm_core::tokenizer::BertTokenizer;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> String,
    /// Tokens the mutator may insert.
    pub dict: &'static [&'static [u8]],
    /// The largest input generated.
    pub max_len: usize,
}

const JSON_DICT: &[&[u8]] = &[
    b"-1", b"0", b"1e309", b"-1e309", b"NaN", b"null", b"true", b"[]", b"{}", b"\"\"", b"18446744073709551616", b"1000000000",
    b"[1,2,3]", b"\"F32\"", b"\"I64\"", b"\"F16\"", b"\"BF16\"", b"\"shape\"", b"\"dtype\"", b"\"data_offsets\"", b"\"__metadata__\"",
    b"\"block_out_channels\"", b"\"layers_per_block\"", b"\"num_train_timesteps\"", b"\"beta_schedule\"", b"\"squaredcos_cap_v2\"",
    b"\"timestep_spacing\"", b"\"trailing\"", b"\"leading\"", b"\"steps_offset\"", b"\"solver_order\"", b"\"trained_betas\"",
    b"\"prediction_type\"", b"\"v_prediction\"", b"\"sample\"", b"\"attention_head_dim\"", b"\"norm_num_groups\"",
];

const PICKLE_DICT: &[&[u8]] = &[
    b"(", b")", b"t", b"R", b"Q", b"u", b"s", b"a", b"e", b"b", b"0", b"1", b"2", b".", b"N", b"}", b"]", b"\x85", b"\x86", b"\x87",
    b"\x88", b"\x89", b"\x93", b"\x94", b"\x81", b"h\x00", b"h\x01", b"q\x00", b"j\xff\xff\xff\xff", b"K\xff", b"M\xff\xff",
    b"J\xff\xff\xff\xff", b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f", b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n",
    b"ctorch\nHalfStorage\n", b"ctorch\nLongStorage\n", b"ccollections\nOrderedDict\n", b"ctorch._utils\n_rebuild_parameter\n",
    b"ctorch._tensor\n_rebuild_from_type_v2\n", b"ctorch\nTensor\n", b"cposix\nsystem\n", b"X\x07\x00\x00\x00storage", b"X\x01\x00\x00\x000",
    b"X\x03\x00\x00\x00cpu", b"\x80\x02", b"\x80\x05", b"\x95\x00\x00\x00\x00\x00\x00\x00\x00",
];

const ZIP_DICT: &[&[u8]] = &[b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"data.pkl", b"archive/data/0", b"\xff\xff\xff\xff"];

const IMAGE_DICT: &[&[u8]] = &[
    b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS", b"iCCP", b"zTXt", b"acTL", b"fcTL", b"\xff\xd8", b"\xff\xd9", b"\xff\xc0", b"\xff\xc2", b"\xff\xc4",
    b"\xff\xda", b"\xff\xdb", b"\xff\xdd", b"\xff\xe1", b"RIFF", b"WEBP", b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF",
    b"\x00\x00\xff\xff", b"\x7f\xff\xff\xff",
];

const TEXT_DICT: &[&[u8]] = &[
    b"[CLS]", b"[SEP]", b"[PAD]", b"[MASK]", b"[UNK]", b"##", b"\0", b"\xe2\x80\x8b", b"\xf0\x9f\x98\x80", b"\xe4\xb8\xad", b"\xcc\x81", b"\t",
    b"\r\n", b"\xff", b"\"do_lower_case\"", b"\"strip_accents\"", b"\"unk_token\"", b"\"pad_token\"", b"\"model\"", b"\"WordPiece\"",
    b"\"normalizer\"", b"\"pre_tokenizer\"", b"\"added_tokens\"",
];

const NPY_DICT: &[&[u8]] = &[b"\x93NUMPY", b"'descr'", b"'<f4'", b"'<f8'", b"'>f4'", b"'fortran_order'", b"True", b"False", b"'shape'", b"(", b")", b",", b"()"];

pub const TARGETS: &[Target] = &[
    Target { name: "safetensors", run: safetensors, dict: JSON_DICT, max_len: 1 << 16 },
    Target { name: "pickle", run: pickle, dict: PICKLE_DICT, max_len: 1 << 16 },
    Target { name: "pth", run: pth, dict: ZIP_DICT, max_len: 1 << 16 },
    Target { name: "config", run: config_target, dict: JSON_DICT, max_len: 1 << 14 },
    Target { name: "tokenizer", run: tokenizer, dict: TEXT_DICT, max_len: 1 << 15 },
    Target { name: "image", run: image, dict: IMAGE_DICT, max_len: 1 << 16 },
    Target { name: "npy", run: npy, dict: NPY_DICT, max_len: 1 << 14 },
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The repository root (fixtures are read from it).
pub fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// An error as a feature: its kind and message with numbers and quoted names blanked, cut short.
fn feature(e: &ldm_core::Error) -> String {
    // Paths (scratch folders, fixture locations) say nothing about what happened.
    let text = e.to_string();
    let words: Vec<&str> = text.split_whitespace().filter(|w| !w.contains('/')).collect();
    format!("{}: {}", e.kind().name(), blank(&words.join(" ")))
}

fn blank(msg: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in msg.chars() {
        if c == '`' {
            quoted = !quoted;
            out.push(c);
        } else if quoted {
            continue;
        } else if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
        if out.len() >= 40 {
            break;
        }
    }
    out
}

/// Loads every tensor of a source (bounded: a fuzzed header may declare huge but empty tensors).
fn load_all(src: &dyn TensorSource) -> String {
    let mut names = src.names();
    names.sort();
    let mut loaded = 0;
    for name in &names {
        let Some(meta) = src.meta(name) else { return "meta missing for a listed name".into() };
        if meta.shape.iter().product::<usize>() > 1 << 22 {
            continue;
        }
        if src.load_f32(name).is_ok() {
            loaded += 1;
        }
    }
    format!("ok: {} tensors, {loaded} loaded", names.len().min(9))
}

fn safetensors(data: &[u8]) -> String {
    match SafetensorsFile::from_bytes(Path::new("fuzz.safetensors"), data.to_vec()) {
        Ok(f) => load_all(&f),
        Err(e) => feature(&e),
    }
}

fn pickle(data: &[u8]) -> String {
    match ldm_core::loading::pickle::read_state_dict(data) {
        Ok(t) => format!("ok: {} tensors", t.len().min(9)),
        Err(e) => format!("pickle: {}", blank(&e)),
    }
}

/// A raw zip (first byte even: all zips start with `P`), or (first byte odd) a pickle to wrap in a
/// well-formed torch.save zip with storages `0` (6 floats), `1` (4 halves) and `2` (1 long), so
/// that mutated pickles reach the storage and stride checks and the tensor reads instead of
/// failing the zip's checksums.
fn pth(data: &[u8]) -> String {
    let bytes = match data.first() {
        Some(b) if b % 2 == 1 => wrap_pickle(&data[1..]),
        _ => data.to_vec(),
    };
    match PthFile::from_bytes(Path::new("fuzz.bin"), bytes) {
        Ok(f) => load_all(&f),
        Err(e) => feature(&e),
    }
}

fn wrap_pickle(pickle: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let storages: [(&str, Vec<u8>); 3] = [
        ("0", [0f32, 1., 2., 3., 4., 5.].iter().flat_map(|v| v.to_le_bytes()).collect()),
        ("1", vec![0, 0x3c, 0, 0x40, 0, 0x42, 0, 0x44]),
        ("2", 3i64.to_le_bytes().to_vec()),
    ];
    let write = || -> zip::result::ZipResult<Vec<u8>> {
        zip.start_file("archive/data.pkl", opts)?;
        zip.write_all(pickle)?;
        for (k, v) in &storages {
            zip.start_file(format!("archive/data/{k}"), opts)?;
            zip.write_all(v)?;
        }
        Ok(zip.finish()?.into_inner())
    };
    write().unwrap_or_default()
}

/// A weight set shared by every iteration (loading the fixture once).
struct Shared(Arc<dyn TensorSource>);

impl TensorSource for Shared {
    fn names(&self) -> Vec<String> {
        self.0.names()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.0.meta(name)
    }
    fn load_f32(&self, name: &str) -> ldm_core::Result<Vec<f32>> {
        self.0.load_f32(name)
    }
    fn location(&self, name: Option<&str>) -> String {
        self.0.location(name)
    }
    fn format(&self) -> String {
        self.0.format()
    }
}

type WeightCache = std::sync::Mutex<Vec<(&'static str, Arc<dyn TensorSource>)>>;

fn fixture_weights(rel: &'static str) -> Weights<Cpu> {
    static CACHE: OnceLock<WeightCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    let src = match c.iter().find(|(k, _)| *k == rel) {
        Some((_, s)) => s.clone(),
        None => {
            let dir = root().join("tests/fixtures").join(rel);
            let stems: &[&str] = if rel.ends_with("bert") { &["model", "pytorch_model"] } else { &["diffusion_pytorch_model"] };
            let s: Arc<dyn TensorSource> = match ldm_core::loading::find_weights(&dir, stems) {
                Ok(s) => Arc::from(s),
                Err(e) => panic!("fixture {rel}: {e}"),
            };
            c.push((rel, s.clone()));
            s
        }
    };
    Weights::new(Cpu, Box::new(Shared(src)))
}

/// A config file: parsed as every model config and built against the matching fixture's
/// weights (so every size check runs, and a config that passes them meets real tensors), and
/// as every scheduler, whose timesteps and steps are then run on a few values.
fn config_target(data: &[u8]) -> String {
    let value: serde_json::Value = match serde_json::from_slice(data) {
        Ok(v) => v,
        Err(_) => return "not json".into(),
    };
    let path = Path::new("fuzz/config.json");
    let mut out = Vec::new();
    macro_rules! model {
        ($cfg:ty, $load:path, $fixture:expr) => {
            match config::parse::<$cfg>(&value, path) {
                Ok(c) => match $load(c, path, &fixture_weights($fixture)) {
                    Ok(_) => out.push("loaded".to_string()),
                    Err(e) => out.push(feature(&e)),
                },
                Err(e) => out.push(feature(&e)),
            }
        };
    }
    model!(unet_2d_condition::UNet2DConditionConfig, unet_2d_condition::UNet2DConditionModel::load, "txt2img-tiny/unet");
    model!(unet_2d::UNet2DConfig, unet_2d::UNet2DModel::load, "superres-tiny/unet");
    model!(autoencoder_kl::AutoencoderKLConfig, autoencoder_kl::AutoencoderKL::load, "txt2img-tiny/vqvae");
    model!(vq_model::VQModelConfig, vq_model::VQModel::load, "superres-tiny/vqvae");
    model!(ldm_bert::LDMBertConfig, ldm_bert::LDMBertModel::load, "txt2img-tiny/bert");
    let steps = 1 + data.iter().fold(0usize, |a, &b| a.wrapping_mul(31).wrapping_add(b as usize)) % 60;
    for (_, class) in ldm_core::schedulers::SCHEDULER_NAMES {
        let mut s = match ldm_core::schedulers::from_config(class, &value, path) {
            Ok(s) => s,
            Err(e) => {
                out.push(feature(&e));
                continue;
            }
        };
        if let Err(e) = s.set_timesteps(steps) {
            out.push(feature(&e));
            continue;
        }
        let mut gen = ldm_core::rng::TorchGenerator::new(0);
        let mut latents = vec![0.5f32, -1.0, 2.0, 0.0];
        let _ = s.init_noise_sigma();
        let n = s.timesteps().len();
        for i in 0..n {
            let input = s.scale_model_input(&latents, i);
            let noise: Vec<f32> = input.iter().map(|v| v * 0.1).collect();
            match s.step(&noise, i, &latents, 0.5, &mut gen) {
                Ok(l) => latents = l,
                Err(e) => {
                    out.push(feature(&e));
                    break;
                }
            }
        }
        out.push(format!("{class} ran"));
    }
    out.join(" | ").chars().take(400).collect()
}

fn fixture_tokenizer() -> &'static BertTokenizer {
    static T: OnceLock<BertTokenizer> = OnceLock::new();
    T.get_or_init(|| match BertTokenizer::from_folder(&root().join("tests/fixtures/txt2img-tiny/tokenizer")) {
        Ok(t) => t,
        Err(e) => panic!("fixture tokenizer: {e}"),
    })
}

/// First byte selects: a prompt for the fixture tokenizer (most inputs), or tokenizer files
/// (`vocab.txt` NUL `tokenizer_config.json`, or a `tokenizer.json`) loaded from a scratch folder.
fn tokenizer(data: &[u8]) -> String {
    let (mode, rest) = match data.split_first() {
        Some((m, r)) => (*m, r),
        None => (0, data),
    };
    match mode % 8 {
        6 | 7 => {
            let dir = std::env::temp_dir().join(format!("ldm-fuzz-tokenizer-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            if std::fs::create_dir_all(&dir).is_err() {
                return "no scratch folder".into();
            }
            if mode % 8 == 6 {
                let (vocab, cfg) = match rest.iter().position(|&b| b == 0) {
                    Some(i) => (&rest[..i], &rest[i + 1..]),
                    None => (rest, &[][..]),
                };
                let _ = std::fs::write(dir.join("vocab.txt"), vocab);
                if !cfg.is_empty() {
                    let _ = std::fs::write(dir.join("tokenizer_config.json"), cfg);
                }
            } else {
                let _ = std::fs::write(dir.join("tokenizer.json"), rest);
            }
            // As the pipeline loads it: the folder's files checked, then read.
            let r = match ldm_core::pipelines::check_tokenizer_files(&dir).and_then(|()| BertTokenizer::from_folder(&dir)) {
                Ok(t) => match t.encode("a red circle [MASK] unaffable ##x \u{4e2d}") {
                    Ok(ids) => format!("files ok: {} ids", ids.len()),
                    Err(e) => feature(&e),
                },
                Err(e) => feature(&e),
            };
            let _ = std::fs::remove_dir_all(&dir);
            r
        }
        _ => {
            let prompt = String::from_utf8_lossy(rest);
            match fixture_tokenizer().encode(&prompt) {
                Ok(ids) => format!("prompt ok: {}", ids.iter().filter(|&&i| i != 0).count().min(9)),
                Err(e) => feature(&e),
            }
        }
    }
}

fn image(data: &[u8]) -> String {
    match ldm_core::image::decode_image(data, "fuzz") {
        Ok((rgb, w, h)) => {
            if rgb.len() != (w as usize) * (h as usize) * 3 {
                panic!("decode_image returned {} bytes for {w}x{h}", rgb.len());
            }
            // The super-resolution preprocessing: Lanczos down to multiples of 32.
            if (w as u64) * (h as u64) <= 1 << 20 && w >= 32 && h >= 32 {
                let out = ldm_core::image::resize_lanczos(&rgb, w, h, w - w % 32, h - h % 32);
                assert_eq!(out.len(), ((w - w % 32) * (h - h % 32) * 3) as usize);
            }
            format!("ok: {}x{}", w.min(99), h.min(99))
        }
        Err(e) => feature(&e),
    }
}

fn npy(data: &[u8]) -> String {
    match ldm_core::image::read_npy_f32(data, "fuzz.npy") {
        Ok((shape, values)) => {
            if shape.iter().product::<usize>() != values.len() {
                panic!("read_npy_f32 returned {} values for shape {shape:?}", values.len());
            }
            format!("ok: {} dims", shape.len())
        }
        Err(e) => feature(&e),
    }
}
