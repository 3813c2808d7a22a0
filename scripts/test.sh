#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "scripts/test.sh: cargo is required (install Rust from https://rustup.rs)" >&2
  exit 1
fi

cargo test --workspace --all-targets --locked
