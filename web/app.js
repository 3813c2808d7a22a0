// The demo page: talks to worker.js, which runs ldm-wasm.
const $ = (id) => document.getElementById(id);
// ?model=URL and ?srmodel=URL open the page on other models.
const query = new URLSearchParams(location.search);
if (query.get("model")) $("model").value = query.get("model");
if (query.get("srmodel")) $("srmodel").value = query.get("srmodel");
const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
let nextId = 1;
let current = null; // id of the run in progress
const waiting = new Map();
const loaded = new Map(); // url -> device it was loaded with
let srImage = null;

worker.onmessage = (ev) => {
  const { id, type } = ev.data;
  const w = waiting.get(id);
  if (!w) return;
  if (type === "progress") w.onProgress(ev.data.progress);
  else {
    waiting.delete(id);
    if (type === "done") w.resolve(ev.data.result);
    else w.reject(Object.assign(new Error(ev.data.error.message), { name: ev.data.error.name }));
  }
};

function call(msg, onProgress) {
  const id = nextId++;
  return { id, promise: new Promise((resolve, reject) => {
    waiting.set(id, { resolve, reject, onProgress });
    worker.postMessage({ ...msg, id });
  }) };
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function showProgress(p) {
  const bar = $("bar");
  if (p.stage === "download") {
    bar.max = p.total || 1;
    bar.value = p.total ? p.loaded : 0;
    status(`downloading ${p.file}: ${(p.loaded / 1e6).toFixed(2)} MB${p.total ? ` of ${(p.total / 1e6).toFixed(2)}` : ""}`);
  } else {
    bar.max = p.total || 1;
    bar.value = p.step;
    status(p.stage === "denoise" ? `denoising: step ${p.step} of ${p.total}` : `${p.stage}...`);
  }
}

async function ensureLoaded(url) {
  const device = $("device").value;
  if (loaded.get(url) === device) return;
  status(`loading ${url}...`);
  const { promise } = call({ type: "load", url, device }, showProgress);
  const info = await promise;
  loaded.set(url, device);
  $("backend").textContent = info.backend;
  $("adapter").textContent = info.adapter ? `(${info.adapter})` : "";
}

function show(result) {
  const out = $("out");
  out.textContent = "";
  const { count, width, height, pixels } = result;
  let first = null;
  for (let i = 0; i < count; i++) {
    const c = document.createElement("canvas");
    c.width = width;
    c.height = height;
    const img = new ImageData(width, height);
    const base = i * width * height * 3;
    for (let j = 0; j < width * height; j++) {
      for (let k = 0; k < 3; k++) img.data[4 * j + k] = Math.round(pixels[base + 3 * j + k] * 255);
      img.data[4 * j + 3] = 255;
    }
    c.getContext("2d").putImageData(img, 0, 0);
    out.appendChild(c);
    first = first || c;
  }
  // the download link is made asynchronously: resolved once it is in place, so that "done"
  // is shown only when everything is
  return new Promise((resolve) => first.toBlob((blob) => {
    const a = $("download");
    if (a.href.startsWith("blob:")) URL.revokeObjectURL(a.href);
    a.href = URL.createObjectURL(blob);
    a.hidden = false;
    resolve();
  }));
}

const num = (id) => Number($(id).value);

async function run(kind) {
  if (current !== null) return;
  const url = kind === "txt2img" ? $("model").value : $("srmodel").value;
  $("generate").disabled = $("upscale").disabled = true;
  $("abort").disabled = false;
  const t0 = performance.now();
  try {
    await ensureLoaded(url);
    const options = kind === "txt2img"
      ? { prompt: $("prompt").value, steps: num("steps"), guidance: num("guidance"), seed: num("seed"),
          width: num("width"), height: num("height"), scheduler: $("scheduler").value || undefined }
      : { image: srImage, steps: num("srsteps"), seed: num("srseed") };
    const { id, promise } = call({ type: kind, url, options }, showProgress);
    current = id;
    const result = await promise;
    await show(result);
    status(`done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  } catch (e) {
    status(e.name === "AbortError" ? "aborted" : `${e.name}: ${e.message}`, e.name !== "AbortError");
  } finally {
    current = null;
    $("generate").disabled = false;
    $("upscale").disabled = srImage === null;
    $("abort").disabled = true;
  }
}

async function pick(file) {
  try {
    const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const c = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = c.getContext("2d");
    ctx.drawImage(bitmap, 0, 0);
    const d = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
    srImage = { width: d.width, height: d.height, data: d.data };
    $("upscale").disabled = current !== null;
    status(`image ${d.width}x${d.height} ready`);
  } catch (e) {
    status(`could not read ${file.name} as an image: ${e.message}`, true);
  }
}

$("generate").onclick = () => run("txt2img");
$("upscale").onclick = () => run("superres");
$("abort").onclick = () => current !== null && worker.postMessage({ type: "abort", id: current });
$("file").onchange = (e) => e.target.files[0] && pick(e.target.files[0]);
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); e.dataTransfer.files[0] && pick(e.dataTransfer.files[0]); };
window.ldmDemo = { run }; // for the browser tests
