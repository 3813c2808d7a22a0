#!/usr/bin/env python3
"""Record diffusers' DDIMScheduler, PNDMScheduler and LMSDiscreteScheduler for the ldm Rust port.

Run once by hand from the repository root; the outputs are committed and read by
crates/ldm-core/tests/schedulers_ddim_pndm_lms.rs (PyTorch is never needed by the tests):

    /opt/ref/bin/python tests/reference/make_scheduler_refs_ddim_pndm_lms.py

Versions used: diffusers 0.42.1, torch 2.15.0, numpy 2.4.6, scipy 1.17.1 (see README.md here).
CPU, float32, fixed seeds: a rerun gives identical files.

Outputs (tests/fixtures/reference/):
  sched_ddim.safetensors, sched_pndm.safetensors, sched_lms.safetensors
  sched_ddim_pndm_lms.json   the index: every case's config, steps, eta and tensor names, and the
                             cases where diffusers raises (the Rust port must return an error).

Each scheduler is built the way the Rust loader builds it: the config dict is written to a
scheduler_config.json and read back with `XScheduler.from_config(json.load(...))`, so every key
of the file is explicit and absent keys take that class's own defaults. The configs are written
for DDIMScheduler (as the published LDM pipelines' are) and reused for PNDM and LMS, whose
extra keys are ignored as diffusers ignores them.

The index lists each class's configs once ("configs": {class: {config name: dict}}); a case
names its config. Per case `<name>` (tensor names are "<name>/<what>"):
  timesteps         every model call's timestep, float32 (PNDM repeats some)
  sigmas            LMS only: diffusers' `sigmas` (one per call and a final 0)
  init_noise_sigma  shape [1]
  inputs            [calls, N]: scale_model_input(x_i, t_i) at each call
  outputs           [calls, N]: step(model_outputs[i], t_i, x_i).prev_sample = x_{i+1}
  noise             DDIM with eta > 0 only, [calls, N]: the variance noise each step drew
Shared in each file: `sample0` [N] (x_0 = sample0 * init_noise_sigma) and `model_outputs`
[MAX_CALLS, N] (the fake model output of call i is row i).

DDIM with eta > 0 gets a torch.Generator passed to `step` (diffusers' LDM pipelines would use
the global generator instead, see design.md); a twin generator with the same seed records what
`randn_tensor` drew, one sample-shaped draw per step after the step's deterministic part.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "reference"
SHAPE = (1, 4, 2, 2)
N = int(np.prod(SHAPE))
MAX_CALLS = 80
STEPS = [1, 4, 10, 50]

# The published LDM configs (CompVis/ldm-text2im-large-256, CompVis/ldm-super-resolution-4x-openimages).
LDM_TXT2IMG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.0.4",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}
LDM_SUPERRES = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.0.4",
    "beta_end": 0.0155,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0015,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "trained_betas": None,
}
LINEAR_DEFAULT = {"_class_name": "DDIMScheduler"}  # every key at the class's default
COSINE_TRAILING_V = {
    "_class_name": "DDIMScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "timestep_spacing": "trailing",
    "prediction_type": "v_prediction",
    "clip_sample": False,
}
LINSPACE_SAMPLE_CLIP = {
    "_class_name": "DDIMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "timestep_spacing": "linspace",
    "prediction_type": "sample",
    "clip_sample": True,
    "clip_sample_range": 1.5,
}
TRAINED_50 = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 50,
    "trained_betas": [round(0.001 + 0.04 * (i / 49) ** 1.5, 8) for i in range(50)],
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def with_(base: dict, **kw) -> dict:
    d = dict(base)
    d.update(kw)
    return d


# (name, config, steps list) per scheduler.
DDIM_CASES = [
    ("ldm_txt2img", LDM_TXT2IMG, STEPS),
    ("ldm_superres", LDM_SUPERRES, STEPS),
    ("linear_default", LINEAR_DEFAULT, STEPS),
    ("cosine_trailing_v", COSINE_TRAILING_V, STEPS),
    ("linspace_sample_clip", LINSPACE_SAMPLE_CLIP, STEPS),
    ("trained_50", TRAINED_50, [1, 4, 10, 50]),
    # 61 trailing steps give 62 timesteps in diffusers, the last -1 (numpy arange's length).
    ("ldm_txt2img_trailing", with_(LDM_TXT2IMG, timestep_spacing="trailing"), [10, 61]),
]
PNDM_CASES = []
for name, cfg in [
    ("ldm_txt2img", LDM_TXT2IMG),
    ("ldm_superres", LDM_SUPERRES),
    ("linear_default", LINEAR_DEFAULT),
    ("cosine_trailing_v", COSINE_TRAILING_V),
    ("linspace", with_(LINSPACE_SAMPLE_CLIP, prediction_type="epsilon")),
    ("trained_50", TRAINED_50),
]:
    PNDM_CASES.append((name, cfg, STEPS))
    PNDM_CASES.append((name + "_skip", with_(cfg, skip_prk_steps=True), STEPS))
PNDM_CASES += [
    ("ldm_txt2img_trailing", with_(LDM_TXT2IMG, timestep_spacing="trailing"), [10, 61]),
    ("ldm_txt2img_trailing_skip", with_(LDM_TXT2IMG, timestep_spacing="trailing", skip_prk_steps=True), [61]),
]
LMS_CASES = [
    ("ldm_txt2img", LDM_TXT2IMG, STEPS),
    ("ldm_superres", LDM_SUPERRES, STEPS),
    ("linear_default", LINEAR_DEFAULT, STEPS),
    ("leading", with_(LDM_TXT2IMG, timestep_spacing="leading"), STEPS),
    ("cosine_trailing_v", COSINE_TRAILING_V, STEPS),
    ("karras", with_(LDM_TXT2IMG, use_karras_sigmas=True), STEPS),
    ("karras_leading", with_(LDM_TXT2IMG, use_karras_sigmas=True, timestep_spacing="leading"), [10]),
    ("exponential", with_(LDM_TXT2IMG, use_exponential_sigmas=True), [4, 10]),
    ("exponential_minmax", with_(LDM_TXT2IMG, use_exponential_sigmas=True, sigma_min=0.1, sigma_max=10.0), [10]),
    ("sample_pred", with_(LDM_TXT2IMG, prediction_type="sample"), [4, 10]),
    ("trained_50", TRAINED_50, [1, 4, 10, 50]),
    ("ldm_txt2img_trailing", with_(LDM_TXT2IMG, timestep_spacing="trailing"), [61]),
]
# Settings where diffusers raises (in set_timesteps or in the first step).
ERROR_CASES = [
    ("PNDMScheduler", "ldm_txt2img", LDM_TXT2IMG, 3),
    ("PNDMScheduler", "ldm_txt2img", LDM_TXT2IMG, 1),
    ("DDIMScheduler", "ldm_txt2img", LDM_TXT2IMG, 1001),
    # steps_offset 1 with 1000 steps asks for timestep 1000 (IndexError in step).
    ("DDIMScheduler", "ldm_txt2img", LDM_TXT2IMG, 1000),
    ("PNDMScheduler", "ldm_txt2img", LDM_TXT2IMG, 1000),
]

CLASSES = {"DDIMScheduler": DDIMScheduler, "PNDMScheduler": PNDMScheduler, "LMSDiscreteScheduler": LMSDiscreteScheduler}


def load(cls, config: dict, tmp: Path):
    """Writes the config to scheduler_config.json and loads it as the Rust loader does."""
    path = tmp / "scheduler_config.json"
    path.write_text(json.dumps(config, indent=2))
    with open(path) as f:
        return cls.from_config(json.load(f))


def run_chain(cls_name, config, steps, eta, sample0, model_outputs, tmp, seed):
    s = load(CLASSES[cls_name], config, tmp)
    s.set_timesteps(steps)
    timesteps = s.timesteps.clone()
    assert len(timesteps) <= MAX_CALLS
    init = s.init_noise_sigma
    init_t = torch.as_tensor(init, dtype=torch.float32).reshape(1)
    x = sample0.reshape(SHAPE) * init
    inputs, outputs, noises = [], [], []
    gen = twin = None
    if eta > 0:
        gen = torch.Generator().manual_seed(seed)
        twin = torch.Generator().manual_seed(seed)
    for i, t in enumerate(timesteps):
        inp = s.scale_model_input(x, t)
        mo = model_outputs[i].reshape(SHAPE)
        if cls_name == "DDIMScheduler":
            out = s.step(mo, t, x, eta=eta, generator=gen).prev_sample
            if eta > 0:
                noises.append(torch.randn(SHAPE, generator=twin).reshape(-1))
        else:
            out = s.step(mo, t, x).prev_sample
        inputs.append(inp.reshape(-1))
        outputs.append(out.reshape(-1))
        x = out
    rec = {
        "timesteps": timesteps.to(torch.float32),
        "init_noise_sigma": init_t,
        "inputs": torch.stack(inputs),
        "outputs": torch.stack(outputs),
    }
    if cls_name == "LMSDiscreteScheduler":
        rec["sigmas"] = s.sigmas.to(torch.float32).clone()
    if eta > 0:
        rec["noise"] = torch.stack(noises)
        # The recorded noise must be what the generator gave the step: replay with it.
        s2 = load(CLASSES[cls_name], config, tmp)
        s2.set_timesteps(steps)
        x2 = sample0.reshape(SHAPE) * s2.init_noise_sigma
        for i, t in enumerate(s2.timesteps):
            x2 = s2.step(model_outputs[i].reshape(SHAPE), t, x2, eta=eta, variance_noise=rec["noise"][i].reshape(SHAPE)).prev_sample
        assert torch.equal(x2.reshape(-1), rec["outputs"][-1]), "recorded variance noise does not replay"
    return rec


def main():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    sample0 = torch.randn(N, generator=g)
    model_outputs = torch.randn(MAX_CALLS, N, generator=g)
    OUT.mkdir(parents=True, exist_ok=True)
    index = {
        "generator": "tests/reference/make_scheduler_refs_ddim_pndm_lms.py",
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "sample_shape": list(SHAPE),
        "max_calls": MAX_CALLS,
        "files": {},
        "configs": {},
        "cases": [],
        "errors": [],
    }
    seed = 100
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for cls_name, short, cases in [
            ("DDIMScheduler", "ddim", DDIM_CASES),
            ("PNDMScheduler", "pndm", PNDM_CASES),
            ("LMSDiscreteScheduler", "lms", LMS_CASES),
        ]:
            fname = f"sched_{short}.safetensors"
            tensors = {"sample0": sample0.clone(), "model_outputs": model_outputs.clone()}
            configs = index["configs"].setdefault(cls_name, {})
            for cname, cfg, steps_list in cases:
                configs[cname] = cfg
                for steps in steps_list:
                    if cls_name == "PNDMScheduler" and steps < 4 and not cfg.get("skip_prk_steps", False):
                        continue  # diffusers raises: recorded in ERROR_CASES
                    etas = [0.0, 0.5] if cls_name == "DDIMScheduler" else [0.0]
                    for eta in etas:
                        seed += 1
                        name = f"{cname}.s{steps}" + (f".eta{eta:g}" if cls_name == "DDIMScheduler" else "")
                        rec = run_chain(cls_name, cfg, steps, eta, sample0, model_outputs, tmp, seed)
                        for k, v in rec.items():
                            tensors[f"{name}/{k}"] = v.contiguous()
                        index["cases"].append(
                            {
                                "name": name,
                                "class": cls_name,
                                "file": fname,
                                "config": cname,
                                "steps": steps,
                                "eta": eta,
                                "calls": int(rec["timesteps"].numel()),
                                "keys": sorted(rec.keys()),
                            }
                        )
            save_file(tensors, str(OUT / fname), metadata={"generator": index["generator"]})
            os.chmod(OUT / fname, 0o644)
            index["files"][short] = fname
        for cls_name, cname, cfg, steps in ERROR_CASES:
            try:
                s = load(CLASSES[cls_name], cfg, tmp)
                s.set_timesteps(steps)
                x = sample0.reshape(SHAPE)
                for i, t in enumerate(s.timesteps[:2]):
                    x = s.step(model_outputs[i].reshape(SHAPE), t, x).prev_sample
            except Exception as e:  # noqa: BLE001 - we record what diffusers raises
                index["errors"].append(
                    {"class": cls_name, "config_name": cname, "config": cfg, "steps": steps, "diffusers_error": f"{type(e).__name__}: {e}"}
                )
            else:
                raise SystemExit(f"expected diffusers to raise for {cls_name} {cname} steps={steps}")
    (OUT / "sched_ddim_pndm_lms.json").write_text(json.dumps(index, indent=1) + "\n")
    total = 0
    for short in ("ddim", "pndm", "lms"):
        size = (OUT / f"sched_{short}.safetensors").stat().st_size
        total += size
        print(f"sched_{short}.safetensors: {size} bytes")
    print(f"{len(index['cases'])} cases, {len(index['errors'])} error cases, {total} bytes of tensors")


if __name__ == "__main__":
    main()
