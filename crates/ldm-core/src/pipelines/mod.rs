//! The two LDM pipelines, with parameters, defaults, progress reporting and cancellation.
//!
//! [`Pipeline::load`] reads a diffusers folder (or hub id) and builds the text-to-image or the
//! super-resolution pipeline according to its `model_index.json`; the front ends call
//! [`Pipeline::txt2img`] or [`Pipeline::superres`] on it.

pub mod device;
pub mod memory;
pub mod tiles;
pub mod superres;
pub mod txt2img;

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::loading::folder::{Component, ComponentClass, ComponentKind, ModelFolder};
use crate::models::config;
use crate::nn::Weights;
use crate::schedulers::{self, Scheduler};
use crate::{Error, Result};

pub use device::{AnyPipeline, Device, Precision};
pub use superres::{SuperResParams, SuperResolution};
pub use txt2img::{TextToImage, Txt2ImgParams};

/// What a pipeline is doing when it reports progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Encoding the prompts (text to image) or preparing the input image (super-resolution).
    Encode,
    /// Model call `step` of `total` (1-based).
    Denoise,
    /// Decoding latents to pixels.
    Decode,
}

/// One progress report: `step` of `total` within `stage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub step: usize,
    pub total: usize,
}

/// Called with every progress report; returning `false` cancels the run, which then ends with
/// [`Error::Cancelled`] before the next model call.
pub type ProgressFn<'a> = &'a mut dyn FnMut(Progress) -> bool;

/// Awaited before each model call by the asynchronous forms of the pipelines: the browser front
/// end passes a future that gives the event loop a turn, so that an abort can arrive while the
/// CPU backend computes.
pub type Pause<'a> = &'a dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

pub(crate) async fn pause(p: Option<Pause<'_>>) {
    if let Some(f) = p {
        f().await;
    }
}

pub(crate) fn report(progress: &mut Option<ProgressFn<'_>>, stage: Stage, step: usize, total: usize) -> Result<()> {
    if let Some(f) = progress {
        if !f(Progress { stage, step, total }) {
            return Err(Error::Cancelled);
        }
    }
    Ok(())
}

/// Generated images: `count` images of `height` x `width` RGB, as float32 in [0, 1], laid out
/// `(count, height, width, 3)` exactly as diffusers returns with `output_type="np"`.
#[derive(Clone, Debug, PartialEq)]
pub struct Images {
    pub count: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<f32>,
}

impl Images {
    /// The pixels of image `i` as 8-bit RGB, rounded as diffusers' `numpy_to_pil` does.
    pub fn rgb8(&self, i: usize) -> Vec<u8> {
        let n = self.height * self.width * 3;
        crate::image::to_rgb8(&self.pixels[i * n..(i + 1) * n])
    }
}

/// A loaded pipeline of either kind.
pub enum Pipeline<B: Backend> {
    TextToImage(TextToImage<B>),
    SuperResolution(SuperResolution<B>),
}

impl<B: Backend> Pipeline<B> {
    /// Loads the pipeline of a diffusers folder or hub id (resolved through the Hugging Face
    /// cache, see [`crate::loading::hub`]).
    pub fn load(model: &str, backend: &B) -> Result<Self> {
        let dir = crate::loading::hub::resolve_model(model)?;
        Self::load_folder(&dir, backend)
    }

    pub fn load_folder(dir: &Path, backend: &B) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let has = |c: ComponentClass| folder.components.iter().any(|x| x.class == c);
        if has(ComponentClass::UNet2DConditionModel) {
            Ok(Pipeline::TextToImage(TextToImage::load(&folder, backend)?))
        } else if has(ComponentClass::UNet2DModel) {
            Ok(Pipeline::SuperResolution(SuperResolution::load(&folder, backend)?))
        } else {
            Err(Error::NotFound {
                path: folder.dir.join("model_index.json"),
                what: "a UNet2DConditionModel (text to image) or UNet2DModel (super-resolution) component".into(),
            })
        }
    }

    /// "txt2img" or "superres".
    pub fn kind(&self) -> &'static str {
        match self {
            Pipeline::TextToImage(_) => "txt2img",
            Pipeline::SuperResolution(_) => "superres",
        }
    }

    pub fn txt2img(&self, params: &Txt2ImgParams, progress: Option<ProgressFn<'_>>) -> Result<Images> {
        crate::executor::block_on(self.txt2img_async(params, progress, None))
    }

    pub fn superres(&self, params: &SuperResParams, progress: Option<ProgressFn<'_>>) -> Result<Images> {
        crate::executor::block_on(self.superres_async(params, progress, None))
    }

    /// The asynchronous form of [`Pipeline::txt2img`], for the browser (see [`Pause`]).
    pub async fn txt2img_async(&self, params: &Txt2ImgParams, progress: Option<ProgressFn<'_>>, pause: Option<Pause<'_>>) -> Result<Images> {
        match self {
            Pipeline::TextToImage(p) => p.generate_async(params, progress, pause).await,
            Pipeline::SuperResolution(p) => Err(Error::InvalidArgument(format!(
                "{} is a super-resolution model; text to image needs a text-to-image model",
                p.dir.display()
            ))),
        }
    }

    /// The asynchronous form of [`Pipeline::superres`], for the browser (see [`Pause`]).
    pub async fn superres_async(&self, params: &SuperResParams, progress: Option<ProgressFn<'_>>, pause: Option<Pause<'_>>) -> Result<Images> {
        match self {
            Pipeline::SuperResolution(p) => p.generate_async(params, progress, pause).await,
            Pipeline::TextToImage(p) => Err(Error::InvalidArgument(format!(
                "{} is a text-to-image model; super-resolution needs a super-resolution model",
                p.dir.display()
            ))),
        }
    }
}

/// The component of `kind`, or a NotFound error naming the folder.
pub(crate) fn component<'a>(folder: &'a ModelFolder, kind: ComponentKind, what: &str) -> Result<&'a Component> {
    folder.find_kind(kind).ok_or_else(|| Error::NotFound {
        path: folder.dir.join("model_index.json"),
        what: format!("a {what} component"),
    })
}

/// Builds a model from a component folder: parses its config, opens its weights, and refuses
/// weight files holding tensors the config does not account for.
pub(crate) fn load_model<B: Backend, C: serde::de::DeserializeOwned, M>(
    c: &Component,
    backend: &B,
    build: impl FnOnce(C, &Path, &Weights<B>) -> Result<M>,
) -> Result<M> {
    let path = c.config_path();
    let cfg: C = config::parse(&c.config()?, &path)?;
    let w = Weights::new(backend.clone(), c.weights()?);
    let model = build(cfg, &path, &w)?;
    let unused = w.unused();
    if !unused.is_empty() {
        let shown: Vec<&str> = unused.iter().take(5).map(|s| s.as_str()).collect();
        return Err(Error::BadWeights {
            path: PathBuf::from(w.source().location(None)),
            msg: format!(
                "{} tensor(s) not used by the model its config describes: {}{}",
                unused.len(),
                shown.join(", "),
                if unused.len() > 5 { ", ..." } else { "" }
            ),
        });
    }
    Ok(model)
}

/// The scheduler config of a folder, kept to build a fresh scheduler for every run.
#[derive(Clone, Debug)]
pub(crate) struct SchedulerSource {
    class: String,
    config: serde_json::Value,
    path: PathBuf,
}

impl SchedulerSource {
    pub(crate) fn load(folder: &ModelFolder) -> Result<Self> {
        let c = component(folder, ComponentKind::Scheduler, "scheduler")?;
        Ok(Self { class: c.class.name().to_string(), config: c.config()?, path: c.config_path() })
    }

    /// The folder's own scheduler, or the one named (`ddim`, `pndm`, `lms`, `euler`, `euler-a`,
    /// `dpm++`) built from the same config file.
    pub(crate) fn build(&self, name: Option<&str>) -> Result<Box<dyn Scheduler>> {
        let class = match name {
            Some(n) => schedulers::class_for_name(n)?,
            None => self.class.as_str(),
        };
        schedulers::from_config(class, &self.config, &self.path)
    }
}

/// Checks a float parameter is finite.
pub(crate) fn check_finite(name: &str, v: f32) -> Result<()> {
    if !v.is_finite() {
        return Err(Error::InvalidArgument(format!("{name} must be a finite number, got {v}")));
    }
    Ok(())
}

/// Checks a tokenizer folder's `tokenizer.json`, if any, is well-formed JSON before the
/// `tokenizers` crate reads it: that crate panics (rather than erring) on some malformed files,
/// e.g. a raw control character inside a string of its `decoder` section.
pub fn check_tokenizer_files(dir: &Path) -> Result<()> {
    let path = dir.join("tokenizer.json");
    if !crate::vfs::is_file(&path) {
        return Ok(());
    }
    let bytes = crate::vfs::read(&path).map_err(|e| Error::Io { path: path.clone(), source: e })?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::Tokenizer { path: path.clone(), msg: format!("not valid JSON: {e}") })?;
    if let Some(pp) = json.get("post_processor") {
        check_template_tokens(pp, 0).map_err(|msg| Error::Tokenizer { path, msg })?;
    }
    Ok(())
}

/// A `TemplateProcessing` post-processor must define every special token its templates name;
/// `tokenizers` does not check this when it reads the file and panics on the first encode.
fn check_template_tokens(pp: &serde_json::Value, depth: usize) -> std::result::Result<(), String> {
    if depth > 8 {
        return Err("post_processor nests too deeply".into());
    }
    match pp.get("type").and_then(|t| t.as_str()) {
        Some("TemplateProcessing") => {
            let defined = pp.get("special_tokens").and_then(|t| t.as_object());
            for key in ["single", "pair"] {
                for piece in pp.get(key).and_then(|t| t.as_array()).into_iter().flatten() {
                    let Some(id) = piece.get("SpecialToken").and_then(|t| t.get("id")).and_then(|t| t.as_str()) else { continue };
                    if !defined.is_some_and(|d| d.contains_key(id)) {
                        return Err(format!("post_processor.{key} uses the special token `{id}`, which its special_tokens do not define"));
                    }
                }
            }
            Ok(())
        }
        Some("Sequence") => {
            for p in pp.get("processors").and_then(|t| t.as_array()).into_iter().flatten() {
                check_template_tokens(p, depth + 1)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The longest prompt accepted, in characters. The text encoder sees 77 tokens, so anything
/// much longer is a mistake (a file passed as a prompt), not a description.
pub const MAX_PROMPT_CHARS: usize = 10_000;

/// Checks prompt `i` (0-based) is of a sane length and holds no NUL character (C strings
/// cannot carry one, so a prompt with NUL would mean different things on different front ends).
pub(crate) fn check_prompt(i: usize, prompt: &str) -> Result<()> {
    let chars = prompt.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(Error::InvalidArgument(format!(
            "prompt {} is {chars} characters long; at most {MAX_PROMPT_CHARS} are accepted (the text encoder reads 77 tokens)",
            i + 1
        )));
    }
    if let Some(at) = prompt.chars().position(|c| c == '\0') {
        return Err(Error::InvalidArgument(format!("prompt {} holds a NUL character at position {at}", i + 1)));
    }
    Ok(())
}

/// Checks the model's output holds numbers, so NaN weights or an overflow give an error rather
/// than a black image.
pub(crate) fn check_output(what: &str, v: &[f32]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite { what: what.to_string(), value: v[i], index: i });
    }
    Ok(())
}
