#!/bin/bash
# The GPU run that made the shipped weights: the same script as the CPU recipe, with a larger data
# set, larger batches and step counts fitted to a time budget (--stage-seconds), on one H100.
# The two models train at the same time in two processes; a third process times the CPU recipe's
# steps on two pinned cores. Writes to $OUT (default /tmp/gpu_out): txt2img.tgz and superres.tgz
# (model folder, training log, sample grid), samples_*.png and log_*.txt.
set -u
OUT=${OUT:-/tmp/gpu_out}
W=/tmp/gpu_work
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__, torch.cuda.is_available())"
(taskset -c 0-6 python3 training/train.py --part txt2img --device cuda --threads 4 --workers 6 --out "$W" \
  --data 50000 --ae-steps 100000 --steps 100000 --ae-batch 64 --batch 256 --stage-seconds 390 \
  --log-every 500 >"$OUT/log_txt2img.txt" 2>&1
 tar czf "$OUT/txt2img.tgz" -C "$W" ldm-shapes training_log_txt2img.json samples_txt2img.png
 cp "$W/samples_txt2img.png" "$OUT/") &
(taskset -c 7-13 python3 training/train.py --part superres --device cuda --threads 4 --workers 6 --out "$W" \
  --data 50000 --vq-steps 100000 --sr-steps 100000 --vq-batch 64 --sr-batch 128 --stage-seconds 370 \
  --log-every 500 >"$OUT/log_superres.txt" 2>&1
 tar czf "$OUT/superres.tgz" -C "$W" ldm-shapes-superres training_log_superres.json samples_superres.png
 cp "$W/samples_superres.png" "$OUT/") &
taskset -c 14,15 python3 training/train.py --device cpu --threads 2 --out /tmp/cpu_probe --data 2000 \
  --ae-steps 50 --steps 50 --vq-steps 50 --sr-steps 50 --log-every 10 --sample-steps 0 >"$OUT/log_cpu_probe.txt" 2>&1 &
wait
for f in "$OUT"/log_*.txt; do echo "== $f"; tail -n 4 "$f"; done
ls -la "$OUT"
