//! `ldm txt2img` and `ldm superres`: run a pipeline and write its images.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;
use ldm_core::pipelines::{AnyPipeline, Device, Precision, Progress, Stage, SuperResParams, Txt2ImgParams};
use ldm_core::{Error, Result};

use crate::output;

/// Options shared by both generation commands.
#[derive(Args, Debug)]
pub struct Common {
    /// The model: a diffusers folder or a hub id ORG/NAME[@REVISION] [default: the shipped model
    /// (models/ldm-shapes, models/ldm-shapes-superres), or $LDM_MODEL / $LDM_SUPERRES_MODEL].
    #[arg(long, value_name = "PATH_OR_ID")]
    pub model: Option<String>,
    /// Denoising steps [default: 50 for txt2img, 100 for superres].
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
    /// DDIM's eta: 0 is deterministic, 1 is DDPM-like; other schedulers ignore it.
    #[arg(long, value_name = "E", default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f32,
    /// Seed of the torch-compatible generator (same image as diffusers with
    /// torch.Generator().manual_seed(S)).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Scheduler: ddim, pndm, lms, euler, euler-a or dpm++ [default: the model's own].
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<String>,
    /// Output file: .png (8-bit; a batch gives NAME-0.png, NAME-1.png, ...) or .npy (float32
    /// (batch, height, width, 3) in [0, 1], as diffusers' output_type="np").
    #[arg(long, short, value_name = "FILE")]
    pub output: PathBuf,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Where to compute: cpu, or gpu (the GPU backend: Vulkan, Metal or DX12 through wgpu; on
    /// a Linux machine without a GPU, Mesa's software driver lavapipe).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: String,
    /// CPU threads for this run; 0 (the default) uses every core.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Weights on the CPU: f32 (diffusers' numbers), or bf16 for linear layers and, on Intel AMX,
    /// convolutions (half their memory, faster on CPUs with AMX or AVX512-BF16, slightly different
    /// images; see the README).
    #[arg(long, value_name = "P", default_value = "f32")]
    pub precision: String,
}

/// `ldm txt2img`: images from text prompts.
#[derive(Args, Debug)]
pub struct Txt2ImgArgs {
    #[command(flatten)]
    pub common: Common,
    /// A prompt; repeat the flag for a batch (one image per prompt).
    #[arg(long, value_name = "TEXT", required = true)]
    pub prompt: Vec<String>,
    /// Classifier-free guidance scale; 1 disables guidance.
    #[arg(long, value_name = "G", default_value_t = 1.0, allow_negative_numbers = true)]
    pub guidance: f32,
    /// Image height in pixels, a multiple of 8 [default: the model's].
    #[arg(long, value_name = "H")]
    pub height: Option<usize>,
    /// Image width in pixels, a multiple of 8 [default: the model's].
    #[arg(long, value_name = "W")]
    pub width: Option<usize>,
    /// Initial latents (float32 .npy of shape (batch, C, H/8, W/8)) instead of drawing them from
    /// the seed.
    #[arg(long, value_name = "FILE.npy")]
    pub latents: Option<PathBuf>,
}

/// `ldm superres`: a 4x larger image.
#[derive(Args, Debug)]
pub struct SuperResArgs {
    #[command(flatten)]
    pub common: Common,
    /// The input image (PNG, JPEG or WebP), at least 32x32; sides are cut down to multiples of
    /// 32 by Lanczos resizing.
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })
}

/// Which shipped model a command falls back to when `--model` is absent.
#[derive(Clone, Copy)]
enum Shipped {
    Txt2Img,
    SuperRes,
}

impl Shipped {
    /// The environment variable that overrides the shipped model, and the folder in the
    /// repository. The folder is baked in at compile time from this crate's location, so it only
    /// exists for binaries run from (or built in) a checkout; an installed binary needs the
    /// variable or `--model`.
    fn default(self) -> (&'static str, &'static str) {
        match self {
            Shipped::Txt2Img => ("LDM_MODEL", concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/ldm-shapes")),
            Shipped::SuperRes => {
                ("LDM_SUPERRES_MODEL", concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/ldm-shapes-superres"))
            }
        }
    }
}

/// `--model`, else the environment variable, else the shipped model of the repository.
fn model_spec(common: &Common, shipped: Shipped) -> Result<String> {
    if let Some(m) = &common.model {
        return Ok(m.clone());
    }
    let (var, dir) = shipped.default();
    if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Ok(v.to_string_lossy().into_owned());
    }
    let path = Path::new(dir);
    if !path.join("model_index.json").is_file() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
            what: format!(
                "the shipped model (this binary was built in a checkout that no longer has it); pass --model or set {var}"
            ),
        });
    }
    // a tidy path for messages and PNG metadata: CARGO_MANIFEST_DIR/../../models/x -> ROOT/models/x
    Ok(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()).display().to_string())
}

fn load(common: &Common, model: &str) -> Result<AnyPipeline> {
    let device = Device::parse(&common.device)?;
    let precision = Precision::parse(&common.precision)?;
    output::check_target(&common.output)?;
    let dir = crate::resolve_model(model)?;
    AnyPipeline::load_folder_with(&dir, device, precision)
}

pub fn txt2img(a: &Txt2ImgArgs) -> Result<()> {
    let latents = match &a.latents {
        Some(path) => {
            let (_, data) = ldm_core::image::read_npy_f32(&read_file(path)?, &path.display().to_string())?;
            Some(data)
        }
        None => None,
    };
    let c = &a.common;
    let model = model_spec(c, Shipped::Txt2Img)?;
    let pipeline = load(c, &model)?;
    let params = Txt2ImgParams {
        prompts: a.prompt.clone(),
        steps: c.steps.unwrap_or(50),
        guidance: a.guidance,
        eta: c.eta,
        seed: c.seed,
        scheduler: c.scheduler.clone(),
        height: a.height,
        width: a.width,
        latents,
    };
    let threads = ldm_core::threads::Threads::new(c.threads)?;
    let mut bar = ProgressBar::new(c.quiet);
    let images = threads.run(|| pipeline.txt2img(&params, Some(&mut |p| bar.update(p) && !crate::interrupt::requested())))?;
    bar.finish();
    let meta = |i: usize| {
        vec![
            ("prompt".to_string(), a.prompt[i].clone()),
            ("seed".to_string(), c.seed.to_string()),
            ("steps".to_string(), params.steps.to_string()),
            ("scheduler".to_string(), c.scheduler.clone().unwrap_or_else(|| "model default".into())),
            ("guidance".to_string(), a.guidance.to_string()),
            ("eta".to_string(), c.eta.to_string()),
            ("model".to_string(), model.clone()),
        ]
    };
    output::write_images(&c.output, &images, meta)
}

pub fn superres(a: &SuperResArgs) -> Result<()> {
    let c = &a.common;
    let bytes = read_file(&a.image)?;
    let (rgb, w, h) = ldm_core::image::decode_image(&bytes, &a.image.display().to_string())?;
    let model = model_spec(c, Shipped::SuperRes)?;
    let pipeline = load(c, &model)?;
    let params = SuperResParams {
        rgb,
        width: w as usize,
        height: h as usize,
        steps: c.steps.unwrap_or(100),
        eta: c.eta,
        seed: c.seed,
        scheduler: c.scheduler.clone(),
    };
    let threads = ldm_core::threads::Threads::new(c.threads)?;
    let mut bar = ProgressBar::new(c.quiet);
    let images = threads.run(|| pipeline.superres(&params, Some(&mut |p| bar.update(p) && !crate::interrupt::requested())))?;
    bar.finish();
    let meta = |_| {
        vec![
            ("source".to_string(), a.image.display().to_string()),
            ("seed".to_string(), c.seed.to_string()),
            ("steps".to_string(), params.steps.to_string()),
            ("scheduler".to_string(), c.scheduler.clone().unwrap_or_else(|| "model default".into())),
            ("eta".to_string(), c.eta.to_string()),
            ("model".to_string(), model.clone()),
        ]
    };
    output::write_images(&c.output, &images, meta)
}

/// Progress on stderr: a bar for the denoising steps, words for encoding and decoding. Quiet
/// when stderr is not a terminal or with `--quiet`.
struct ProgressBar {
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressBar {
    fn new(quiet: bool) -> Self {
        if quiet || !std::io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let bar = indicatif::ProgressBar::new(1);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {elapsed_precise} (eta {eta})") {
            bar.set_style(style.progress_chars("=> "));
        }
        Self { bar: Some(bar) }
    }

    fn update(&mut self, p: Progress) -> bool {
        if let Some(bar) = &self.bar {
            let msg = match p.stage {
                Stage::Encode => "encoding",
                Stage::Denoise => "denoising",
                Stage::Decode => "decoding",
            };
            bar.set_message(msg);
            bar.set_length(p.total as u64);
            bar.set_position(p.step as u64);
        }
        true
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

