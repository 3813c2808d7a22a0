#!/usr/bin/env python3
"""ldm beside diffusers on this machine: the benchmark of issue 7.

For each workload (see crates/ldm-core/src/bench.rs, which this file mirrors on the diffusers side)
it runs diffusers and ldm in turns, each turn a fresh process with the same thread count: rounds
of one process of each side, back to back, the side that goes first alternating. Each round gives
a ratio (ours / theirs, of the medians of the process's timed runs), so that a slow spell of a
shared machine falls on both sides of it; the table shows the median of the rounds' ratios, the
median times, and the peak resident memory of each side's processes beside the size of the
weights the workload reads.

    bench/run.sh                          # builds the models and ldm first, then this
    python bench/run.py --models target/bench/models --ldm target/release/ldm [--threads N]
                        [--only unet,bert] [--rounds 3] [--repeat 3] [--whole-repeat 3] [--json out.json]

The workloads: LDMBert forward (batch 2, 77 tokens); one UNet2DConditionModel step (batch 2,
32x32 latents); AutoencoderKL decode to 256x256; one UNet2DModel step at 64x64; VQModel decode to
256x256; a whole text-to-image run (DDIM, 50 steps, guidance 6) and a whole 64x64 -> 256x256
super-resolution run (DDIM, 100 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = ["bert", "unet", "vae-decode", "sr-unet", "vq-decode", "txt2img", "superres"]
WHOLE = {"txt2img", "superres"}
TXT2IMG = {"bert", "unet", "vae-decode", "txt2img"}
# The settings of the whole runs, as ldm_core::bench has them.
PROMPT = "a painting of a squirrel eating a burger"
TIMESTEP = 500.0
# The weight files each workload reads.
FILES = {"bert": ["bert"], "unet": ["unet"], "vae-decode": ["vqvae"], "sr-unet": ["unet"], "vq-decode": ["vqvae"],
         "txt2img": ["bert", "unet", "vqvae"], "superres": ["unet", "vqvae"]}


# ------------------------------------------------------------------------------------------------
# The diffusers side: run in a child process (`run.py --torch WORKLOAD ...`).
# ------------------------------------------------------------------------------------------------

def torch_workload(name: str, folder: Path):
    import torch
    from diffusers import (AutoencoderKL, LDMSuperResolutionPipeline, LDMTextToImagePipeline, UNet2DConditionModel,
                           UNet2DModel, VQModel)
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    g = torch.Generator().manual_seed(0)
    if name == "bert":
        bert = LDMBertModel.from_pretrained(folder / "bert").eval()
        vocab = bert.config.vocab_size
        ids = torch.tensor([[(1000 + 37 * j + 11 * r) % vocab if j < 12 else 0 for j in range(77)] for r in range(2)])
        return lambda: bert(ids)
    if name == "unet":
        unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        x = torch.randn(2, unet.config.in_channels, 32, 32, generator=g)
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        t = torch.tensor([TIMESTEP])
        return lambda: unet(x, t, encoder_hidden_states=ctx)
    if name == "vae-decode":
        vae = AutoencoderKL.from_pretrained(folder / "vqvae").eval()
        side = 256 // 2 ** (len(vae.config.block_out_channels) - 1)
        z = torch.randn(1, vae.config.latent_channels, side, side, generator=g)
        return lambda: vae.decode(z)
    if name == "sr-unet":
        unet = UNet2DModel.from_pretrained(folder / "unet").eval()
        x = torch.randn(1, unet.config.in_channels, 64, 64, generator=g)
        t = torch.tensor([TIMESTEP])
        return lambda: unet(x, t)
    if name == "vq-decode":
        vq = VQModel.from_pretrained(folder / "vqvae").eval()
        side = 256 // 2 ** (len(vq.config.block_out_channels) - 1)
        z = torch.randn(1, vq.config.latent_channels, side, side, generator=g)
        return lambda: vq.decode(z)
    if name == "txt2img":
        pipe = LDMTextToImagePipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        return lambda: pipe([PROMPT], num_inference_steps=50, guidance_scale=6.0, height=256, width=256,
                            generator=torch.Generator().manual_seed(0), output_type="np")
    if name == "superres":
        pipe = LDMSuperResolutionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        img = torch.randint(0, 256, (1, 3, 64, 64), generator=g).float() / 127.5 - 1
        return lambda: pipe(img, num_inference_steps=100, eta=0.0, generator=torch.Generator().manual_seed(0),
                            output_type="np")
    raise SystemExit(f"unknown workload {name}")


def torch_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    with torch.inference_mode():
        job = torch_workload(args.torch, Path(args.folder))
        load_s = time.perf_counter() - t
        times = []
        for i in range(args.warmup + args.repeat):
            t = time.perf_counter()
            job()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
    print(json.dumps({"workload": args.torch, "threads": torch.get_num_threads(), "load_s": load_s, "times_s": times,
                      "median_s": sorted(times)[len(times) // 2], "torch": torch.__version__}))


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------

def measure(cmd: list[str], env: dict) -> dict:
    """Runs one measurement process and returns its JSON report (the last line of its stdout)
    with the process's own peak resident memory, read with wait4."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                os.execvpe(cmd[0], cmd, env)
            finally:
                os._exit(127)
        _, status, usage = os.wait4(pid, 0)
        out.seek(0)
        err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (status {code}):\n{err.read().decode(errors='replace')[-3000:]}")
        rep = json.loads(out.read().decode().strip().splitlines()[-1])
    rep["peak_rss_bytes_wait4"] = usage.ru_maxrss * 1024
    return rep


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="target/bench/models", help="bench/make_models.py's output")
    ap.add_argument("--ldm", default="target/release/ldm")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both (default: every core)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (one process of each side) of each model call")
    ap.add_argument("--repeat", type=int, default=3, help="timed model calls in each process (after one untimed)")
    ap.add_argument("--whole-repeat", type=int, default=3, help="rounds of each whole pipeline run (one run per process)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--bf16", action="store_true",
                    help="also time ldm with bf16 weights (ldm bench --precision bf16), as extra columns")
    # the child side
    ap.add_argument("--torch", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch:
        return torch_child(args)

    models = Path(args.models)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads),
               CANDLE_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    for name in [w for w in args.only.split(",") if w]:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name} (expected {', '.join(WORKLOADS)})")
        folder = models / ("txt2img" if name in TXT2IMG else "superres")
        rounds, repeat, warmup = (args.whole_repeat, 1, 0) if name in WHOLE else (args.rounds, args.repeat, 1)
        weights = sum(p.stat().st_size for c in FILES[name] for p in (folder / c).glob("*.safetensors"))
        sides = {
            "diffusers": [sys.executable, __file__, "--torch", name, "--folder", str(folder)],
            "ours": [args.ldm, "bench", "--model", str(folder), "--workload", name],
        }
        if args.bf16:
            sides["ours_bf16"] = sides["ours"] + ["--precision", "bf16"]
        runs = {side: [] for side in sides}
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                runs[side].append(measure(sides[side] + ["--threads", str(args.threads), "--repeat", str(repeat),
                                                         "--warmup", str(warmup)], env))
        row = {"workload": name, "weights_bytes": weights, "rounds": runs}
        for side, reps in runs.items():
            row[side] = {"median_s": median([x["median_s"] for x in reps]),
                         "peak_rss_bytes_wait4": max(x["peak_rss_bytes_wait4"] for x in reps),
                         "torch": reps[0].get("torch")}
        for side, key in [("ours", "ratio"), ("ours_bf16", "ratio_bf16")]:
            if side in runs:
                ratios = [o["median_s"] / d["median_s"] for o, d in zip(runs[side], runs["diffusers"])]
                row[key + "_rounds"] = ratios
                row[key] = median(ratios)
        ours, theirs = row["ours"], row["diffusers"]
        rows.append(row)
        each = ", ".join(f"{x:.2f}" for x in row["ratio_rounds"])
        print(f"{name}: ours {ours['median_s']:.3f}s diffusers {theirs['median_s']:.3f}s ratio {row['ratio']:.2f} "
              f"(rounds {each})" + (f" bf16 ratio {row['ratio_bf16']:.2f}" if args.bf16 else ""), file=sys.stderr, flush=True)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    torch_version = rows[0]["diffusers"].get("torch", "?") if rows else "?"
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; threads {args.threads}; torch {torch_version}; ratio: the median "
          f"of the rounds' (ours / diffusers), {args.rounds} rounds of {args.repeat} calls per model row, "
          f"{args.whole_repeat} of one run per whole run; peaks: the largest of each side's processes")
    extra = " ldm bf16 (s) | bf16 ratio | ldm bf16 peak (GiB) |" if args.bf16 else ""
    print("| workload | ldm (s) | diffusers (s) | ratio | ldm peak (GiB) | diffusers peak (GiB) | weights (GiB) | "
          "ldm peak / weights |" + extra)
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.bf16 else ""))
    for r in rows:
        o, d = r["ours"], r["diffusers"]
        line = (f"| {r['workload']} | {o['median_s']:.3f} | {d['median_s']:.3f} | {r['ratio']:.2f} | "
                f"{gib(o['peak_rss_bytes_wait4'])} | {gib(d['peak_rss_bytes_wait4'])} | {gib(r['weights_bytes'])} | "
                f"{o['peak_rss_bytes_wait4'] / r['weights_bytes']:.2f} |")
        if args.bf16:
            b = r["ours_bf16"]
            line += f" {b['median_s']:.3f} | {r['ratio_bf16']:.2f} | {gib(b['peak_rss_bytes_wait4'])} |"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "threads": args.threads, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
