#!/usr/bin/env bash
# The benchmark of issue 7, in one command: ldm beside diffusers on this machine, same thread
# count, full-size models with random weights (bench/README.md).
#
#   bench/run.sh [run.py options, e.g. --threads 2 --only unet,bert --json target/bench/result.json]
#
# Needs Python 3.10+ and Rust. Installs the reference (torch, diffusers 0.42.1, transformers) into
# target/bench/venv unless LDM_BENCH_PYTHON names a Python that has them, writes about 7 GB of
# models to target/bench/models, and builds ldm in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

py=${LDM_BENCH_PYTHON:-target/bench/venv/bin/python}
if ! "$py" -c "import torch, diffusers, transformers" 2>/dev/null; then
  echo "bench/run.sh: installing torch, diffusers and transformers into target/bench/venv" >&2
  python3 -m venv target/bench/venv
  target/bench/venv/bin/pip install -q torch "diffusers==0.42.1" transformers safetensors
  py=target/bench/venv/bin/python
fi
"$py" bench/make_models.py --out target/bench/models
cargo build --release --locked -p ldm-cli
exec "$py" bench/run.py --models target/bench/models --ldm target/release/ldm "$@"
