#!/usr/bin/env bash
# Fuzzes ldm-core's readers on stable Rust (crates/ldm-fuzz).
#
#   scripts/fuzz.sh TARGET SECONDS     one target (safetensors, pickle, pth, config, tokenizer, image, npy)
#   scripts/fuzz.sh all SECONDS        every target, SECONDS each, one after the other
#
# Each target runs in a worker process under a memory limit (LDM_FUZZ_MEM_MB, default 4096);
# a panic, abort (e.g. a huge allocation) or hang saves the input under
# crates/ldm-fuzz/crashes/TARGET/ and the run goes on. Fixed crashes belong in
# crates/ldm-fuzz/regressions/TARGET/ (replayed by `cargo test -p ldm-fuzz`).
# The exit status is 1 if any crash was found. Runs at low priority (nice).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
  echo "usage: scripts/fuzz.sh TARGET|all SECONDS [--seed N]" >&2
  exit 2
fi
target=$1
seconds=$2
shift 2

cargo build --release --locked -p ldm-fuzz >&2
bin=target/release/ldm-fuzz

if [ "$target" = all ]; then
  targets=$("$bin" list)
else
  targets=$target
fi

status=0
for t in $targets; do
  nice -n 10 "$bin" run "$t" "$seconds" "$@" || status=1
done
exit $status
