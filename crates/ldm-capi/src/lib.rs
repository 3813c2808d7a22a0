//! libldm: the C ABI of ldm. `include/ldm.h` is generated from this file by cbindgen (the test
//! `tests/header.rs` fails when it is stale), so the doc comments here are the C documentation.
//!
//! This crate only translates: C structs and strings in, `ldm_core` calls, C structs out. Every
//! entry point runs inside [`guard`], which catches panics, maps `ldm_core::Error` to an
//! [`LdmStatus`] and keeps the message for `ldm_last_error()`.

#![allow(non_camel_case_types, clippy::missing_safety_doc)]
#![deny(missing_docs)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::ptr;

use ldm_core::loading::{resolve_model_with, HubOptions};
use ldm_core::pipelines::superres::MAX_INPUT_SIDE;
use ldm_core::pipelines::txt2img::MAX_PROMPTS;
use ldm_core::pipelines::{AnyPipeline, Device, Images, Precision, Progress, Stage, SuperResParams, Txt2ImgParams};
use ldm_core::threads::Threads;
use ldm_core::{Error, ErrorKind};

const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The result of a call. Every failure also sets the message of ldm_last_error().
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LdmStatus {
    /// Success.
    LDM_OK = 0,
    /// A parameter is not acceptable: a NULL pointer, a wrong struct_size, a string that is not
    /// valid UTF-8, a size or value out of range, an unknown scheduler name, an input image that
    /// cannot be decoded, an output path that cannot be written, or a pipeline of the other kind.
    LDM_ERR_INVALID_ARGUMENT = 1,
    /// The model folder, one of its files, or the hub id (neither in the Hugging Face cache nor
    /// downloadable) does not exist.
    LDM_ERR_NOT_FOUND = 2,
    /// The model's files are damaged or inconsistent: configs, weights, tokenizer, or weights that
    /// produce NaN or infinite values.
    LDM_ERR_BAD_MODEL = 3,
    /// Something this library does not support: a model class, a weight dtype, a device.
    LDM_ERR_UNSUPPORTED = 4,
    /// The run would need more memory than the machine has available; refused before it starts.
    LDM_ERR_OUT_OF_MEMORY = 5,
    /// The progress callback returned false.
    LDM_CANCELLED = 6,
    /// A bug in the library (a caught Rust panic) or a failure that is nobody's input.
    LDM_ERR_INTERNAL = 7,
}

/// Where a pipeline computes (LdmLoadOptions.device).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LdmDevice {
    /// The CPU (every build).
    LDM_DEVICE_CPU = 0,
    /// A GPU through Vulkan, Metal or DX12 (on Linux without a GPU, Mesa's lavapipe). Where
    /// there is no usable adapter, loading returns LDM_ERR_UNSUPPORTED with the reason.
    LDM_DEVICE_GPU = 1,
}

/// How the CPU keeps the weights (LdmLoadOptions.precision).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LdmPrecision {
    /// f32: diffusers' numbers.
    LDM_PRECISION_F32 = 0,
    /// bf16 weights for linear layers (and, on Intel AMX, for convolutions), multiplied in bf16
    /// with f32 sums: half those weights' memory, faster on CPUs with AMX or AVX512-BF16 (slower
    /// elsewhere), slightly different images. CPU only.
    LDM_PRECISION_BF16 = 1,
}

/// What a loaded pipeline does (ldm_pipeline_kind()).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LdmPipelineKind {
    /// Returned for a NULL pipeline.
    LDM_PIPELINE_NONE = 0,
    /// Text to image: use ldm_txt2img().
    LDM_PIPELINE_TXT2IMG = 1,
    /// 4x super-resolution: use ldm_superres().
    LDM_PIPELINE_SUPERRES = 2,
}

/// A loaded model, made by ldm_pipeline_load() and released by ldm_pipeline_free(). Opaque.
pub struct LdmPipeline {
    pipeline: AnyPipeline,
    threads: Threads,
}

// One pipeline may be used from several threads at once (the header promises it), so the type
// must stay Send + Sync; this fails to compile if a change in ldm-core breaks that.
#[allow(dead_code)]
fn assert_pipeline_is_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<LdmPipeline>();
}

/// Reports progress and offers to cancel. It is called before each denoising model call, with
/// step = 0 .. total_steps - 1, and once after the last one with step == total_steps.
/// total_steps is the number of model calls of the run (the PNDM scheduler makes more calls than
/// steps). Return true to go on, false to cancel: the call then stops before its next model call
/// and returns LDM_CANCELLED. `user` is the params' progress_user, passed through. The callback
/// must not unwind (C++ exceptions, longjmp) through the library, and must not free the pipeline.
pub type LdmProgressFn = Option<unsafe extern "C" fn(user: *mut c_void, step: u32, total_steps: u32) -> bool>;

/// How ldm_pipeline_load() loads a model. Start from ldm_load_options_default().
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LdmLoadOptions {
    /// sizeof(LdmLoadOptions), set by ldm_load_options_default(); lets later versions add fields.
    pub struct_size: u32,
    /// CPU threads for this pipeline's runs, at most 1024. 0 (the default): every core, through
    /// the library's shared pools; n > 0: a pool of n threads of this pipeline's own. Element-wise
    /// operations always use one process-wide pool, sized by the environment variable
    /// CANDLE_NUM_THREADS or RAYON_NUM_THREADS when set before the first run.
    pub threads: u32,
    /// An LdmDevice value (default LDM_DEVICE_CPU).
    pub device: u32,
    /// Non-zero: never download; a hub id must already be in the cache. 0 (the default): download a
    /// missing hub id unless the environment variable HF_HUB_OFFLINE=1 forbids it.
    pub offline: u32,
    /// The Hugging Face hub cache folder (the one holding models--ORG--NAME). NULL (the default):
    /// $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub. Copied during the call.
    pub cache_dir: *const c_char,
    /// An LdmPrecision value (default LDM_PRECISION_F32); LDM_PRECISION_BF16 needs
    /// LDM_DEVICE_CPU.
    pub precision: u32,
}

/// The parameters of a text-to-image run. Start from ldm_txt2img_params_default(), which gives
/// the pipeline's defaults, then set at least prompts and prompt_count. Pointers are only read
/// during the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LdmTxt2ImgParams {
    /// sizeof(LdmTxt2ImgParams), set by ldm_txt2img_params_default(); lets later versions add fields.
    pub struct_size: u32,
    /// prompt_count prompts (UTF-8, NUL-terminated), one image each.
    pub prompts: *const *const c_char,
    /// 1 to 64.
    pub prompt_count: usize,
    /// Denoising steps (default 50).
    pub steps: u32,
    /// Classifier-free guidance scale (default 1: no guidance; above 1, guidance with the empty prompt).
    pub guidance: f32,
    /// DDIM's eta (default 0: deterministic); other schedulers ignore it.
    pub eta: f32,
    /// Seed of the torch-compatible generator (default 0): the same seed gives the same image as
    /// diffusers with torch.Generator().manual_seed(seed).
    pub seed: u64,
    /// Image height in pixels, a multiple of 8; 0 (the default): the model's.
    pub height: u32,
    /// Image width in pixels, a multiple of 8; 0 (the default): the model's.
    pub width: u32,
    /// "ddim", "pndm", "lms", "euler", "euler-a" or "dpm++"; NULL (the default): the model's own.
    pub scheduler: *const c_char,
    /// NULL (the default): initial latents drawn from the seed. Else latent_count floats, the
    /// initial latents of shape (prompt_count, C, height/8, width/8), C order (C is the UNet's
    /// input channels, 4 for the published model).
    pub latents: *const f32,
    /// The number of floats at latents; must be exactly what the run needs (0 when latents is NULL).
    pub latent_count: usize,
    /// Called with progress; NULL (the default): none.
    pub progress: LdmProgressFn,
    /// Passed to progress as `user`.
    pub progress_user: *mut c_void,
}

/// The parameters of a 4x super-resolution run. Start from ldm_superres_params_default(), then
/// set rgb, width and height. Pointers are only read during the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LdmSuperResParams {
    /// sizeof(LdmSuperResParams), set by ldm_superres_params_default(); lets later versions add fields.
    pub struct_size: u32,
    /// The input image: width * height * 3 bytes of 8-bit RGB, row-major, no padding. At least
    /// 32x32 and at most 4096 a side; sides are cut down to multiples of 32 with Pillow-compatible
    /// Lanczos resizing, and the output is four times larger.
    pub rgb: *const u8,
    /// Input width in pixels.
    pub width: u32,
    /// Input height in pixels.
    pub height: u32,
    /// Denoising steps (default 100).
    pub steps: u32,
    /// DDIM's eta (default 0); other schedulers ignore it.
    pub eta: f32,
    /// Seed of the torch-compatible generator (default 0).
    pub seed: u64,
    /// "ddim", "pndm", "lms", "euler", "euler-a" or "dpm++"; NULL (the default): the model's own.
    pub scheduler: *const c_char,
    /// Called with progress; NULL (the default): none.
    pub progress: LdmProgressFn,
    /// Passed to progress as `user`.
    pub progress_user: *mut c_void,
}

/// Images made by the library. Read the fields; release with ldm_images_free(). Independent of
/// the pipeline that made them.
#[repr(C)]
#[derive(Debug)]
pub struct LdmImages {
    /// The number of images (one per prompt).
    pub count: u32,
    /// Width of each image in pixels.
    pub width: u32,
    /// Height of each image in pixels.
    pub height: u32,
    /// count * height * width * 3 bytes: the images one after another, each row-major RGB
    /// (rounded as diffusers' numpy_to_pil does).
    pub rgb8: *const u8,
    /// The same pixels as floats in [0, 1] (count * height * width * 3): exactly what diffusers
    /// returns with output_type="np", and what the ldm command writes to .npy.
    pub rgb_f32: *const f32,
}

/// What an `LdmImages *` really points at: the public struct first, then the buffers it points into.
#[repr(C)]
struct ImagesBox {
    images: LdmImages,
    rgb8: Vec<u8>,
    rgb_f32: Vec<f32>,
}

// ---------------------------------------------------------------------------------------------
// Errors, panics and the thread-local message.

/// A failed call: the status and the sentence for ldm_last_error().
#[derive(Debug)]
struct Failure {
    status: LdmStatus,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let message = match e {
            Error::Cancelled => "cancelled: the progress callback returned false".to_string(),
            ref e => e.to_string(),
        };
        Failure { status: status_of(e.kind()), message }
    }
}

fn status_of(kind: ErrorKind) -> LdmStatus {
    match kind {
        ErrorKind::InvalidArgument => LdmStatus::LDM_ERR_INVALID_ARGUMENT,
        ErrorKind::NotFound => LdmStatus::LDM_ERR_NOT_FOUND,
        ErrorKind::BadModel => LdmStatus::LDM_ERR_BAD_MODEL,
        ErrorKind::Unsupported => LdmStatus::LDM_ERR_UNSUPPORTED,
        ErrorKind::OutOfMemory => LdmStatus::LDM_ERR_OUT_OF_MEMORY,
        ErrorKind::Cancelled => LdmStatus::LDM_CANCELLED,
        ErrorKind::Internal => LdmStatus::LDM_ERR_INTERNAL,
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure { status: LdmStatus::LDM_ERR_INVALID_ARGUMENT, message: message.into() }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs the body of an entry point: clears ldm_last_error(), catches panics, and turns a failure
/// into its status and message (prefixed with the function's name).
fn guard(function: &str, body: impl FnOnce() -> Result<(), Failure>) -> LdmStatus {
    set_last_error("");
    let (status, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return LdmStatus::LDM_OK,
        Ok(Err(f)) => (f.status, f.message),
        Err(payload) => {
            let msg = panic_message(&*payload);
            // Dropping a payload runs foreign code; a panic there must not escape either.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            let version = VERSION.trim_end_matches('\0');
            (LdmStatus::LDM_ERR_INTERNAL, format!("internal error: {msg} (a bug in libldm {version}; please report it)"))
        }
    };
    set_last_error(&format!("{function}: {message}"));
    status
}

// ---------------------------------------------------------------------------------------------
// Reading what C hands over.

fn aligned<T>(p: *const T) -> bool {
    p.is_aligned()
}

/// A required struct whose first field is `uint32_t struct_size`, checked before the rest is read.
unsafe fn read_struct<T: Copy>(p: *const T, arg: &str, type_name: &str, default_fn: &str) -> Result<T, Failure> {
    if p.is_null() {
        return Err(invalid(format!("`{arg}` is NULL")));
    }
    if !aligned(p) {
        return Err(invalid(format!("`{arg}` ({p:p}) is not aligned for {type_name}")));
    }
    let size = ptr::read(p as *const u32);
    let expected = std::mem::size_of::<T>();
    if size as usize != expected {
        let version = VERSION.trim_end_matches('\0');
        return Err(invalid(format!(
            "{arg}->struct_size is {size}, but {type_name} of libldm {version} has {expected} bytes; \
             initialise it with {default_fn}() of the same version"
        )));
    }
    Ok(ptr::read(p))
}

/// A NUL-terminated UTF-8 string, or None for NULL.
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    CStr::from_ptr(p).to_str().map(Some).map_err(|e| {
        invalid(format!("{what} is not valid UTF-8 (invalid byte at offset {})", e.valid_up_to()))
    })
}

unsafe fn req_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    opt_str(p, what)?.ok_or_else(|| invalid(format!("`{what}` is NULL")))
}

/// An out-parameter, set to NULL before anything else happens.
unsafe fn out_ptr<'a, T>(out: *mut *mut T) -> Result<&'a mut *mut T, Failure> {
    if out.is_null() {
        return Err(invalid("`out` is NULL"));
    }
    if !aligned(out) {
        return Err(invalid(format!("`out` ({out:p}) is not aligned for a pointer")));
    }
    *out = ptr::null_mut();
    Ok(&mut *out)
}

unsafe fn pipeline_ref<'a>(p: *const LdmPipeline) -> Result<&'a LdmPipeline, Failure> {
    if p.is_null() {
        return Err(invalid("`pipeline` is NULL"));
    }
    Ok(&*p)
}

fn opt_size(v: u32) -> Option<usize> {
    (v != 0).then_some(v as usize)
}

/// Copies `n` values from C, refusing NULL and misaligned pointers, and reporting an allocation
/// failure as LDM_ERR_OUT_OF_MEMORY rather than aborting.
unsafe fn copy_from_c<T: Copy>(p: *const T, n: usize, what: &str) -> Result<Vec<T>, Failure> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(invalid(format!("`{what}` is NULL")));
    }
    if !aligned(p) {
        return Err(invalid(format!("`{what}` ({p:p}) is not aligned for its element type")));
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Failure {
        status: LdmStatus::LDM_ERR_OUT_OF_MEMORY,
        message: format!("out of memory copying {n} values of `{what}`"),
    })?;
    v.extend_from_slice(std::slice::from_raw_parts(p, n));
    Ok(v)
}

/// The C progress callback, carried to the pipeline's threads. The caller waits while it runs,
/// so handing `user` to another thread is what the header documents.
#[derive(Clone, Copy)]
struct CProgress {
    f: LdmProgressFn,
    user: *mut c_void,
}

unsafe impl Send for CProgress {}

impl CProgress {
    fn report(&self, p: Progress) -> bool {
        match (self.f, p.stage) {
            (Some(f), Stage::Denoise) => {
                let step = u32::try_from(p.step).unwrap_or(u32::MAX);
                let total = u32::try_from(p.total).unwrap_or(u32::MAX);
                unsafe { f(self.user, step, total) }
            }
            _ => true,
        }
    }
}

fn images_out(images: Images) -> Result<*mut LdmImages, Failure> {
    let dim = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Failure { status: LdmStatus::LDM_ERR_INTERNAL, message: format!("{what} {v} exceeds uint32_t") })
    };
    let public = LdmImages {
        count: dim(images.count, "image count")?,
        width: dim(images.width, "width")?,
        height: dim(images.height, "height")?,
        rgb8: ptr::null(),
        rgb_f32: ptr::null(),
    };
    let rgb8 = ldm_core::image::to_rgb8(&images.pixels);
    let mut b = Box::new(ImagesBox { images: public, rgb8, rgb_f32: images.pixels });
    b.images.rgb8 = b.rgb8.as_ptr();
    b.images.rgb_f32 = b.rgb_f32.as_ptr();
    Ok(Box::into_raw(b) as *mut LdmImages)
}

// ---------------------------------------------------------------------------------------------
// The entry points.

/// The library's version, e.g. "0.1.0" (static storage; never NULL).
#[no_mangle]
pub extern "C" fn ldm_version() -> *const c_char {
    VERSION.as_ptr() as *const c_char
}

/// The message of the last failure on the calling thread: one sentence naming what was wrong
/// (the file, field or value) and what was expected, prefixed with the function's name. "" after
/// a call that succeeded. Every function that returns an LdmStatus sets it; the pointer stays
/// valid until the next such call on the same thread. Never NULL.
#[no_mangle]
pub extern "C" fn ldm_last_error() -> *const c_char {
    LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

/// The name of an LdmStatus value, e.g. "LDM_ERR_NOT_FOUND" (static storage; never NULL;
/// "LDM_STATUS_UNKNOWN" for a value that is not a status).
#[no_mangle]
pub extern "C" fn ldm_status_name(status: c_int) -> *const c_char {
    let name: &CStr = match status {
        0 => c"LDM_OK",
        1 => c"LDM_ERR_INVALID_ARGUMENT",
        2 => c"LDM_ERR_NOT_FOUND",
        3 => c"LDM_ERR_BAD_MODEL",
        4 => c"LDM_ERR_UNSUPPORTED",
        5 => c"LDM_ERR_OUT_OF_MEMORY",
        6 => c"LDM_CANCELLED",
        7 => c"LDM_ERR_INTERNAL",
        _ => c"LDM_STATUS_UNKNOWN",
    };
    name.as_ptr()
}

/// The default load options: every core, the CPU with f32 weights, downloads as the environment
/// allows, the default hub cache.
#[no_mangle]
pub extern "C" fn ldm_load_options_default() -> LdmLoadOptions {
    LdmLoadOptions {
        struct_size: std::mem::size_of::<LdmLoadOptions>() as u32,
        threads: 0,
        device: LdmDevice::LDM_DEVICE_CPU as u32,
        offline: 0,
        cache_dir: ptr::null(),
        precision: LdmPrecision::LDM_PRECISION_F32 as u32,
    }
}

/// Loads a model: a diffusers folder (with model_index.json), or a hub id "ORG/NAME[@REVISION]"
/// looked up in the Hugging Face cache and downloaded there when missing and allowed, as the ldm
/// command does. The folder's UNet decides the kind: text to image or super-resolution.
/// `options` may be NULL for the defaults. On success *out is the pipeline (release it with
/// ldm_pipeline_free()); on failure *out is NULL.
#[no_mangle]
pub unsafe extern "C" fn ldm_pipeline_load(
    model: *const c_char,
    options: *const LdmLoadOptions,
    out: *mut *mut LdmPipeline,
) -> LdmStatus {
    guard("ldm_pipeline_load", || {
        let out = out_ptr(out)?;
        let model = req_str(model, "model")?;
        let options = if options.is_null() {
            ldm_load_options_default()
        } else {
            read_struct(options, "options", "LdmLoadOptions", "ldm_load_options_default")?
        };
        let device = match options.device {
            d if d == LdmDevice::LDM_DEVICE_CPU as u32 => Device::Cpu,
            d if d == LdmDevice::LDM_DEVICE_GPU as u32 => Device::Gpu,
            d => return Err(invalid(format!("options->device is {d}, not an LdmDevice (LDM_DEVICE_CPU = 0, LDM_DEVICE_GPU = 1)"))),
        };
        let precision = match options.precision {
            p if p == LdmPrecision::LDM_PRECISION_F32 as u32 => Precision::F32,
            p if p == LdmPrecision::LDM_PRECISION_BF16 as u32 => Precision::Bf16,
            p => {
                return Err(invalid(format!(
                    "options->precision is {p}, not an LdmPrecision (LDM_PRECISION_F32 = 0, LDM_PRECISION_BF16 = 1)"
                )))
            }
        };
        if precision != Precision::F32 && device != Device::Cpu {
            return Err(invalid("options->precision is LDM_PRECISION_BF16, which needs options->device LDM_DEVICE_CPU"));
        }
        let threads = Threads::new(options.threads as usize).map_err(|e| match e {
            Error::InvalidArgument(m) => invalid(format!("options->{m}")),
            e => e.into(),
        })?;
        let mut hub = HubOptions::from_env();
        if let Some(dir) = opt_str(options.cache_dir, "options->cache_dir")? {
            hub.cache_dir = PathBuf::from(dir);
        }
        if options.offline != 0 {
            hub.allow_download = false;
        }
        let dir = resolve_model_with(model, &hub)?;
        let pipeline = AnyPipeline::load_folder_with(&dir, device, precision).map_err(|e| match e {
            Error::Unsupported(m) => Failure {
                status: LdmStatus::LDM_ERR_UNSUPPORTED,
                message: format!("options->device is LDM_DEVICE_GPU, but {m}; use LDM_DEVICE_CPU"),
            },
            e => e.into(),
        })?;
        *out = Box::into_raw(Box::new(LdmPipeline { pipeline, threads }));
        Ok(())
    })
}

/// Releases a pipeline. NULL is a no-op. Must not run while another call uses the pipeline.
#[no_mangle]
pub unsafe extern "C" fn ldm_pipeline_free(pipeline: *mut LdmPipeline) {
    if !pipeline.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(pipeline))));
    }
}

/// What the pipeline does: LDM_PIPELINE_TXT2IMG or LDM_PIPELINE_SUPERRES (LDM_PIPELINE_NONE for
/// NULL).
#[no_mangle]
pub unsafe extern "C" fn ldm_pipeline_kind(pipeline: *const LdmPipeline) -> LdmPipelineKind {
    match pipeline.as_ref().map(|p| p.pipeline.kind()) {
        None => LdmPipelineKind::LDM_PIPELINE_NONE,
        Some("txt2img") => LdmPipelineKind::LDM_PIPELINE_TXT2IMG,
        Some(_) => LdmPipelineKind::LDM_PIPELINE_SUPERRES,
    }
}

/// The pipeline's defaults for text to image: 50 steps, guidance 1, eta 0, seed 0, the model's
/// size and scheduler, latents from the seed, no progress callback, no prompts.
#[no_mangle]
pub extern "C" fn ldm_txt2img_params_default() -> LdmTxt2ImgParams {
    let d = Txt2ImgParams::default();
    LdmTxt2ImgParams {
        struct_size: std::mem::size_of::<LdmTxt2ImgParams>() as u32,
        prompts: ptr::null(),
        prompt_count: 0,
        steps: d.steps as u32,
        guidance: d.guidance,
        eta: d.eta,
        seed: d.seed,
        height: 0,
        width: 0,
        scheduler: ptr::null(),
        latents: ptr::null(),
        latent_count: 0,
        progress: None,
        progress_user: ptr::null_mut(),
    }
}

/// The pipeline's defaults for super-resolution: 100 steps, eta 0, seed 0, the model's
/// scheduler, no progress callback, no image.
#[no_mangle]
pub extern "C" fn ldm_superres_params_default() -> LdmSuperResParams {
    let d = SuperResParams::default();
    LdmSuperResParams {
        struct_size: std::mem::size_of::<LdmSuperResParams>() as u32,
        rgb: ptr::null(),
        width: 0,
        height: 0,
        steps: d.steps as u32,
        eta: d.eta,
        seed: d.seed,
        scheduler: ptr::null(),
        progress: None,
        progress_user: ptr::null_mut(),
    }
}

/// Text to image on a pipeline of kind LDM_PIPELINE_TXT2IMG. On success *out holds one image per
/// prompt (release with ldm_images_free()); on failure *out is NULL. A progress callback that
/// returns false makes it return LDM_CANCELLED. May run at the same time as other calls on the
/// same or other pipelines (see "Threads" at the top of this file).
#[no_mangle]
pub unsafe extern "C" fn ldm_txt2img(
    pipeline: *const LdmPipeline,
    params: *const LdmTxt2ImgParams,
    out: *mut *mut LdmImages,
) -> LdmStatus {
    guard("ldm_txt2img", || {
        let out = out_ptr(out)?;
        let p = pipeline_ref(pipeline)?;
        let c = read_struct(params, "params", "LdmTxt2ImgParams", "ldm_txt2img_params_default")?;
        if c.prompt_count == 0 {
            return Err(invalid("params->prompt_count is 0; at least one prompt is needed"));
        }
        if c.prompt_count > MAX_PROMPTS {
            return Err(invalid(format!("params->prompt_count is {}; at most {MAX_PROMPTS} prompts per run", c.prompt_count)));
        }
        let ptrs = copy_from_c(c.prompts, c.prompt_count, "params->prompts")?;
        let mut prompts = Vec::with_capacity(ptrs.len());
        for (i, &s) in ptrs.iter().enumerate() {
            prompts.push(req_str(s, &format!("params->prompts[{i}]"))?.to_string());
        }
        let mut params = Txt2ImgParams {
            prompts,
            steps: c.steps as usize,
            guidance: c.guidance,
            eta: c.eta,
            seed: c.seed,
            scheduler: opt_str(c.scheduler, "params->scheduler")?.map(String::from),
            height: opt_size(c.height),
            width: opt_size(c.width),
            latents: None,
        };
        if c.latents.is_null() {
            if c.latent_count != 0 {
                return Err(invalid(format!("params->latent_count is {} but params->latents is NULL", c.latent_count)));
            }
        } else if let Some(shape) = p.pipeline.latent_shape(&params)? {
            let n: usize = shape.iter().product();
            if c.latent_count != n {
                return Err(invalid(format!(
                    "params->latent_count is {}, but this run's initial latents have shape {shape:?}: {n} floats",
                    c.latent_count
                )));
            }
            params.latents = Some(copy_from_c(c.latents, n, "params->latents")?);
        }
        let progress = CProgress { f: c.progress, user: c.progress_user };
        let pipeline = &p.pipeline;
        let images = p.threads.run(move || {
            let mut report = |pr: Progress| progress.report(pr);
            pipeline.txt2img(&params, Some(&mut report))
        })?;
        *out = images_out(images)?;
        Ok(())
    })
}

/// 4x super-resolution on a pipeline of kind LDM_PIPELINE_SUPERRES. On success *out holds one
/// image four times the (cropped) input size (release with ldm_images_free()); on failure *out is
/// NULL. A progress callback that returns false makes it return LDM_CANCELLED.
#[no_mangle]
pub unsafe extern "C" fn ldm_superres(
    pipeline: *const LdmPipeline,
    params: *const LdmSuperResParams,
    out: *mut *mut LdmImages,
) -> LdmStatus {
    guard("ldm_superres", || {
        let out = out_ptr(out)?;
        let p = pipeline_ref(pipeline)?;
        let c = read_struct(params, "params", "LdmSuperResParams", "ldm_superres_params_default")?;
        let (w, h) = (c.width as usize, c.height as usize);
        // Sizes out of range are copied as nothing, so that only ldm-core words the refusal.
        let n = if (1..=MAX_INPUT_SIDE).contains(&w) && (1..=MAX_INPUT_SIDE).contains(&h) { w * h * 3 } else { 0 };
        let rgb = copy_from_c(c.rgb, n, "params->rgb")?;
        let params = SuperResParams {
            rgb,
            width: w,
            height: h,
            steps: c.steps as usize,
            eta: c.eta,
            seed: c.seed,
            scheduler: opt_str(c.scheduler, "params->scheduler")?.map(String::from),
        };
        let progress = CProgress { f: c.progress, user: c.progress_user };
        let pipeline = &p.pipeline;
        let images = p.threads.run(move || {
            let mut report = |pr: Progress| progress.report(pr);
            pipeline.superres(&params, Some(&mut report))
        })?;
        *out = images_out(images)?;
        Ok(())
    })
}

/// Releases images made by the library. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn ldm_images_free(images: *mut LdmImages) {
    if !images.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(images as *mut ImagesBox))));
    }
}

/// Decodes a PNG, JPEG or WebP file held in memory (len bytes at data) into one 8-bit RGB image,
/// e.g. the input of ldm_superres(). On success *out holds it (count 1, rgb_f32 = rgb8 / 255;
/// release with ldm_images_free()); on failure *out is NULL.
#[no_mangle]
pub unsafe extern "C" fn ldm_decode_image(data: *const u8, len: usize, out: *mut *mut LdmImages) -> LdmStatus {
    guard("ldm_decode_image", || {
        let out = out_ptr(out)?;
        if data.is_null() {
            return Err(invalid("`data` is NULL"));
        }
        let bytes = std::slice::from_raw_parts(data, len);
        let (rgb, w, h) = ldm_core::image::decode_image(bytes, "the image")?;
        let pixels = rgb.iter().map(|&v| v as f32 / 255.0).collect();
        *out = images_out(Images { count: 1, width: w as usize, height: h as usize, pixels })?;
        Ok(())
    })
}

/// Writes image `index` (0 .. count - 1) of `images` (made by ldm_txt2img(), ldm_superres() or
/// ldm_decode_image()) to `path` as an 8-bit RGB PNG file, replacing the file if it exists.
#[no_mangle]
pub unsafe extern "C" fn ldm_images_write_png(images: *const LdmImages, index: u32, path: *const c_char) -> LdmStatus {
    guard("ldm_images_write_png", || {
        if images.is_null() {
            return Err(invalid("`images` is NULL"));
        }
        let b = &*(images as *const ImagesBox);
        let path = Path::new(req_str(path, "path")?);
        let (count, w, h) = (b.images.count, b.images.width, b.images.height);
        if index >= count {
            return Err(invalid(format!("index {index} is out of range: the images hold {count}")));
        }
        let n = w as usize * h as usize * 3;
        let rgb = &b.rgb8[index as usize * n..(index as usize + 1) * n];
        let png = ldm_core::image::encode_png(rgb, w, h, &[])?;
        std::fs::write(path, png).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        unsafe { CStr::from_ptr(ldm_last_error()) }.to_str().unwrap().to_string()
    }

    #[test]
    fn a_panic_becomes_ldm_err_internal_with_its_message() {
        let s = guard("ldm_test", || panic!("boom {}", 42));
        assert_eq!(s, LdmStatus::LDM_ERR_INTERNAL);
        let e = last_error();
        assert!(e.starts_with("ldm_test: internal error: boom 42 (a bug in libldm"), "{e}");
        assert_eq!(guard("ldm_test", || Ok(())), LdmStatus::LDM_OK);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn every_error_kind_has_a_status_and_every_status_a_name() {
        for (kind, status) in [
            (ErrorKind::InvalidArgument, LdmStatus::LDM_ERR_INVALID_ARGUMENT),
            (ErrorKind::NotFound, LdmStatus::LDM_ERR_NOT_FOUND),
            (ErrorKind::BadModel, LdmStatus::LDM_ERR_BAD_MODEL),
            (ErrorKind::Unsupported, LdmStatus::LDM_ERR_UNSUPPORTED),
            (ErrorKind::OutOfMemory, LdmStatus::LDM_ERR_OUT_OF_MEMORY),
            (ErrorKind::Cancelled, LdmStatus::LDM_CANCELLED),
            (ErrorKind::Internal, LdmStatus::LDM_ERR_INTERNAL),
        ] {
            assert_eq!(status_of(kind), status);
            let name = unsafe { CStr::from_ptr(ldm_status_name(status as c_int)) }.to_str().unwrap();
            assert_eq!(name, format!("{status:?}"));
        }
        let unknown = unsafe { CStr::from_ptr(ldm_status_name(99)) };
        assert_eq!(unknown.to_str().unwrap(), "LDM_STATUS_UNKNOWN");
    }

    #[test]
    fn a_message_with_a_nul_byte_survives() {
        set_last_error("a\0b");
        assert_eq!(last_error(), "a\\0b");
    }
}
