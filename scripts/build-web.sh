#!/usr/bin/env bash
# Builds ldm-wasm for the browser into web/pkg/ (wasm-bindgen --target web) and copies the
# shipped models into web/models/, so that web/ is a complete static site:
#
#   bash scripts/build-web.sh && python3 -m http.server -d web 8000   # open http://localhost:8000
#
# Installs the wasm32-unknown-unknown target and the wasm-bindgen-cli matching Cargo.lock when
# they are missing. LDM_WEB_PROFILE=dev builds without optimisation (faster to build, slow to run).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  echo "build-web: installing the wasm32-unknown-unknown target" >&2
  rustup target add wasm32-unknown-unknown
fi

# The command-line tool must be the exact version of the wasm-bindgen library in Cargo.lock.
version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
if ! wasm-bindgen --version 2>/dev/null | grep -qx "wasm-bindgen $version"; then
  echo "build-web: installing wasm-bindgen-cli $version" >&2
  # --locked first; where the registry lacks a version its lock file names, resolve afresh.
  cargo install --locked wasm-bindgen-cli --version "$version" || cargo install wasm-bindgen-cli --version "$version"
fi

profile=${LDM_WEB_PROFILE:-release}
dir=$([[ $profile == dev ]] && echo debug || echo "$profile")
# (.cargo/config.toml sets the wasm32 flags.)
cargo build -p ldm-wasm --lib --target wasm32-unknown-unknown --profile "$profile" --locked
wasm-bindgen --target web --out-dir web/pkg "${CARGO_TARGET_DIR:-target}/wasm32-unknown-unknown/$dir/ldm_wasm.wasm"

# The demo page opens on the shipped models.
rm -rf web/models
mkdir -p web/models
for m in ldm-shapes ldm-shapes-superres; do
  if [[ -d models/$m ]]; then cp -r "models/$m" web/models/; else echo "build-web: models/$m is missing" >&2; fi
done
echo "build-web: web/pkg and web/models are ready ($(du -sh web/pkg | cut -f1) of wasm and JS)" >&2
