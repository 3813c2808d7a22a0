#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "scripts/test.sh: cargo is required (install Rust from https://rustup.rs)" >&2
  exit 1
fi

# Debian packages the tests use: C/C++ compilers and pkg-config (the C ABI is tested from real C
# and C++ programs), valgrind (the C ABI leak test), Mesa's software Vulkan driver (the GPU
# backend's kernels run on lavapipe, as CI has no GPU).
packages=(gcc g++ pkg-config valgrind mesa-vulkan-drivers libvulkan1)
missing=()
if command -v dpkg >/dev/null; then
  for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
fi
if ((${#missing[@]})); then
  sudo=()
  [[ $(id -u) -ne 0 ]] && sudo=(sudo)
  echo "scripts/test.sh: installing ${missing[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Every crate's tests: models, schedulers, pipelines, the shared cases through the core, the `ldm`
# binary and a C program, hostile input, fuzz smoke runs, the soak test, and the GPU backend
# (feature `webgpu`, which ldm-wasm turns on anyway; named so that it is never lost) on lavapipe:
# every kernel, every model, the shared cases.
# `cargo build` first: it also links libldm.so/libldm.a, which `cargo test` does not make and the C
# ABI tests need; with the same packages, targets and features, `cargo test` reuses everything.
# No incremental state: a one-off build does not need it and it costs disk. The free space is
# printed before and after, so that a build that runs out of disk says so.
export CARGO_INCREMENTAL=0
df -h . >&2 || true
cargo build --workspace --all-targets --features ldm-core/webgpu --locked
df -h . >&2 || true
cargo test --workspace --all-targets --features ldm-core/webgpu --locked
# The browser: ldm-wasm's JavaScript API on WebGPU and on the CPU fallback (the shared cases,
# hostile input, abort) and the demo page, in headless chromium.
bash scripts/test-web.sh
