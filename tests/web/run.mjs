// Browser tests of ldm-wasm (the JavaScript API) and of the demo page, in headless Debian
// chromium driven by playwright-core; WebGPU runs on chromium's software adapter.
//
//   node tests/web/run.mjs [name-filter]
//
// Needs web/pkg (scripts/build-web.sh) and `npm ci` in tests/web; scripts/test-web.sh does both.
// Serves the repository over HTTP on a free port; writes screenshots to target/web-tests/.

import { chromium } from "playwright-core";
import http from "node:http";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const outDir = path.join(repo, "target/web-tests");
fs.mkdirSync(outDir, { recursive: true });
const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "ldm-web-"));
const filter = process.argv[2] || "";

// ---- a static server over the repository (and a scratch folder of damaged models at /scratch/)
const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
  ".json": "application/json", ".png": "image/png", ".txt": "text/plain", ".css": "text/css" };
const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  const rel = decodeURIComponent(url.pathname);
  const [root, sub] = rel.startsWith("/scratch/") ? [scratch, rel.slice("/scratch".length)] : [repo, rel];
  const file = path.join(root, path.normalize(sub));
  if (!file.startsWith(root) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
    res.writeHead(404).end("not found");
    return;
  }
  const body = fs.readFileSync(file);
  res.writeHead(200, { "content-type": types[path.extname(file)] || "application/octet-stream",
    "content-length": body.length, "cache-control": "no-store" });
  res.end(body);
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const base = `http://127.0.0.1:${server.address().port}`;

// ---- .npy reading (little-endian float32, C order)
function readNpy(file) {
  const b = fs.readFileSync(file);
  const hlen = b.readUInt16LE(8);
  const header = b.subarray(10, 10 + hlen).toString("latin1");
  if (!header.includes("'<f4'") || header.includes("'fortran_order': True")) throw new Error(`${file}: not a C-order <f4 array`);
  const data = b.subarray(10 + hlen);
  const out = new Float32Array(data.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = data.readFloatLE(4 * i);
  return out;
}

function maxAbsDiff(a, b) {
  if (a.length !== b.length) throw new Error(`length ${a.length} != expected ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

// ---- damaged model folders for the hostile-input tests
function copyDir(src, dst) {
  fs.mkdirSync(dst, { recursive: true });
  for (const e of fs.readdirSync(src, { withFileTypes: true })) {
    const s = path.join(src, e.name), d = path.join(dst, e.name);
    if (e.isDirectory()) copyDir(s, d); else fs.copyFileSync(s, d);
  }
}
const tiny = path.join(repo, "tests/fixtures/txt2img-tiny");
function damaged(name, change) {
  const dir = path.join(scratch, name);
  copyDir(tiny, dir);
  change(dir);
  return `/scratch/${name}/`;
}
const unetWeights = (d) => path.join(d, "unet/diffusion_pytorch_model.safetensors");
const bertWeights = (d) => path.join(d, "bert/pytorch_model.bin");

// Rewrites a safetensors file: `change(header, data)` edits the parsed header (and may return
// new data bytes).
function editSafetensors(file, change) {
  const b = fs.readFileSync(file);
  const n = Number(b.readBigUInt64LE(0));
  const header = JSON.parse(b.subarray(8, 8 + n).toString("utf8"));
  const data = change(header, b.subarray(8 + n)) || b.subarray(8 + n);
  const json = Buffer.from(JSON.stringify(header), "utf8");
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  fs.writeFileSync(file, Buffer.concat([len, json, data]));
}

// A zip archive of stored (uncompressed) entries, as torch.save writes: enough to hand the
// .bin reader a pickle of our choosing.
function storedZip(entries) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc32 = (buf) => { let c = 0xffffffff; for (const x of buf) c = crcTable[(c ^ x) & 0xff] ^ (c >>> 8); return (c ^ 0xffffffff) >>> 0; };
  const locals = [], centrals = [];
  let offset = 0;
  for (const [name, data] of entries) {
    const nb = Buffer.from(name), crc = crc32(data);
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0); local.writeUInt16LE(20, 4); local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(data.length, 18); local.writeUInt32LE(data.length, 22); local.writeUInt16LE(nb.length, 26);
    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0); central.writeUInt16LE(20, 4); central.writeUInt16LE(20, 6); central.writeUInt32LE(crc, 16);
    central.writeUInt32LE(data.length, 20); central.writeUInt32LE(data.length, 24); central.writeUInt16LE(nb.length, 28);
    central.writeUInt32LE(offset, 42);
    locals.push(local, nb, data);
    centrals.push(central, nb);
    offset += 30 + nb.length + data.length;
  }
  const cd = Buffer.concat(centrals);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0); end.writeUInt16LE(entries.length, 8); end.writeUInt16LE(entries.length, 10);
  end.writeUInt32LE(cd.length, 12); end.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, cd, end]);
}
const evilPickle = fs.readFileSync(path.join(repo, "crates/ldm-fuzz/corpus/pickle/evil.pkl"));
const editConfig = (d, file, change) => {
  const f = path.join(d, file);
  const c = JSON.parse(fs.readFileSync(f, "utf8"));
  change(c);
  fs.writeFileSync(f, JSON.stringify(c));
};
const hostileModels = {
  truncated: damaged("truncated", (d) => { const b = fs.readFileSync(unetWeights(d)); fs.writeFileSync(unetWeights(d), b.subarray(0, b.length >> 1)); }),
  notJson: damaged("not-json", (d) => fs.writeFileSync(path.join(d, "unet/config.json"), "{ this is not json")),
  noVae: damaged("no-vae", (d) => fs.rmSync(path.join(d, "vqvae"), { recursive: true })),
  wrongShape: damaged("wrong-shape", (d) => {
    const f = path.join(d, "unet/config.json");
    const c = JSON.parse(fs.readFileSync(f, "utf8"));
    c.block_out_channels = c.block_out_channels.map((x) => x * 2);
    fs.writeFileSync(f, JSON.stringify(c));
  }),
  headerTooLong: damaged("header-too-long", (d) => { const b = fs.readFileSync(unetWeights(d)); b.writeBigUInt64LE(BigInt(b.length) * 4n, 0); fs.writeFileSync(unetWeights(d), b); }),
  pickleExploit: damaged("pickle-exploit", (d) => fs.writeFileSync(bertWeights(d), storedZip([["archive/data.pkl", evilPickle], ["archive/version", Buffer.from("3\n")]]))),
  truncatedBin: damaged("truncated-bin", (d) => { const b = fs.readFileSync(bertWeights(d)); fs.writeFileSync(bertWeights(d), b.subarray(0, b.length >> 1)); }),
  int32: damaged("int32", (d) => editSafetensors(unetWeights(d), (h) => { h["conv_in.bias"].dtype = "I32"; })),
  extraTensor: damaged("extra-tensor", (d) => editSafetensors(unetWeights(d), (h, data) => {
    h["surplus.weight"] = { dtype: "F32", shape: [1], data_offsets: [data.length, data.length + 4] };
    return Buffer.concat([data, Buffer.alloc(4)]);
  })),
  missingTensor: damaged("missing-tensor", (d) => editSafetensors(unetWeights(d), (h) => {
    // drop the entry of the last tensor in the file (its bytes stay, unclaimed)
    const [name] = Object.entries(h).filter(([k]) => k !== "__metadata__").sort((a, b) => b[1].data_offsets[0] - a[1].data_offsets[0])[0];
    delete h[name];
  })),
  overlapping: damaged("overlapping", (d) => editSafetensors(unetWeights(d), (h) => {
    const t = Object.entries(h).filter(([k, v]) => k !== "__metadata__");
    const [a, b] = t.filter(([, v]) => v.shape.length === 1 && v.data_offsets[1] - v.data_offsets[0] === t[0][1].data_offsets[1] - t[0][1].data_offsets[0]);
    b[1].data_offsets = [...a[1].data_offsets];
  })),
  nanWeights: damaged("nan-weights", (d) => editSafetensors(unetWeights(d), (h, data) => {
    const copy = Buffer.from(data);
    copy.writeFloatLE(NaN, h["conv_in.bias"].data_offsets[0]);
    return copy;
  })),
  wrongType: damaged("wrong-type", (d) => editConfig(d, "unet/config.json", (c) => { c.layers_per_block = "two"; })),
  absurdChannels: damaged("absurd-channels", (d) => editConfig(d, "unet/config.json", (c) => { c.block_out_channels = [1e9, 1e9, 1e9].slice(0, c.block_out_channels.length); })),
  millionLayers: damaged("million-layers", (d) => editConfig(d, "unet/config.json", (c) => { c.layers_per_block = 1000000; })),
  badClass: damaged("bad-class", (d) => {
    const f = path.join(d, "model_index.json");
    const c = JSON.parse(fs.readFileSync(f, "utf8"));
    c.unet = ["diffusers", "UNet3DConditionModel"];
    fs.writeFileSync(f, JSON.stringify(c));
  }),
};

// ---- the browser
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--enable-unsafe-webgpu", "--no-sandbox", "--headless", "--disable-background-networking",
    "--disable-component-update", "--no-first-run"],
});
const context = await browser.newContext();
const page = await context.newPage();
const consoleLines = [];
page.on("console", (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
page.on("pageerror", (e) => consoleLines.push(`[pageerror] ${e.message}`));
await page.goto(`${base}/tests/web/harness.html`);
await page.evaluate(() => window.ldmReady);
const hasWebGpu = await page.evaluate(async () => !!(navigator.gpu && (await navigator.gpu.requestAdapter())));

// ---- a small test runner
const tests = [];
const test = (name, fn) => tests.push({ name, fn });
const assert = (cond, msg) => { if (!cond) throw new Error(msg); };

const cases = fs.readdirSync(path.join(repo, "tests/cases")).filter((f) => f.endsWith(".json")).sort()
  .map((f) => JSON.parse(fs.readFileSync(path.join(repo, "tests/cases", f), "utf8")));

for (const device of ["webgpu", "cpu"]) {
  test(`shared cases through the JavaScript API on ${device}`, async () => {
    if (device === "webgpu") assert(hasWebGpu, "chromium has no WebGPU adapter (launched with --enable-unsafe-webgpu)");
    const rows = [];
    for (const c of cases) {
      const expected = readNpy(path.join(repo, "tests/cases", c.expected));
      const latents = c.latents ? Array.from(readNpy(path.join(repo, "tests/cases", c.latents))) : null;
      const out = await page.evaluate(([c, d, l]) => window.runCase(c, d, l), [c, device, latents]);
      const info = await page.evaluate(([u, d]) => window.loadPipeline(u, d), [`/tests/fixtures/${c.model}/`, device]);
      assert(info.backend === device, `${c.name}: backend() is ${info.backend}, expected ${device}`);
      const err = maxAbsDiff(out.pixels, expected);
      // The CPU fallback keeps the CLI's bound; WebGPU's transcendental functions are less exact.
      const bound = device === "cpu" ? c.tolerance : 1e-3;
      rows.push(`${c.name.padEnd(24)} ${err.toExponential(2)} (bound ${bound})`);
      assert(err <= bound, `${c.name} on ${device}: max abs error ${err} > ${bound}`);
      assert(out.reports >= c.model_calls + 2, `${c.name}: ${out.reports} progress reports for ${c.model_calls} model calls`);
    }
    return rows.join("\n");
  });
}

test("load reports download progress and the backend actually used", async () => {
  const info = await page.evaluate(() => window.loadPipeline("/tests/fixtures/txt2img-tiny/", "cpu"));
  assert(info.backend === "cpu" && info.kind === "txt2img", JSON.stringify(info));
  assert(info.downloads > 0 && info.bytes > 10000, `download progress: ${JSON.stringify(info)}`);
  const auto = await page.evaluate(() => window.loadPipeline("/tests/fixtures/superres-tiny/", "auto"));
  assert(auto.backend === (hasWebGpu ? "webgpu" : "cpu"), `device auto gave ${auto.backend}`);
  assert(auto.kind === "superres", auto.kind);
  return `cpu: ${info.bytes} bytes in ${info.downloads} reports; auto: ${auto.backend} (${auto.adapter})`;
});

for (const device of ["cpu", "webgpu"]) {
  test(`an abort stops generation within a step (${device})`, async () => {
    const url = "/tests/fixtures/txt2img-tiny/";
    await page.evaluate(([u, d]) => window.loadPipeline(u, d), [url, device]);
    const r = await page.evaluate(async ([u, d]) => {
      const p = window.pipeline(u, d);
      const controller = new AbortController();
      const seen = [];
      try {
        await p.txt2img({ prompt: "a red circle", steps: 200, guidance: 3, signal: controller.signal,
          onProgress: (e) => { seen.push(e.stage + ":" + e.step); if (e.stage === "denoise" && e.step === 2) controller.abort(); } });
        return { settled: "resolved", seen };
      } catch (e) {
        const after = await p.txt2img({ prompt: "a red circle", steps: 2 });
        return { settled: "rejected", name: e.name, message: e.message, seen, after: after.count };
      }
    }, [url, device]);
    assert(r.settled === "rejected" && r.name === "AbortError", JSON.stringify(r).slice(0, 300));
    const denoised = r.seen.filter((s) => s.startsWith("denoise")).length;
    assert(denoised <= 4, `${denoised} denoising reports after aborting at step 2`);
    assert(r.after === 1, "the pipeline is usable after an abort");
    return `rejected with ${r.name} after ${denoised} denoising reports: ${r.message}`;
  });
}

// Hostile input through the JavaScript API: each must reject with an Error naming the problem.
const hostile = [
  ["prompt missing", "return p.txt2img({ steps: 2 })", "invalid-argument", /prompt/],
  ["prompt of the wrong type", "return p.txt2img({ prompt: 42 })", "invalid-argument", /prompt.*string/],
  ["prompt array with a number", "return p.txt2img({ prompt: ['a', 7] })", "invalid-argument", /prompt\[1\]/],
  ["options not an object", "return p.txt2img('a red circle')", "invalid-argument", /object/],
  ["steps 0", "return p.txt2img({ prompt: 'a', steps: 0 })", "invalid-argument", /step/],
  ["steps negative", "return p.txt2img({ prompt: 'a', steps: -3 })", "invalid-argument", /steps/],
  ["steps beyond the scheduler's range", "return p.txt2img({ prompt: 'a', steps: 5000 })", "invalid-argument", /5000|steps/],
  ["steps fractional", "return p.txt2img({ prompt: 'a', steps: 2.5 })", "invalid-argument", /steps/],
  ["guidance NaN", "return p.txt2img({ prompt: 'a', steps: 2, guidance: NaN })", "invalid-argument", /guidance/],
  ["guidance infinite", "return p.txt2img({ prompt: 'a', steps: 2, guidance: Infinity })", "invalid-argument", /guidance/],
  ["eta NaN", "return p.txt2img({ prompt: 'a', steps: 2, eta: NaN })", "invalid-argument", /eta/],
  ["height not a multiple of 8", "return p.txt2img({ prompt: 'a', steps: 2, height: 60 })", "invalid-argument", /height 60/],
  ["width zero", "return p.txt2img({ prompt: 'a', steps: 2, width: 0 })", "invalid-argument", /width 0/],
  ["size beyond memory", "return p.txt2img({ prompt: Array(64).fill('a'), steps: 2, height: 8192, width: 8192 })", null, /memory|8192/],
  ["unknown scheduler", "return p.txt2img({ prompt: 'a', steps: 2, scheduler: 'warp' })", "invalid-argument", /warp/],
  ["latents of the wrong length", "return p.txt2img({ prompt: 'a', steps: 2, latents: new Float32Array(5) })", "invalid-argument", /latents/],
  ["latents not a Float32Array", "return p.txt2img({ prompt: 'a', steps: 2, latents: [1, 2] })", "invalid-argument", /Float32Array/],
  ["prompt of 100,000 characters", "return p.txt2img({ prompt: 'x'.repeat(100000), steps: 2 })", "invalid-argument", /prompt/],
  ["prompt with a NUL byte", "return p.txt2img({ prompt: 'a\\u0000b', steps: 2 })", "invalid-argument", /NUL|prompt/],
  ["seed negative", "return p.txt2img({ prompt: 'a', steps: 2, seed: -1 })", "invalid-argument", /seed/],
  ["superres on a text-to-image model", "return p.superres({ image: { width: 32, height: 32, data: new Uint8Array(4096) } })", "invalid-argument", /super-resolution/],
  ["signal already aborted", "const c = new AbortController(); c.abort(); return p.txt2img({ prompt: 'a', steps: 2, signal: c.signal })", "AbortError", /abort/],
];
const hostileSr = [
  ["image missing", "return p.superres({ steps: 2 })", "invalid-argument", /image/],
  ["image data of the wrong length", "return p.superres({ image: { width: 32, height: 32, data: new Uint8Array(100) } })", "invalid-argument", /4096/],
  ["image data not bytes", "return p.superres({ image: { width: 32, height: 32, data: [1, 2, 3] } })", "invalid-argument", /data/],
  ["image of zero size", "return p.superres({ image: { width: 0, height: 0, data: new Uint8Array(0) } })", "invalid-argument", /0x0|zero|empty|size|small/],
  ["image smaller than 32 px", "return p.superres({ image: { width: 16, height: 40, data: new Uint8Array(16 * 40 * 4) } })", "invalid-argument", /16|32/],
  ["image of absurd dimensions", "return p.superres({ image: { width: 100000, height: 100000, data: new Uint8Array(4) } })", "invalid-argument", /100000|bytes/],
  ["text to image on a super-resolution model", "return p.txt2img({ prompt: 'a' })", "invalid-argument", /super-resolution model/],
];

test("hostile parameters are refused with a named error; the pipeline stays usable", async () => {
  const rows = [];
  for (const [url, list] of [["/tests/fixtures/txt2img-tiny/", hostile], ["/tests/fixtures/superres-tiny/", hostileSr]]) {
    for (const device of ["cpu", "webgpu"]) {
      await page.evaluate(([u, d]) => window.loadPipeline(u, d), [url, device]);
      for (const [what, body, name, re] of list) {
        const r = await page.evaluate(([u, d, b]) => window.settle(u, d, b), [url, device, body]);
        assert(!r.ok, `${what} (${device}): resolved instead of rejecting`);
        assert(r.isError, `${what} (${device}): rejected with a non-Error`);
        if (name) assert(r.name === name, `${what} (${device}): error name ${r.name}, expected ${name}: ${r.message}`);
        assert(re.test(r.message), `${what} (${device}): message does not say what is wrong: ${r.message}`);
        assert(!/panicked|RuntimeError|unreachable/.test(r.message), `${what}: ${r.message}`);
        assert(!r.message.includes("/ldm-web/"), `${what}: the message names the internal mount point: ${r.message}`);
        if (device === "cpu") rows.push(`${what.padEnd(42)} ${r.name}: ${r.message.slice(0, 110)}`);
      }
      const ok = await page.evaluate(([u, d]) => window.settle(u, d,
        u.includes("superres") ? "return p.superres({ steps: 1, image: { width: 32, height: 32, data: new Uint8Array(4096).fill(128) } })"
          : "return p.txt2img({ prompt: 'a', steps: 1 })"), [url, device]);
      assert(ok.ok && ok.value.count === 1, `the pipeline is not usable after hostile input: ${JSON.stringify(ok)}`);
    }
  }
  return rows.join("\n");
});

test("damaged model folders are refused with a named error", async () => {
  const expectations = [
    ["/scratch/missing/", "missing model", "not-found", /model_index\.json/],
    [hostileModels.truncated, "truncated safetensors", "bad-model", /truncated|outside/],
    [hostileModels.headerTooLong, "header length larger than the file", "bad-model", /header length/],
    [hostileModels.notJson, "config.json that is not JSON", "bad-model", /config\.json/],
    [hostileModels.noVae, "missing component folder", "not-found", /vqvae/],
    [hostileModels.wrongShape, "weights whose shapes disagree with the config", "bad-model", /shape/],
    [hostileModels.badClass, "unknown component class", "unsupported", /UNet3DConditionModel/],
    [hostileModels.pickleExploit, "a pickle calling posix.system", null, /posix|system|not allowed|refus/],
    [hostileModels.truncatedBin, "truncated PyTorch .bin (zip)", "bad-model", /pytorch_model\.bin/],
    [hostileModels.int32, "tensor of an unsupported dtype", "unsupported", /I32/],
    [hostileModels.extraTensor, "an extra tensor", "bad-model", /surplus\.weight/],
    [hostileModels.missingTensor, "a missing tensor", null, /missing|tensor/],
    [hostileModels.overlapping, "overlapping data offsets", "bad-model", /overlap/],
    [hostileModels.nanWeights, "weights holding NaN", "bad-model", /non-finite|NaN/],
    [hostileModels.wrongType, "config field of the wrong type", "bad-model", /layers_per_block/],
    [hostileModels.absurdChannels, "channels of 10^9", null, /block_out_channels|1000000000/],
    [hostileModels.millionLayers, "10^6 layers", null, /layers_per_block|1000000/],
  ];
  const rows = [];
  for (const [url, what, name, re] of expectations) {
    const r = await page.evaluate(async (u) => {
      try { await window.LdmPipeline.load(u, { device: "cpu", cache: false }); return { ok: true }; }
      catch (e) { return { ok: false, isError: e instanceof Error, name: e.name, message: e.message }; }
    }, url);
    assert(!r.ok && r.isError, `${what}: ${JSON.stringify(r)}`);
    if (name) assert(r.name === name, `${what}: error name ${r.name}, expected ${name}: ${r.message}`);
    assert(re.test(r.message), `${what}: message does not say what is wrong: ${r.message}`);
    assert(!r.message.includes("/ldm-web/"), `${what}: the message names the internal mount point: ${r.message}`);
    rows.push(`${what.padEnd(46)} ${r.name}: ${r.message.slice(0, 120)}`);
  }
  const bad = await page.evaluate(async () => {
    try { await window.LdmPipeline.load("/tests/fixtures/txt2img-tiny/", { device: "gpu" }); return "resolved"; }
    catch (e) { return e.message; }
  });
  assert(/device/.test(bad), `an unknown device: ${bad}`);
  return rows.join("\n");
});

test("the demo page loads, generates an image in its worker, and aborts", async () => {
  // The page's mechanics on the tiny fixture (the shipped model has tests of its own).
  const demo = await context.newPage();
  const errors = [];
  demo.on("pageerror", (e) => errors.push(e.message));
  await demo.goto(`${base}/web/index.html?model=/tests/fixtures/txt2img-tiny/`);
  await demo.fill("#steps", "10");
  await demo.click("#generate");
  const waitStatus = async (re, ms) => {
    const t0 = Date.now();
    for (;;) {
      const s = await demo.textContent("#status");
      if (re.test(s)) return s;
      if (Date.now() - t0 > ms) throw new Error(`waited ${ms / 1000} s for the status to match ${re}; it says: ${s}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  await waitStatus(/done|Error|error/, 300000);
  const status = await demo.textContent("#status");
  assert(status.startsWith("done"), `status: ${status}`);
  const backend = await demo.textContent("#backend");
  assert(backend === (hasWebGpu ? "webgpu" : "cpu"), `backend shown: ${backend}`);
  const stats = await demo.evaluate(() => {
    const c = document.querySelector("#out canvas");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let lo = 255, hi = 0;
    for (let i = 0; i < d.length; i += 4) { const v = d[i] + d[i + 1] + d[i + 2]; lo = Math.min(lo, v); hi = Math.max(hi, v); }
    return { w: c.width, h: c.height, lo, hi, href: document.getElementById("download").href };
  });
  assert(stats.w === 64 && stats.h === 64, `image ${stats.w}x${stats.h}`);
  assert(stats.hi - stats.lo > 60, `the image is flat (${stats.lo}..${stats.hi})`);
  assert(stats.href.startsWith("blob:"), "no download link");
  const shot = path.join(outDir, "demo.png");
  await demo.screenshot({ path: shot, fullPage: true });
  // Abort a long run from the page.
  await demo.fill("#steps", "900");
  await demo.click("#generate");
  await waitStatus(/denoising: step [1-9]/, 120000);
  await demo.click("#abort");
  await waitStatus(/^aborted$/, 60000);
  assert(errors.length === 0, `page errors: ${errors.join("; ")}`);
  await demo.close();
  return `${status}; backend ${backend}; screenshot ${path.relative(repo, shot)}`;
});

// ---- run
let failed = 0;
for (const t of tests) {
  if (filter && !t.name.includes(filter)) continue;
  const t0 = Date.now();
  try {
    const detail = await t.fn();
    console.log(`ok   ${t.name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    if (detail) console.log(detail.replace(/^/gm, "       "));
  } catch (e) {
    failed++;
    console.log(`FAIL ${t.name} (${((Date.now() - t0) / 1000).toFixed(1)} s)\n       ${e.message}`);
  }
}
if (failed) console.log("browser console:\n" + consoleLines.slice(-40).join("\n"));
await browser.close();
server.close();
fs.rmSync(scratch, { recursive: true, force: true });
console.log(failed ? `${failed} browser test(s) failed` : `all ${tests.length} browser tests passed`);
process.exit(failed ? 1 : 0);
