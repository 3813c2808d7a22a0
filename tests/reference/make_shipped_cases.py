#!/usr/bin/env python3
"""Record the shared cases of the shipped models (tests/cases/shipped-*) from diffusers.

The same format and reference loops as make_cases.py (imported from it), on models/ldm-shapes
and models/ldm-shapes-superres instead of the tiny random fixtures: every front end that runs
tests/cases/ (core, CLI, C ABI, browser) then shows the same numbers for the shipped model.
Run after make_cases.py (which leaves shipped-* files alone) and after retraining the models.

Usage:
    /opt/ref/bin/python tests/reference/make_shipped_cases.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_cases as mc  # noqa: E402
from diffusers import LDMSuperResolutionPipeline, LDMTextToImagePipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "cases"
# Case "model" fields are folders under tests/fixtures/.
T2I_MODEL = "../../models/ldm-shapes"
SR_MODEL = "../../models/ldm-shapes-superres"

CASES = [
    {
        "name": "shipped-txt2img",
        "pipeline": "txt2img",
        "model": T2I_MODEL,
        "params": {"prompts": ["a big red circle on the left, blue background",
                               "a small yellow triangle on the right, black background"],
                   "steps": 10, "guidance": 4.0, "eta": 0.0, "seed": 0},
        "note": "The shipped text-to-image model, guided, a batch of two.",
    },
    {
        "name": "shipped-txt2img-euler-a",
        "pipeline": "txt2img",
        "model": T2I_MODEL,
        "params": {"prompts": ["a green square"], "steps": 8, "guidance": 3.0, "seed": 5,
                   "scheduler": "euler-a"},
        "note": "The shipped text-to-image model with Euler ancestral (step noise from the seed).",
    },
]


# No super-resolution case: the shipped VQModel's codebook has codes so close together that no
# seed keeps every final latent clear of a tie (make_cases.py's VQ margin), so float rounding could
# flip a code. The shipped super-resolution model is measured by PSNR in the shipped-model tests.


def main() -> None:
    for f in OUT.glob("shipped-*"):
        f.unlink()
    fixtures = ROOT / "tests" / "fixtures"
    t2i = LDMTextToImagePipeline.from_pretrained(str(fixtures / T2I_MODEL))
    sr = LDMSuperResolutionPipeline.from_pretrained(str(fixtures / SR_MODEL))
    t2i_parts = (t2i.tokenizer, t2i.bert.eval(), t2i.unet.eval(), t2i.vqvae.eval())
    sr_parts = (sr.unet.eval(), sr.vqvae.eval())
    for case in CASES:
        name, p = case["name"], case["params"]
        model_dir = fixtures / case["model"]
        sched = mc.scheduler_from_file(model_dir, p.get("scheduler"))
        record = {k: case[k] for k in ("name", "pipeline", "model", "params")}
        if case["pipeline"] == "txt2img":
            image, timesteps, _ = mc.run_txt2img(t2i_parts, sched, p, None)
        else:
            pil = Image.open(OUT / case["image"]).convert("RGB")
            lowres, resized = mc.preprocess_superres(pil)
            assert not resized
            record["image"] = case["image"]
            # The VQ decoder quantises: pick the first seed whose final latents are clear of a
            # tie between codes, so that float rounding cannot flip one (as make_cases.py does).
            for seed in range(p["seed"], p["seed"] + 50):
                p["seed"] = seed
                sched = mc.scheduler_from_file(model_dir, p.get("scheduler"))
                image, timesteps, final = mc.run_superres(sr_parts, sched, p, lowres)
                margin = mc.vq_margin(sr_parts[1], final)
                if margin > mc.VQ_MARGIN_MIN:
                    break
            assert margin > mc.VQ_MARGIN_MIN, f"no seed with a VQ margin above {mc.VQ_MARGIN_MIN}"
            print(f"  seed {seed}: VQ nearest-code margin {margin:.3e}")
            record["note"] = case["note"] + f" Seed chosen so that every final latent is at least {margin:.1e} closer to its VQ code than to the next one."
            record["expected_latents"] = f"{name}-latents.npy"
            mc.save_npy(OUT / record["expected_latents"], final.numpy())
            record["latents_tolerance"] = mc.LATENTS_TOLERANCE
        assert np.isfinite(image).all() and image.dtype == np.float32
        record["expected"] = f"{name}.npy"
        record["tolerance"] = 1e-4
        record["model_calls"] = len(timesteps)
        record["timesteps"] = timesteps
        record.setdefault("note", case["note"])
        mc.save_npy(OUT / record["expected"], image)
        with open(OUT / f"{name}.json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, ensure_ascii=False)
            f.write("\n")
        print(f"[{name}] image {tuple(image.shape)} {mc.stats(image)}; model calls {len(timesteps)}")
    print("[ok] shipped cases recorded")


if __name__ == "__main__":
    main()
