//! The GPU backend: WGSL compute kernels run through `wgpu` (feature `webgpu`). Natively it runs
//! on Vulkan, Metal or DX12 (and on Mesa's software Vulkan driver, lavapipe, where there is no
//! GPU); compiled to wasm32 the same kernels run on the browser's WebGPU.
//!
//! How it works:
//! - A tensor is a list of buffers ("chunks"), each holding a contiguous range of its elements and
//!   none larger than what one storage binding may hold (`maxStorageBufferBindingSize`,
//!   `maxBufferSize`, or a smaller `GpuOptions::max_binding_bytes`). Chunks start on whole rows of
//!   the first dimension where possible, so a weight too large for one binding splits into blocks
//!   of output channels (linear, conv) or of table rows (embedding). Almost every tensor of a real
//!   model is one chunk; an operation whose operands or result do not fit is split on the host
//!   into pieces that do (along batch, rows, channels or groups), and the pieces are joined with
//!   buffer-to-buffer copies, which have no binding limit. Nothing is truncated: what cannot be
//!   split further (one row longer than a binding) is an error that says so.
//! - Shapes live on the host. A forward pass only records work; `download` is the one readback.
//! - Kernels take their sizes from a small parameter buffer, so there is one compiled pipeline per
//!   kernel (and weight type), created on first use and cached for the life of the device.
//! - Work is recorded into one command encoder and submitted every few dozen dispatches or when a
//!   result is read back.
//! - Weights may be kept as f16 ([`GpuOptions::f16_weights`]), unpacked in the shader with
//!   `unpack2x16float`, which needs no optional WebGPU feature.

mod kernels;
mod ops;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use ::wgpu::util::DeviceExt;

use kernels::Kernel;

/// The wgpu types of this module's API (adapter choice and description).
pub use ::wgpu::{AdapterInfo, Backends, Limits, PowerPreference};

use crate::{Error, Result};

/// How to open the GPU backend.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Keep weights of rank 2 and more (linear and convolution weights, embedding tables,
    /// codebooks) as f16 on the GPU, which halves their memory; biases and norm parameters stay
    /// f32, and all arithmetic is f32. Off by default: f32 weights reproduce the CPU backend to
    /// float rounding.
    pub f16_weights: bool,
    /// Caps the bytes one buffer may hold below the adapter's own limits (testing the splitting
    /// of large tensors, or leaving room on a shared device). `None`: the adapter's limits.
    pub max_binding_bytes: Option<u64>,
    /// Which adapter to prefer where there are several.
    pub power_preference: ::wgpu::PowerPreference,
    /// Which native APIs to try; `None`: those named by `WGPU_BACKEND`, or all.
    pub backends: Option<::wgpu::Backends>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            f16_weights: false,
            max_binding_bytes: None,
            power_preference: ::wgpu::PowerPreference::HighPerformance,
            backends: None,
        }
    }
}

/// The message of the error when no adapter exists.
pub const NO_ADAPTER_HELP: &str = "no GPU adapter was found (WebGPU, Vulkan, Metal or DX12); \
    on a Linux machine without a GPU install Mesa's software Vulkan driver (Debian/Ubuntu: \
    `apt-get install mesa-vulkan-drivers`)";

/// The GPU backend. Cheap to clone: clones share the device, the compiled pipelines and the
/// pending work.
#[derive(Clone)]
pub struct Gpu {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.ctx.info.name)
            .field("backend", &self.ctx.info.backend)
            .field("chunk_elems", &self.ctx.chunk)
            .field("f16_weights", &self.ctx.f16_weights)
            .finish()
    }
}

struct Pipe {
    pipeline: ::wgpu::ComputePipeline,
    layout: ::wgpu::BindGroupLayout,
}

#[derive(Default)]
struct Pending {
    encoder: Option<::wgpu::CommandEncoder>,
    dispatches: usize,
}

struct Ctx {
    device: ::wgpu::Device,
    queue: ::wgpu::Queue,
    info: ::wgpu::AdapterInfo,
    limits: ::wgpu::Limits,
    /// Elements (f32 or f16) one buffer holds at most.
    chunk: usize,
    f16_weights: bool,
    pipelines: Mutex<HashMap<Kernel, Arc<Pipe>>>,
    pending: Mutex<Pending>,
    /// The first error the device reported outside any call (validation, out of memory).
    error: Arc<Mutex<Option<String>>>,
    /// Bound where a kernel's optional input is absent.
    dummy: ::wgpu::Buffer,
}

/// Submit the recorded work after this many dispatches, so a long forward pass starts running
/// before it is fully recorded and the per-dispatch parameter buffers are released.
const FLUSH_EVERY: usize = 64;

/// A tensor on the GPU: its chunks and its shape. Cheap to clone (the buffers are shared).
#[derive(Clone)]
pub struct GpuTensor {
    st: Arc<Storage>,
    shape: Vec<usize>,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTensor")
            .field("shape", &self.shape)
            .field("dtype", &if self.st.f16 { "f16" } else { "f32" })
            .field("chunks", &self.st.chunks.len())
            .finish()
    }
}

impl GpuTensor {
    /// Whether the elements are stored as f16 (weights under [`GpuOptions::f16_weights`]).
    pub fn is_f16(&self) -> bool {
        self.st.f16
    }

    /// How many buffers hold the tensor.
    pub fn chunk_count(&self) -> usize {
        self.st.chunks.len()
    }
}

pub(crate) struct Storage {
    chunks: Vec<Chunk>,
    f16: bool,
    len: usize,
}

#[derive(Clone)]
pub(crate) struct Chunk {
    buf: ::wgpu::Buffer,
    /// Index of the first element.
    start: usize,
    len: usize,
}

impl Storage {
    /// The chunk holding element `i` and the offset of `i` in it.
    fn locate(&self, i: usize) -> (&Chunk, usize) {
        let k = self.chunks.partition_point(|c| c.start + c.len <= i);
        let c = &self.chunks[k.min(self.chunks.len() - 1)];
        (c, i - c.start)
    }
}

fn bytes_for(len: usize, f16: bool) -> u64 {
    let b = if f16 { len.div_ceil(2) * 4 } else { len * 4 };
    b.max(4) as u64
}

impl Gpu {
    /// Opens the default adapter with the default options (see [`Gpu::new_with`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Self> {
        Self::new_with(GpuOptions::default())
    }

    /// Opens an adapter, blocking until it is ready (native only; wasm uses
    /// [`Gpu::new_async`]). Fails with [`NO_ADAPTER_HELP`] when there is none.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_with(options: GpuOptions) -> Result<Self> {
        crate::executor::block_on(Self::new_async(options))
    }

    /// Opens an adapter: the asynchronous form, as the browser requires.
    pub async fn new_async(options: GpuOptions) -> Result<Self> {
        let mut desc = ::wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if let Some(b) = options.backends {
            desc.backends = b;
        }
        let instance = ::wgpu::Instance::new(desc);
        let adapter = instance
            .request_adapter(&::wgpu::RequestAdapterOptions {
                power_preference: options.power_preference,
                force_fallback_adapter: false,
                compatible_surface: None,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Backend(format!("{NO_ADAPTER_HELP} ({e})")))?;
        Self::from_adapter(adapter, options).await
    }

    async fn from_adapter(adapter: ::wgpu::Adapter, options: GpuOptions) -> Result<Self> {
        let info = adapter.get_info();
        // Ask for everything the adapter offers: the defaults (128 MiB per binding) would split
        // tensors that the hardware could bind whole.
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&::wgpu::DeviceDescriptor {
                label: Some("ldm"),
                required_features: ::wgpu::Features::empty(),
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Backend(format!("GPU adapter `{}` refused to open a device: {e}", info.name)))?;
        let error = Arc::new(Mutex::new(None::<String>));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: ::wgpu::Error| {
            if let Ok(mut slot) = sink.lock() {
                if slot.is_none() {
                    *slot = Some(e.to_string());
                }
            }
        }));
        let mut max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        if let Some(cap) = options.max_binding_bytes {
            max = max.min(cap);
        }
        let chunk = ((max / 4) as usize).max(64);
        let dummy = device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("ldm dummy"),
            size: 16,
            usage: ::wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Gpu {
            ctx: Arc::new(Ctx {
                device,
                queue,
                info,
                limits,
                chunk,
                f16_weights: options.f16_weights,
                pipelines: Mutex::new(HashMap::new()),
                pending: Mutex::new(Pending::default()),
                error,
                dummy,
            }),
        })
    }

    /// The adapter in use (name, driver, API).
    pub fn adapter_info(&self) -> &::wgpu::AdapterInfo {
        &self.ctx.info
    }

    /// The device limits in force.
    pub fn limits(&self) -> &::wgpu::Limits {
        &self.ctx.limits
    }

    /// The most elements one buffer holds; larger tensors are split.
    pub fn chunk_elems(&self) -> usize {
        self.ctx.chunk
    }

    /// Whether weights are stored as f16.
    pub fn f16_weights(&self) -> bool {
        self.ctx.f16_weights
    }

    /// Reads a tensor back: the asynchronous form, for the browser. Natively it waits on the
    /// device itself, so it also completes under any executor.
    pub async fn read_async(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        let t = self.to_f32(t)?;
        let mut staging = Vec::with_capacity(t.st.chunks.len());
        for c in &t.st.chunks {
            let size = bytes_for(c.len, false);
            let s = self.ctx.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("ldm readback"),
                size,
                usage: ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let src = c.buf.clone();
            self.with_encoder(|enc| enc.copy_buffer_to_buffer(&src, 0, &s, 0, size))?;
            staging.push((s, c.len));
        }
        self.flush();
        let waits: Vec<_> = staging.iter().map(|(s, _)| map_read(s)).collect();
        #[cfg(not(target_arch = "wasm32"))]
        self.ctx
            .device
            .poll(::wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Backend(format!("waiting for the GPU: {e}")))?;
        for w in waits {
            w.await.map_err(|e| Error::Backend(format!("reading a result back from the GPU: {e}")))?;
        }
        self.check_error()?;
        let mut out = Vec::with_capacity(t.st.len);
        for (s, len) in &staging {
            {
                let view = s
                    .slice(..)
                    .get_mapped_range()
                    .map_err(|e| Error::Backend(format!("reading a result back from the GPU: {e}")))?;
                out.extend_from_slice(&bytemuck::cast_slice::<u8, f32>(&view)[..*len]);
            }
            s.unmap();
        }
        Ok(out)
    }

    /// Submits what has been recorded so far.
    pub fn flush(&self) {
        if let Ok(mut p) = self.ctx.pending.lock() {
            p.dispatches = 0;
            if let Some(enc) = p.encoder.take() {
                self.ctx.queue.submit(Some(enc.finish()));
            }
        }
    }

    /// Waits until the submitted work has finished (native), e.g. before timing.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn synchronize(&self) -> Result<()> {
        self.flush();
        self.ctx
            .device
            .poll(::wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Backend(format!("waiting for the GPU: {e}")))?;
        self.check_error()
    }

    fn check_error(&self) -> Result<()> {
        let msg = self.ctx.error.lock().ok().and_then(|mut e| e.take());
        match msg {
            Some(m) => Err(Error::Backend(format!("GPU `{}`: {m}", self.ctx.info.name))),
            None => Ok(()),
        }
    }

    /// Records into the pending encoder. Submissions happen under the same lock, so that work
    /// recorded from several threads reaches the queue in the order it was recorded.
    fn with_encoder(&self, f: impl FnOnce(&mut ::wgpu::CommandEncoder)) -> Result<()> {
        let mut p = self.ctx.pending.lock().map_err(|_| Error::Backend("GPU encoder lock poisoned".into()))?;
        let enc = p.encoder.get_or_insert_with(|| self.ctx.device.create_command_encoder(&Default::default()));
        f(enc);
        p.dispatches += 1;
        if p.dispatches >= FLUSH_EVERY {
            p.dispatches = 0;
            if let Some(enc) = p.encoder.take() {
                self.ctx.queue.submit(Some(enc.finish()));
            }
        }
        Ok(())
    }

    fn pipeline(&self, k: Kernel) -> Result<Arc<Pipe>> {
        let mut cache = self.ctx.pipelines.lock().map_err(|_| Error::Backend("GPU pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(&k) {
            return Ok(p.clone());
        }
        let src = kernels::source(k);
        let module = self.ctx.device.create_shader_module(::wgpu::ShaderModuleDescriptor {
            label: Some(&format!("{k:?}")),
            source: ::wgpu::ShaderSource::Wgsl(src.into()),
        });
        let pipeline = self.ctx.device.create_compute_pipeline(&::wgpu::ComputePipelineDescriptor {
            label: Some(&format!("{k:?}")),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        let p = Arc::new(Pipe { pipeline, layout });
        cache.insert(k, p.clone());
        Ok(p)
    }

    /// Records one dispatch of `k` over `groups` workgroups; `bufs` are bound from binding 1 on,
    /// after the parameters.
    fn run(&self, k: Kernel, params: &[u32], bufs: &[&::wgpu::Buffer], groups: [u32; 3]) -> Result<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        let max = self.ctx.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::Backend(format!(
                "{k:?}: {groups:?} workgroups exceed the adapter's {max} per dimension"
            )));
        }
        let pipe = self.pipeline(k)?;
        let pbuf = self.ctx.device.create_buffer_init(&::wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(params),
            usage: ::wgpu::BufferUsages::STORAGE,
        });
        let mut entries = vec![::wgpu::BindGroupEntry { binding: 0, resource: pbuf.as_entire_binding() }];
        for (i, b) in bufs.iter().enumerate() {
            entries.push(::wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() });
        }
        let bg = self.ctx.device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.layout,
            entries: &entries,
        });
        self.with_encoder(|enc| {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipe.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        })
    }

    /// A grid of `n` workgroups, folded into two dimensions past the per-dimension limit.
    fn grid(&self, n: usize) -> [u32; 3] {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension.max(1) as usize;
        if n <= max {
            [n as u32, 1, 1]
        } else {
            [max as u32, n.div_ceil(max) as u32, 1]
        }
    }

    fn new_buffer(&self, size: u64) -> ::wgpu::Buffer {
        self.ctx.device.create_buffer(&::wgpu::BufferDescriptor {
            label: None,
            size,
            usage: ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_SRC | ::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    fn buffer_with(&self, bytes: &[u8]) -> ::wgpu::Buffer {
        let mut padded;
        let contents = if !bytes.len().is_multiple_of(4) || bytes.is_empty() {
            padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
            &padded[..]
        } else {
            bytes
        };
        self.ctx.device.create_buffer_init(&::wgpu::util::BufferInitDescriptor {
            label: None,
            contents,
            usage: ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_SRC | ::wgpu::BufferUsages::COPY_DST,
        })
    }

    /// Chunk boundaries for `shape`: whole rows of the first dimension per chunk where a row fits.
    fn layout(&self, shape: &[usize]) -> Vec<(usize, usize)> {
        let n: usize = shape.iter().product();
        let row: usize = if shape.len() >= 2 { shape[1..].iter().product() } else { 1 };
        let per = if n <= self.ctx.chunk {
            n.max(1)
        } else if row > 0 && row <= self.ctx.chunk {
            (self.ctx.chunk / row) * row
        } else {
            self.ctx.chunk
        };
        let mut out = Vec::new();
        let mut s = 0;
        while s < n {
            let len = per.min(n - s);
            out.push((s, len));
            s += len;
        }
        if out.is_empty() {
            out.push((0, 0));
        }
        out
    }

    /// A new (zeroed) f32 tensor.
    fn alloc(&self, shape: &[usize]) -> GpuTensor {
        let chunks = self
            .layout(shape)
            .into_iter()
            .map(|(start, len)| Chunk { buf: self.new_buffer(bytes_for(len, false)), start, len })
            .collect();
        GpuTensor { st: Arc::new(Storage { chunks, f16: false, len: shape.iter().product() }), shape: shape.to_vec() }
    }

    fn upload_as(&self, data: &[f32], shape: &[usize], f16: bool) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Backend(format!("upload: {} values for shape {shape:?} ({n} expected)", data.len())));
        }
        let chunks = self
            .layout(shape)
            .into_iter()
            .map(|(start, len)| {
                let part = &data[start..start + len];
                let buf = if f16 {
                    let words: Vec<u32> = part
                        .chunks(2)
                        .map(|p| {
                            let lo = half::f16::from_f32(p[0]).to_bits() as u32;
                            let hi = p.get(1).map_or(0, |&v| half::f16::from_f32(v).to_bits() as u32);
                            lo | (hi << 16)
                        })
                        .collect();
                    self.buffer_with(bytemuck::cast_slice(&words))
                } else {
                    self.buffer_with(bytemuck::cast_slice(part))
                };
                Chunk { buf, start, len }
            })
            .collect();
        Ok(GpuTensor { st: Arc::new(Storage { chunks, f16, len: n }), shape: shape.to_vec() })
    }

    /// Copies `n` elements (f32) from `src` at `s` to `dst` at `d`, across chunk boundaries.
    fn copy(&self, src: &Storage, mut s: usize, dst: &Storage, mut d: usize, mut n: usize) -> Result<()> {
        while n > 0 {
            let (sc, so) = src.locate(s);
            let (dc, doff) = dst.locate(d);
            let m = n.min(sc.len - so).min(dc.len - doff);
            if m == 0 {
                return Err(Error::Backend("internal: copy outside a tensor".into()));
            }
            let (sb, db) = (sc.buf.clone(), dc.buf.clone());
            self.with_encoder(|enc| {
                enc.copy_buffer_to_buffer(&sb, (so * 4) as u64, &db, (doff * 4) as u64, (m * 4) as u64)
            })?;
            s += m;
            d += m;
            n -= m;
        }
        Ok(())
    }
}

/// A future that resolves when `buf` is mapped for reading.
fn map_read(buf: &::wgpu::Buffer) -> impl Future<Output = std::result::Result<(), String>> {
    #[derive(Default)]
    struct Slot {
        done: Option<std::result::Result<(), String>>,
        waker: Option<Waker>,
    }
    let slot = Arc::new(Mutex::new(Slot::default()));
    let s2 = slot.clone();
    buf.map_async(::wgpu::MapMode::Read, .., move |r| {
        if let Ok(mut g) = s2.lock() {
            g.done = Some(r.map_err(|e| e.to_string()));
            if let Some(w) = g.waker.take() {
                w.wake();
            }
        }
    });
    std::future::poll_fn(move |cx| {
        let mut g = match slot.lock() {
            Ok(g) => g,
            Err(_) => return Poll::Ready(Err("map lock poisoned".into())),
        };
        match g.done.take() {
            Some(r) => Poll::Ready(r),
            None => {
                g.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
}
