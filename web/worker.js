// The demo's Web Worker: loads pipelines and generates, so the page never freezes.
// Messages in:  {id, type: "load", url, device}
//               {id, type: "txt2img" | "superres", options}   (options without callbacks)
//               {type: "abort", id}
// Messages out: {id, type: "progress", progress}, {id, type: "done", result}, {id, type: "error", error}
import init, { LdmPipeline } from "./pkg/ldm_wasm.js";

const ready = init();
const pipelines = new Map(); // url -> LdmPipeline
const runs = new Map(); // id -> AbortController

function describe(e) {
  return { name: (e && e.name) || "Error", message: (e && e.message) || String(e) };
}

self.onmessage = async (ev) => {
  const msg = ev.data;
  if (msg.type === "abort") {
    const c = runs.get(msg.id);
    if (c) c.abort();
    return;
  }
  const { id } = msg;
  const progress = (p) => self.postMessage({ id, type: "progress", progress: p });
  try {
    await ready;
    if (msg.type === "load") {
      const old = pipelines.get(msg.url);
      if (old) old.free();
      pipelines.delete(msg.url);
      const p = await LdmPipeline.load(msg.url, { device: msg.device, onProgress: progress });
      pipelines.set(msg.url, p);
      self.postMessage({ id, type: "done", result: { backend: p.backend(), adapter: p.adapterName(), kind: p.kind() } });
      return;
    }
    const p = pipelines.get(msg.url);
    if (!p) throw new Error(`no model loaded from ${msg.url}`);
    const controller = new AbortController();
    runs.set(id, controller);
    const options = { ...msg.options, onProgress: progress, signal: controller.signal };
    try {
      const out = msg.type === "txt2img" ? await p.txt2img(options) : await p.superres(options);
      self.postMessage({ id, type: "done", result: out }, [out.pixels.buffer]);
    } finally {
      runs.delete(id);
    }
  } catch (e) {
    self.postMessage({ id, type: "error", error: describe(e) });
  }
};
