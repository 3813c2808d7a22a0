//! Reading the JavaScript option objects, with errors that name the field and what was expected.

use ldm_core::pipelines::{SuperResParams, Txt2ImgParams};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use crate::js_error;

fn invalid(msg: String) -> JsValue {
    js_error("invalid-argument", &msg)
}

/// An options object (`undefined` and `null` read as empty).
pub(crate) struct Opts {
    obj: JsValue,
    what: &'static str,
}

impl Opts {
    pub(crate) fn new(obj: JsValue, what: &'static str) -> ldm_core::Result<Self> {
        if !(obj.is_undefined() || obj.is_null() || obj.is_object()) {
            return Err(ldm_core::Error::InvalidArgument(format!("{what} must be an object")));
        }
        Ok(Self { obj, what })
    }

    fn get(&self, key: &str) -> Option<JsValue> {
        if !self.obj.is_object() {
            return None;
        }
        let v = js_sys::Reflect::get(&self.obj, &key.into()).ok()?;
        (!v.is_undefined() && !v.is_null()).then_some(v)
    }

    fn bad(&self, key: &str, expected: &str, v: &JsValue) -> JsValue {
        let shown = js_sys::JSON::stringify(v).ok().and_then(|s| s.as_string()).unwrap_or_else(|| format!("{v:?}"));
        let shown: String = if shown.chars().count() > 80 { shown.chars().take(80).chain("...".chars()).collect() } else { shown };
        invalid(format!("{}: `{key}` must be {expected}, got {shown}", self.what))
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<String>, JsValue> {
        self.get(key).map(|v| v.as_string().ok_or_else(|| self.bad(key, "a string", &v))).transpose()
    }

    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>, JsValue> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.bad(key, "true or false", &v))).transpose()
    }

    pub(crate) fn number(&self, key: &str) -> Result<Option<f64>, JsValue> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.bad(key, "a number", &v))).transpose()
    }

    /// A finite float (NaN and infinities are refused by the pipelines with their own message).
    fn float(&self, key: &str) -> Result<Option<f32>, JsValue> {
        Ok(self.number(key)?.map(|v| v as f32))
    }

    /// A whole number in `0..=max`.
    fn count(&self, key: &str, max: f64) -> Result<Option<usize>, JsValue> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(n) if n.fract() == 0.0 && (0.0..=max).contains(&n) => Ok(Some(n as usize)),
                _ => Err(self.bad(key, &format!("a whole number from 0 to {max}"), &v)),
            },
        }
    }

    pub(crate) fn function(&self, key: &str) -> Result<Option<js_sys::Function>, JsValue> {
        self.get(key).map(|v| v.clone().dyn_into::<js_sys::Function>().map_err(|_| self.bad(key, "a function", &v))).transpose()
    }

    pub(crate) fn object(&self, key: &str) -> Result<Option<JsValue>, JsValue> {
        self.get(key).map(|v| if v.is_object() { Ok(v) } else { Err(self.bad(key, "an object", &v)) }).transpose()
    }

    /// The seed: a whole number from 0 to 2^53 (JavaScript's exact integers), or a BigInt.
    fn seed(&self) -> Result<Option<u64>, JsValue> {
        match self.get("seed") {
            None => Ok(None),
            Some(v) if v.is_bigint() => u64::try_from(v.clone()).map(Some).map_err(|_| self.bad("seed", "a whole number from 0 to 2^64-1", &v)),
            // Not through `count`: usize is 32 bits on wasm32.
            Some(v) => match v.as_f64() {
                Some(n) if n.fract() == 0.0 && (0.0..=9_007_199_254_740_991.0).contains(&n) => Ok(Some(n as u64)),
                _ => Err(self.bad("seed", "a whole number from 0 to 2^53 (or a BigInt up to 2^64-1)", &v)),
            },
        }
    }

    fn scheduler(&self) -> Result<Option<String>, JsValue> {
        self.string("scheduler")
    }

    pub(crate) fn txt2img_params(&self) -> Result<Txt2ImgParams, JsValue> {
        let d = Txt2ImgParams::default();
        let prompts = match self.get("prompt") {
            None => return Err(invalid(format!("{}: `prompt` is required (a string or an array of strings)", self.what))),
            Some(v) if v.is_string() => vec![v.as_string().unwrap_or_default()],
            Some(v) if js_sys::Array::is_array(&v) => {
                let a = js_sys::Array::from(&v);
                let mut out = Vec::new();
                for (i, p) in a.iter().enumerate() {
                    out.push(p.as_string().ok_or_else(|| self.bad(&format!("prompt[{i}]"), "a string", &p))?);
                }
                out
            }
            Some(v) => return Err(self.bad("prompt", "a string or an array of strings", &v)),
        };
        let latents = match self.get("latents") {
            None => None,
            Some(v) => Some(
                v.dyn_ref::<js_sys::Float32Array>().map(|a| a.to_vec()).ok_or_else(|| self.bad("latents", "a Float32Array", &v))?,
            ),
        };
        Ok(Txt2ImgParams {
            prompts,
            steps: self.count("steps", 10_000.0)?.unwrap_or(d.steps),
            guidance: self.float("guidance")?.unwrap_or(d.guidance),
            eta: self.float("eta")?.unwrap_or(d.eta),
            seed: self.seed()?.unwrap_or(d.seed),
            scheduler: self.scheduler()?,
            height: self.count("height", 65_536.0)?,
            width: self.count("width", 65_536.0)?,
            latents,
        })
    }

    pub(crate) fn superres_params(&self) -> Result<SuperResParams, JsValue> {
        let d = SuperResParams::default();
        let image = self.get("image").ok_or_else(|| invalid(format!("{}: `image` is required (an ImageData or {{width, height, data}})", self.what)))?;
        let img = Opts { obj: image, what: "superres options: image" };
        let width = img.count("width", 1e9)?.ok_or_else(|| invalid("superres options: image: `width` is required".into()))?;
        let height = img.count("height", 1e9)?.ok_or_else(|| invalid("superres options: image: `height` is required".into()))?;
        let data = img.get("data").ok_or_else(|| invalid("superres options: image: `data` (RGBA bytes) is required".into()))?;
        let rgba: Vec<u8> = if let Some(a) = data.dyn_ref::<js_sys::Uint8ClampedArray>() {
            a.to_vec()
        } else if let Some(a) = data.dyn_ref::<js_sys::Uint8Array>() {
            a.to_vec()
        } else {
            return Err(img.bad("data", "a Uint8ClampedArray or Uint8Array of RGBA bytes", &data));
        };
        let expected = width.checked_mul(height).and_then(|n| n.checked_mul(4));
        if expected != Some(rgba.len()) {
            return Err(invalid(format!(
                "superres options: image: `data` holds {} bytes; {width}x{height} RGBA needs {}",
                rgba.len(),
                expected.map_or("more than can be addressed".to_string(), |n| n.to_string())
            )));
        }
        let rgb = rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
        Ok(SuperResParams {
            rgb,
            width,
            height,
            steps: self.count("steps", 10_000.0)?.unwrap_or(d.steps),
            eta: self.float("eta")?.unwrap_or(d.eta),
            seed: self.seed()?.unwrap_or(d.seed),
            scheduler: self.scheduler()?,
        })
    }
}

/// Reports download progress to the load's `onProgress`.
pub(crate) struct ProgressSink {
    f: Option<js_sys::Function>,
}

impl ProgressSink {
    pub(crate) fn new(f: Option<js_sys::Function>) -> Self {
        Self { f }
    }

    /// A JS function `(loaded, total)` that reports `{stage: "download", file, loaded, total}`
    /// (kept alive by the returned closure, to be dropped once the download is over).
    pub(crate) fn download_callback(&self, file: &str) -> Closure<dyn Fn(f64, f64)> {
        let f = self.f.clone();
        let file = file.to_string();
        Closure::<dyn Fn(f64, f64)>::new(move |loaded: f64, total: f64| {
            let Some(f) = &f else { return };
            let obj = js_sys::Object::new();
            let _ = js_sys::Reflect::set(&obj, &"stage".into(), &"download".into());
            let _ = js_sys::Reflect::set(&obj, &"file".into(), &file.as_str().into());
            let _ = js_sys::Reflect::set(&obj, &"loaded".into(), &loaded.into());
            let _ = js_sys::Reflect::set(&obj, &"total".into(), &total.into());
            let _ = f.call1(&JsValue::NULL, &obj);
        })
    }
}
