//! ldm in the browser: the LDM pipelines of ldm-core on WebGPU, or on the CPU in wasm, behind
//! a JavaScript API (built with `scripts/build-web.sh` into `web/pkg/`).
//!
//! ```js
//! import init, { LdmPipeline } from "./pkg/ldm_wasm.js";
//! await init();
//! const p = await LdmPipeline.load("models/ldm-shapes/", { device: "auto", onProgress });
//! const out = await p.txt2img({ prompt: "a red circle", steps: 20, guidance: 4, seed: 0 });
//! // out: { count, width, height, pixels: Float32Array (count*height*width*3, in [0, 1]) }
//! ```
//!
//! Errors reject the promise with an `Error` whose `message` says what was wrong and whose
//! `name` is the error's class (`"invalid-argument"`, `"not-found"`, `"bad-model"`,
//! `"unsupported"`, `"out-of-memory"`, `"internal"`), or `"AbortError"` for an aborted run.
//!
//! Built for wasm32 only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]

mod files;
mod options;

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;

use ldm_core::backend::cpu::Cpu;
use ldm_core::backend::wgpu::{Gpu, GpuOptions};
use ldm_core::pipelines::{Images, Pipeline, Progress, Stage};
use ldm_core::{Error, ErrorKind};
use wasm_bindgen::prelude::*;

use options::{Opts, ProgressSink};

enum Inner {
    Cpu(Pipeline<Cpu>),
    Gpu(Pipeline<Gpu>),
}

/// A loaded pipeline (text to image or super-resolution), on WebGPU or the CPU.
#[wasm_bindgen]
pub struct LdmPipeline {
    inner: Rc<Inner>,
    adapter: String,
    /// Where the files were mounted, and the URL they came from (messages name the URL).
    root: PathBuf,
    base_url: Rc<str>,
}

// Each load mounts its files under a root of its own.
thread_local!(static NEXT_ROOT: Cell<u32> = const { Cell::new(0) });

#[wasm_bindgen]
impl LdmPipeline {
    /// Loads the diffusers folder served at `baseUrl` (`model_index.json` and the component
    /// folders). Options: `device` ("auto": WebGPU where the browser has it, else the CPU;
    /// "webgpu"; "cpu"), `f16Weights` (keep weights as f16 on the GPU, default false), `cache`
    /// (keep downloads in the Cache API, default true), `onProgress({stage: "download", file,
    /// loaded, total})`.
    pub async fn load(base_url: String, options: JsValue) -> Result<LdmPipeline, JsValue> {
        let o = Opts::new(options, "load options").map_err(to_js)?;
        let device = o.string("device")?.unwrap_or_else(|| "auto".into());
        if !["auto", "webgpu", "cpu"].contains(&device.as_str()) {
            return Err(js_error("invalid-argument", &format!("device must be \"auto\", \"webgpu\" or \"cpu\", got {device:?}")));
        }
        let f16 = o.bool("f16Weights")?.unwrap_or(false);
        let cache = o.bool("cache")?.unwrap_or(true);
        let progress = ProgressSink::new(o.function("onProgress")?);

        let id = NEXT_ROOT.with(|n| {
            let v = n.get();
            n.set(v + 1);
            v
        });
        let root = PathBuf::from(format!("/ldm-web/{id}"));
        files::fetch_folder(&base_url, &root, cache, &progress).await.map_err(|e| to_js_at(e, &root, &base_url))?;

        let gpu = if device == "cpu" {
            None
        } else {
            match Gpu::new_async(GpuOptions { f16_weights: f16, ..Default::default() }).await {
                Ok(g) => Some(g),
                Err(e) if device == "webgpu" => {
                    ldm_core::vfs::unmount_all(&root);
                    return Err(to_js(e));
                }
                Err(_) => None,
            }
        };
        let loaded = match gpu {
            Some(g) => {
                let adapter = g.adapter_info().name.clone();
                Pipeline::load_folder(&root, &g).map(|p| (Inner::Gpu(p), if adapter.is_empty() { "WebGPU adapter".into() } else { adapter }))
            }
            None => Pipeline::load_folder(&root, &Cpu).map(|p| (Inner::Cpu(p), String::new())),
        };
        // The weights now live in the pipeline; only small files would stay mounted.
        ldm_core::vfs::unmount_all(&root);
        let (inner, adapter) = loaded.map_err(|e| to_js_at(e, &root, &base_url))?;
        Ok(LdmPipeline { inner: Rc::new(inner), adapter, root, base_url: base_url.into() })
    }

    /// The backend in use: "webgpu" or "cpu".
    pub fn backend(&self) -> String {
        match &*self.inner {
            Inner::Cpu(_) => "cpu".into(),
            Inner::Gpu(_) => "webgpu".into(),
        }
    }

    /// The GPU adapter's name ("" on the CPU).
    #[wasm_bindgen(js_name = adapterName)]
    pub fn adapter_name(&self) -> String {
        self.adapter.clone()
    }

    /// "txt2img" or "superres".
    pub fn kind(&self) -> String {
        match &*self.inner {
            Inner::Cpu(p) => p.kind().into(),
            Inner::Gpu(p) => p.kind().into(),
        }
    }

    /// Text to image. Options: `prompt` (a string or an array of strings), `steps` (50),
    /// `guidance` (1), `eta` (0), `seed` (0), `height`/`width` (the model's size), `scheduler`
    /// ("ddim", "pndm", "lms", "euler", "euler-a", "dpm++"; the model's), `latents`
    /// (Float32Array), `onProgress({stage, step, total})`, `signal` (an AbortSignal). Resolves to
    /// `{count, width, height, pixels}`.
    pub fn txt2img(&self, options: JsValue) -> js_sys::Promise {
        let inner = self.inner.clone();
        let (root, base_url) = (self.root.clone(), self.base_url.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let o = Opts::new(options, "txt2img options").map_err(to_js)?;
            let params = o.txt2img_params()?;
            let run = Run::new(&o)?;
            let mut report = |p: Progress| run.report(p);
            let pause = run.pause(&inner);
            let images = match &*inner {
                Inner::Cpu(p) => p.txt2img_async(&params, Some(&mut report), pause.as_deref()).await,
                Inner::Gpu(p) => p.txt2img_async(&params, Some(&mut report), pause.as_deref()).await,
            };
            run.finish(images, &root, &base_url)
        })
    }

    /// 4x super-resolution. Options: `image` (an ImageData, or `{width, height, data}` with RGBA
    /// bytes), `steps` (100), `eta` (0), `seed` (0), `scheduler`, `onProgress`, `signal`.
    pub fn superres(&self, options: JsValue) -> js_sys::Promise {
        let inner = self.inner.clone();
        let (root, base_url) = (self.root.clone(), self.base_url.clone());
        wasm_bindgen_futures::future_to_promise(async move {
            let o = Opts::new(options, "superres options").map_err(to_js)?;
            let params = o.superres_params()?;
            let run = Run::new(&o)?;
            let mut report = |p: Progress| run.report(p);
            let pause = run.pause(&inner);
            let images = match &*inner {
                Inner::Cpu(p) => p.superres_async(&params, Some(&mut report), pause.as_deref()).await,
                Inner::Gpu(p) => p.superres_async(&params, Some(&mut report), pause.as_deref()).await,
            };
            run.finish(images, &root, &base_url)
        })
    }
}

impl Drop for LdmPipeline {
    fn drop(&mut self) {
        ldm_core::vfs::unmount_all(&self.root);
    }
}

/// One run's progress callback and abort signal.
struct Run {
    on_progress: Option<js_sys::Function>,
    signal: Option<JsValue>,
}

impl Run {
    fn new(o: &Opts) -> Result<Self, JsValue> {
        let signal = o.object("signal")?;
        let run = Self { on_progress: o.function("onProgress")?, signal };
        if run.aborted() {
            return Err(abort_error());
        }
        Ok(run)
    }

    fn aborted(&self) -> bool {
        self.signal
            .as_ref()
            .and_then(|s| js_sys::Reflect::get(s, &"aborted".into()).ok())
            .is_some_and(|v| v.is_truthy())
    }

    /// Reports to `onProgress` (an exception thrown there is ignored) and returns whether to go on.
    fn report(&self, p: Progress) -> bool {
        if let Some(f) = &self.on_progress {
            let stage = match p.stage {
                Stage::Encode => "encode",
                Stage::Denoise => "denoise",
                Stage::Decode => "decode",
            };
            let obj = js_sys::Object::new();
            let _ = js_sys::Reflect::set(&obj, &"stage".into(), &stage.into());
            let _ = js_sys::Reflect::set(&obj, &"step".into(), &(p.step as f64).into());
            let _ = js_sys::Reflect::set(&obj, &"total".into(), &(p.total as f64).into());
            let _ = f.call1(&JsValue::NULL, &obj);
        }
        !self.aborted()
    }

    /// On the CPU nothing else yields to the event loop during a run, so each step waits for the
    /// next turn, where an abort can arrive. On WebGPU every step already awaits the GPU.
    #[allow(clippy::type_complexity)]
    fn pause(&self, inner: &Inner) -> Option<Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>> {
        match inner {
            Inner::Gpu(_) => None,
            Inner::Cpu(_) => Some(Box::new(|| {
                Box::pin(async {
                    let _ = files::next_turn().await;
                })
            })),
        }
    }

    fn finish(&self, images: ldm_core::Result<Images>, root: &std::path::Path, base_url: &str) -> Result<JsValue, JsValue> {
        match images {
            Ok(images) => Ok(images_to_js(&images)),
            Err(e) if e.kind() == ErrorKind::Cancelled => Err(abort_error()),
            Err(e) => Err(to_js_at(e, root, base_url)),
        }
    }
}

fn images_to_js(images: &Images) -> JsValue {
    let obj = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&obj, &"count".into(), &(images.count as f64).into());
    let _ = js_sys::Reflect::set(&obj, &"width".into(), &(images.width as f64).into());
    let _ = js_sys::Reflect::set(&obj, &"height".into(), &(images.height as f64).into());
    let pixels = js_sys::Float32Array::from(images.pixels.as_slice());
    let _ = js_sys::Reflect::set(&obj, &"pixels".into(), &pixels);
    obj.into()
}

/// An `Error` with the message and, as its `name`, the error's class.
pub(crate) fn js_error(name: &str, message: &str) -> JsValue {
    let e = js_sys::Error::new(message);
    e.set_name(name);
    e.into()
}

pub(crate) fn to_js(e: Error) -> JsValue {
    js_error(e.kind().name(), &e.to_string())
}

fn abort_error() -> JsValue {
    js_error("AbortError", "the run was aborted (its AbortSignal fired)")
}

/// The error with the model's URL in place of the internal mount point.
fn to_js_at(e: Error, root: &std::path::Path, base_url: &str) -> JsValue {
    let msg = e.to_string().replace(&root.display().to_string(), base_url.trim_end_matches('/'));
    js_error(e.kind().name(), &msg)
}
