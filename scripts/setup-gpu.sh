#!/usr/bin/env bash
# Installs what the GPU backend's tests (ldm-core feature `webgpu`) need on a Debian/Ubuntu
# machine without a GPU: Mesa's software Vulkan driver (lavapipe) and the Vulkan loader.
# Idempotent: installs nothing that is already there. Needs root (or sudo) only to install.
set -euo pipefail

packages=(mesa-vulkan-drivers libvulkan1)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg -s "$p" >/dev/null 2>&1; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null; then
    echo "scripts/setup-gpu.sh: install ${missing[*]} (Mesa's Vulkan drivers) with your package manager" >&2
    exit 1
  fi
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
  fi
  echo "scripts/setup-gpu.sh: installing ${missing[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
