// Fetching a model's files for ldm-wasm (imported by the Rust side as a wasm-bindgen snippet).

const CACHE_NAME = "ldm-models-v1";

// The bytes at `url` as a Uint8Array, or null when the server answers 404. `onBytes(loaded, total)`
// is called as the body arrives (total is 0 when the server does not say). With `useCache`, the
// Cache API keeps the file, so a second load reads it without a download.
export async function ldmFetch(url, useCache, onBytes) {
  let cache = null;
  if (useCache && typeof caches !== "undefined") {
    try {
      cache = await caches.open(CACHE_NAME);
    } catch (_) {
      cache = null; // e.g. an opaque origin; load without caching
    }
  }
  let response = cache ? await cache.match(url) : undefined;
  const cached = response !== undefined;
  if (!cached) {
    try {
      response = await fetch(url);
    } catch (e) {
      throw new Error(`could not fetch ${url}: ${e.message || e}`);
    }
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(`fetching ${url}: HTTP ${response.status} ${response.statusText}`);
  }
  const total = Number(response.headers.get("content-length")) || 0;
  const bytes = await readBody(response, url, total, onBytes);
  if (cache && !cached) {
    try {
      await cache.put(url, new Response(bytes, { headers: { "content-length": String(bytes.length) } }));
    } catch (_) {
      // a full cache only costs the next load a download
    }
  }
  return bytes;
}

async function readBody(response, url, total, onBytes) {
  if (!response.body) {
    const b = new Uint8Array(await response.arrayBuffer());
    onBytes(b.length, b.length);
    return b;
  }
  const reader = response.body.getReader();
  let buf = new Uint8Array(total > 0 ? total : 1 << 16);
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (loaded + value.length > buf.length) {
      const bigger = new Uint8Array(Math.max(buf.length * 2, loaded + value.length));
      bigger.set(buf.subarray(0, loaded));
      buf = bigger;
    }
    buf.set(value, loaded);
    loaded += value.length;
    onBytes(loaded, total);
  }
  if (total > 0 && loaded !== total) {
    throw new Error(`fetching ${url}: got ${loaded} of ${total} bytes (the download was cut short)`);
  }
  return buf.subarray(0, loaded);
}

// A promise that resolves on the next turn of the event loop (so an abort can be seen).
export function ldmNextTurn() {
  return new Promise((resolve) => setTimeout(resolve, 0));
}
