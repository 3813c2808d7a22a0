#!/usr/bin/env python3
"""Record the shared end-to-end test cases (tests/cases/) from diffusers.

Every case is one JSON file (parameters) plus the expected image as a float32 .npy, recorded
with diffusers on the tiny fixture models of tests/fixtures/. Every front end (Rust core, the
`ldm` CLI, the C ABI, the browser) runs every case. The format is described in
tests/cases/README.md.

The reference loops below are written out by hand so that they follow the port's semantics,
which differ from diffusers' LDMTextToImagePipeline in two deliberate ways (design.md):
  * the initial latents are multiplied by scheduler.init_noise_sigma (read after set_timesteps),
    and the UNet input goes through scheduler.scale_model_input;
  * the one seeded generator is handed to scheduler.step, so DDIM with eta > 0 and Euler
    ancestral draw their step noise from it, after the initial latents.
For DDIM and PNDM both changes are identities, and the script asserts that those cases equal
the diffusers pipelines' own output bit for bit. It also checks every other case against the
pipeline with the generator injected into step (and, for txt2img, with the two changes undone).

Run once by hand; the outputs are committed. PyTorch is never needed by the project's tests.

Usage:
    /opt/ref/bin/python tests/reference/make_cases.py [--repo-root PATH] [--skip-f64]
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffusers
import diffusers.schedulers.scheduling_ddim as _sched_ddim
import diffusers.schedulers.scheduling_dpmsolver_multistep as _sched_dpm
import diffusers.schedulers.scheduling_euler_ancestral_discrete as _sched_euler_a
import diffusers.schedulers.scheduling_euler_discrete as _sched_euler
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LDMSuperResolutionPipeline,
    LDMTextToImagePipeline,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
CLASS_BY_NAME = {cls.__name__: cls for cls in SCHEDULERS.values()}

# LDMTextToImagePipeline.__call__ defaults; the super-resolution pipeline has the same steps/eta.
TXT2IMG_DEFAULTS = {"steps": 50, "guidance": 1.0, "eta": 0.0}
SUPERRES_DEFAULTS = {"steps": 100, "eta": 0.0}
MAX_LENGTH = 77  # hard-coded by LDMTextToImagePipeline
SIZE_BUDGET = 3 * 1024 * 1024
# The super-resolution seeds were picked (out of 0..11, 0..15 for superres-resize-eta) so that no latent of the final sample is
# nearly equidistant from two VQ codes: an implementation whose latents are off by d can flip a
# code only where this margin is below 2d, and a flipped code changes a 4x4 output patch a lot.
VQ_MARGIN_MIN = 2.5e-4
# diffusers' float32 output must lie this close to a float64 run of the same loop: a tenth of
# the cases' tolerance, so that the tolerance leaves room for another f32 implementation.
F64_CHECK_MAX = 1e-5
# The super-resolution latents grow to |x| ~ 20..55 with these random models; f32 and f64 runs
# differ by up to ~2e-5 there, so they get their own absolute tolerance.
LATENTS_TOLERANCE = 5e-4

PROMPT_SQUIRREL = "a painting of a squirrel eating a burger"
PROMPT_SHOUTY = "A RED Circle, on the LEFT!!! (blue background?)"
PROMPT_ACCENTS = "café naïve résumé Ångström"

# --------------------------------------------------------------------------------------------
# The cases. Keys of "params" that are absent mean the pipeline's defaults.
# Extra keys used only here: "latents_seed" (makes the given-latents .npy), "check_seed_alias"
# (a seed that must give the same output), "resized" (the input must need a resize).
# --------------------------------------------------------------------------------------------
CASES = [
    dict(
        name="txt2img-ddim-cfg",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SQUIRREL], steps=4, guidance=3.0, eta=0.0, seed=0),
        note="The model's own scheduler (DDIM from scheduler_config.json), classifier-free guidance "
        "with one batched UNet call [uncond, cond] per step. Equals LDMTextToImagePipeline "
        "(output_type='np') bit for bit.",
    ),
    dict(
        name="txt2img-ddim-nocfg",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SQUIRREL], steps=4, guidance=1.0, eta=0.0, seed=1),
        note="Guidance 1.0: no unconditional branch, the UNet sees batch 1. Equals "
        "LDMTextToImagePipeline bit for bit.",
    ),
    dict(
        name="txt2img-ddim-eta",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SQUIRREL], steps=5, guidance=3.0, eta=0.5, seed=2,
                    scheduler="ddim"),
        note="DDIM with eta 0.5: every step draws variance noise (shape of the latents) from the "
        "same generator, after the initial latents. diffusers' pipeline would draw it from torch's "
        "global generator instead; this is the port's semantics (design.md). Scheduler named "
        "explicitly: same as the model's own.",
    ),
    dict(
        name="txt2img-pndm",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SQUIRREL], steps=4, guidance=3.0, seed=3, scheduler="pndm"),
        note="PNDM from the model's scheduler_config.json (skip_prk_steps false, its default): "
        "4 steps give 13 UNet calls (3 Runge-Kutta steps of 4 calls, then PLMS). diffusers refuses "
        "fewer than 4 steps with PRK. init_noise_sigma 1 and scale_model_input is the identity, "
        "so this equals LDMTextToImagePipeline bit for bit.",
    ),
    dict(
        name="txt2img-lms",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SHOUTY], steps=4, guidance=3.0, seed=4, scheduler="lms"),
        note="LMSDiscrete (order 4): latents times init_noise_sigma (taken after set_timesteps: "
        "sqrt(sigma_max^2 + 1) over the chosen timesteps, ~4.236 here) and UNet input divided by "
        "sqrt(sigma^2 + 1). Upper case and punctuation in the prompt (lower-cased, "
        "punctuation split off, 'circle' and 'background' split by WordPiece).",
    ),
    dict(
        name="txt2img-euler",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_ACCENTS], steps=4, guidance=3.0, seed=5, scheduler="euler"),
        note="EulerDiscrete (s_churn 0: no noise). Prompt with accents, which the tokenizer strips "
        "(do_lower_case with strip_accents unset): caf ##e na ##ive res ##ume ang ##st ##rom.",
    ),
    dict(
        name="txt2img-euler-a",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SQUIRREL], steps=4, guidance=3.0, seed=6, scheduler="euler-a"),
        note="EulerAncestralDiscrete: each step draws noise (shape of the latents) from the same "
        "generator, after the initial latents; also on the last step, where sigma_up is 0.",
    ),
    dict(
        name="txt2img-dpmpp",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SQUIRREL], steps=5, guidance=3.0, seed=7, scheduler="dpm++"),
        note="DPMSolverMultistep (dpmsolver++, order 2, lower_order_final). Its 'leading' spacing "
        "is its own: 1000 // (steps + 1) = 166 apart, plus steps_offset 1, so 5 steps are "
        "831, 665, 499, 333, 167 (DDIM's would be 801, 601, 401, 201, 1).",
    ),
    dict(
        name="txt2img-euler-a-nocfg",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SHOUTY], steps=3, guidance=1.0, seed=8, scheduler="euler-a"),
        note="Euler ancestral without guidance: scale_model_input and the step noise on batch 1.",
    ),
    dict(
        name="txt2img-batch2-cfg",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=["a red circle", PROMPT_SHOUTY], steps=3, guidance=3.0, eta=0.0,
                    seed=9),
        note="Two prompts: latents (2,4,8,8) drawn in one randn call; the UNet batch is "
        "[uncond, uncond, cond0, cond1]. Output image i belongs to prompt i. Equals "
        "LDMTextToImagePipeline bit for bit.",
    ),
    dict(
        name="txt2img-nonsquare",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SQUIRREL], steps=3, guidance=3.0, eta=0.0, seed=10,
                    height=64, width=96),
        note="height 64, width 96: latents (1,4,8,12), output (1,64,96,3). Checks that height and "
        "width are not swapped. Equals LDMTextToImagePipeline bit for bit.",
    ),
    dict(
        name="txt2img-given-latents",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SQUIRREL], steps=3, guidance=3.0, eta=0.0, seed=0),
        latents="txt2img-latents.npy",
        latents_seed=12345,
        note="Initial latents given (txt2img-latents.npy, float32 (1,4,8,8)), so the generator "
        "draws nothing for them; with DDIM eta 0 the seed is unused. Equals "
        "LDMTextToImagePipeline(latents=...) bit for bit.",
    ),
    dict(
        name="txt2img-seed-large",
        pipeline="txt2img",
        model="txt2img-tiny",
        params=dict(prompts=[PROMPT_SQUIRREL], steps=3, guidance=3.0, eta=0.0, seed=2**32 + 7),
        check_seed_alias=7,
        note="Seed 2**32 + 7: torch's CPU generator seeds its mt19937 with seed & 0xffffffff, so "
        "this equals seed 7 (the script asserts it). Equals LDMTextToImagePipeline bit for bit.",
    ),
    dict(
        name="superres-ddim",
        pipeline="superres",
        model="superres-tiny",
        params=dict(steps=4, eta=0.0, seed=0),
        image="sr-input-32.png",
        note="32x32 input, no resize: latents (1,3,32,32), output (1,128,128,3). The model's own "
        "DDIM (set_alpha_to_one true). Equals LDMSuperResolutionPipeline bit for bit.",
    ),
    dict(
        name="superres-ddim-eta",
        pipeline="superres",
        model="superres-tiny",
        params=dict(steps=4, eta=1.0, seed=2),
        image="sr-input-32.png",
        note="DDIM with eta 1.0 (the published model card uses eta=1): variance noise from the "
        "same generator, after the initial latents. The last step (t=1, alpha_prev 1) has "
        "variance 0 but still draws its noise.",
    ),
    dict(
        name="superres-euler-a",
        pipeline="superres",
        model="superres-tiny",
        params=dict(steps=4, seed=10, scheduler="euler-a"),
        image="sr-input-32.png",
        note="Euler ancestral from the superres scheduler_config.json. As in "
        "LDMSuperResolutionPipeline, scale_model_input divides the whole 6-channel concatenation "
        "[latents, image] by sqrt(sigma^2 + 1), the low-res image included.",
    ),
    dict(
        name="superres-dpmpp",
        pipeline="superres",
        model="superres-tiny",
        params=dict(steps=5, seed=7, scheduler="dpm++"),
        image="sr-input-32.png",
        note="DPMSolverMultistep on super-resolution (init_noise_sigma 1, no input scaling).",
    ),
    dict(
        name="superres-resize",
        pipeline="superres",
        model="superres-tiny",
        params=dict(steps=3, eta=0.0, seed=10),
        image="sr-input-45x38.png",
        resized=True,
        note="45x38 input (w x h) resized down to 32x32 with Pillow's Image.LANCZOS before /255 "
        "and 2x-1. The expected output depends on Pillow's Lanczos resampling: a resize that "
        "differs from Pillow's by one 8-bit level changes the model input by 2/255. "
        "sr-resize-45x38.npy holds the resized input (1,3,32,32) in [-1,1] so that a test can "
        "tell a resize mismatch from a model mismatch. Equals LDMSuperResolutionPipeline bit "
        "for bit.",
    ),
    dict(
        name="superres-resize-eta",
        pipeline="superres",
        model="superres-tiny",
        params=dict(steps=3, eta=0.5, seed=12),
        image="sr-input-70x32.png",
        resized=True,
        note="Non-square 70x32 input (w x h) resized down to 64x32 with Pillow's Image.LANCZOS "
        "(only the width changes), DDIM eta 0.5. Output (1,128,256,3). The expected output "
        "depends on Pillow's Lanczos resampling; sr-resize-70x32.npy holds the resized input "
        "(1,3,32,64) in [-1,1].",
    ),
]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def make_input_png(path: Path, width: int, height: int, seed: int) -> None:
    """A small deterministic RGB picture: gradients, a disc, a bar, and some seeded noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    img = np.stack([0.15 + 0.7 * u, 0.2 + 0.6 * v, 0.8 - 0.5 * u * v], axis=-1)
    cx, cy, r = rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height, 0.28 * min(width, height)
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
    img[disc] = rng.uniform(0.0, 1.0, size=3)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    img[y0:y0 + max(2, height // 8), x0:x0 + width // 2] = rng.uniform(0.0, 1.0, size=3)
    img += rng.normal(0.0, 0.04, size=img.shape)
    arr = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode="RGB").save(path, format="PNG")


def preprocess_superres(pil: Image.Image) -> tuple[torch.Tensor, bool]:
    """As LDMSuperResolutionPipeline's preprocess: size down to a multiple of 32, Lanczos, [-1, 1]."""
    w, h = pil.size
    w2, h2 = w - w % 32, h - h % 32
    resized = (w2, h2) != (w, h)
    pil = pil.resize((w2, h2), resample=Image.LANCZOS)
    arr = np.array(pil).astype(np.float32) / 255.0
    t = torch.from_numpy(arr[None].transpose(0, 3, 1, 2).copy())
    return 2.0 * t - 1.0, resized


# --------------------------------------------------------------------------------------------
# Models and schedulers
# --------------------------------------------------------------------------------------------
def scheduler_from_file(model_dir: Path, name: str | None):
    """Build the scheduler from the folder's scheduler_config.json read as a plain dict, so every
    key of the file is explicit (design.md: a config still in memory would fall back to the new
    class's defaults for keys that were defaults at construction)."""
    with open(model_dir / "scheduler" / "scheduler_config.json") as f:
        cfg = json.load(f)
    cls = CLASS_BY_NAME[cfg["_class_name"]] if name is None else SCHEDULERS[name]
    return cls.from_config(cfg)


class CountingUNet:
    """Calls the UNet and records each call's timestep."""

    def __init__(self, unet):
        self.unet = unet
        self.timesteps: list = []

    def __call__(self, *args, **kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.timesteps.append(t.item() if torch.is_tensor(t) else t)
        return self.unet(*args, **kwargs)


def step_kwargs(scheduler, eta: float, generator: torch.Generator) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kw = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params:
        kw["generator"] = generator
    return kw


def draw_seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# The reference loops
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def run_txt2img(parts, scheduler, p: dict, given_latents: torch.Tensor | None, dtype=torch.float32,
                compat: bool = False):
    """Text to image as the port computes it. compat=True undoes the two deliberate changes
    (init_noise_sigma, scale_model_input) and is used only to check the loop against diffusers'
    pipeline."""
    tokenizer, bert, unet, vqvae = parts
    prompts = p["prompts"]
    steps = p.get("steps", TXT2IMG_DEFAULTS["steps"])
    guidance = p.get("guidance", TXT2IMG_DEFAULTS["guidance"])
    eta = p.get("eta", TXT2IMG_DEFAULTS["eta"])
    vae_scale = 2 ** (len(vqvae.config.block_out_channels) - 1)
    height = p.get("height", unet.config.sample_size * vae_scale)
    width = p.get("width", unet.config.sample_size * vae_scale)
    batch = len(prompts)

    def embed(texts):
        ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        return bert(ids)[0]

    if guidance != 1.0:
        uncond = embed([""] * batch)
    cond = embed(prompts)

    generator = draw_seed(p["seed"])
    shape = (batch, unet.config.in_channels, height // 8, width // 8)
    if given_latents is None:
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    else:
        assert tuple(given_latents.shape) == shape, (given_latents.shape, shape)
        latents = given_latents.clone().to(dtype)

    scheduler.set_timesteps(steps)
    if not compat:
        latents = latents * scheduler.init_noise_sigma
    kw = step_kwargs(scheduler, eta, generator)
    counter = CountingUNet(unet)
    for t in scheduler.timesteps:
        if guidance == 1.0:
            model_in, context = latents, cond
        else:
            model_in, context = torch.cat([latents] * 2), torch.cat([uncond, cond])
        if not compat:
            model_in = scheduler.scale_model_input(model_in, t)
        noise_pred = counter(model_in, t, encoder_hidden_states=context).sample
        if guidance != 1.0:
            eps_uncond, eps_text = noise_pred.chunk(2)
            noise_pred = eps_uncond + guidance * (eps_text - eps_uncond)
        latents = scheduler.step(noise_pred, t, latents, **kw).prev_sample

    latents = 1 / vqvae.config.scaling_factor * latents
    image = vqvae.decode(latents).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    return image.permute(0, 2, 3, 1).numpy(), counter.timesteps, latents


@torch.no_grad()
def run_superres(parts, scheduler, p: dict, image: torch.Tensor, dtype=torch.float32):
    unet, vqvae = parts
    steps = p.get("steps", SUPERRES_DEFAULTS["steps"])
    eta = p.get("eta", SUPERRES_DEFAULTS["eta"])
    batch, _, h, w = image.shape
    generator = draw_seed(p["seed"])
    latents = torch.randn((batch, unet.config.in_channels // 2, h, w), generator=generator,
                          dtype=torch.float32).to(dtype)
    image = image.to(dtype)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    kw = step_kwargs(scheduler, eta, generator)
    counter = CountingUNet(unet)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, image], dim=1), t)
        noise_pred = counter(model_in, t).sample
        latents = scheduler.step(noise_pred, t, latents, **kw).prev_sample
    out = vqvae.decode(latents).sample
    out = torch.clamp(out, -1.0, 1.0) / 2 + 0.5
    return out.permute(0, 2, 3, 1).numpy(), counter.timesteps, latents


def with_generator_in_step(scheduler, generator):
    """Make diffusers' pipelines hand our generator to scheduler.step (they pass none)."""
    if "generator" not in inspect.signature(scheduler.step).parameters:
        return scheduler
    original = scheduler.step

    @functools.wraps(original)
    def step(*args, **kwargs):
        kwargs.setdefault("generator", generator)
        return original(*args, **kwargs)

    scheduler.step = step
    return scheduler


# --------------------------------------------------------------------------------------------
# float64 comparison
# --------------------------------------------------------------------------------------------
class Float32Noise:
    """In the float64 run, draw the schedulers' step noise in float32 (then upcast), so that both
    runs see the same random numbers: torch.randn gives other values for float64."""

    MODULES = (_sched_ddim, _sched_euler_a, _sched_euler, _sched_dpm)

    def __enter__(self):
        self.saved = [m.randn_tensor for m in self.MODULES]
        for m, orig in zip(self.MODULES, self.saved):
            def patched(shape, generator=None, device=None, dtype=None, layout=None, _orig=orig):
                return _orig(shape, generator=generator, device=device, dtype=torch.float32,
                             layout=layout).to(dtype)
            m.randn_tensor = patched
        return self

    def __exit__(self, *exc):
        for m, orig in zip(self.MODULES, self.saved):
            m.randn_tensor = orig


@torch.no_grad()
def vq_margin(vqvae, latents: torch.Tensor) -> float:
    """Smallest gap between the nearest and second-nearest codebook distance over all positions."""
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    codebook = vqvae.quantize.embedding.weight.double()
    d = torch.cdist(z, codebook)
    two = d.topk(2, dim=1, largest=False).values
    return float((two[:, 1] - two[:, 0]).min())


# --------------------------------------------------------------------------------------------
def save_npy(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr, dtype="<f4")
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def stats(x: np.ndarray) -> str:
    return f"min {x.min():.4f} max {x.max():.4f} mean {x.mean():.4f} std {x.std():.4f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo-root", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--skip-f64", action="store_true", help="skip the float64 comparison")
    args = ap.parse_args()
    root = Path(args.repo_root)
    fixtures = root / "tests" / "fixtures"
    out = root / "tests" / "cases"
    out.mkdir(parents=True, exist_ok=True)
    # The script owns tests/cases/ except its README.md and the shipped-model cases
    # (make_shipped_cases.py).
    for f in out.iterdir():
        if f.is_file() and f.name != "README.md" and not f.name.startswith("shipped-"):
            f.unlink()

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, numpy {np.__version__}, "
          f"Pillow {Image.__version__}")

    # Inputs.
    make_input_png(out / "sr-input-32.png", 32, 32, seed=401)
    make_input_png(out / "sr-input-45x38.png", 45, 38, seed=402)
    make_input_png(out / "sr-input-70x32.png", 70, 32, seed=403)

    t2i_dir, sr_dir = fixtures / "txt2img-tiny", fixtures / "superres-tiny"
    t2i_pipe = LDMTextToImagePipeline.from_pretrained(str(t2i_dir))
    sr_pipe = LDMSuperResolutionPipeline.from_pretrained(str(sr_dir))
    t2i_parts = (t2i_pipe.tokenizer, t2i_pipe.bert.eval(), t2i_pipe.unet.eval(), t2i_pipe.vqvae.eval())
    sr_parts = (sr_pipe.unet.eval(), sr_pipe.vqvae.eval())
    t2i_parts64 = (t2i_parts[0],) + tuple(copy.deepcopy(m).double() for m in t2i_parts[1:])
    sr_parts64 = tuple(copy.deepcopy(m).double() for m in sr_parts)

    f64_report = []
    written = {"README.md", "sr-input-32.png", "sr-input-45x38.png", "sr-input-70x32.png"}
    for case in CASES:
        name, kind = case["name"], case["pipeline"]
        p = case["params"]
        model_dir = fixtures / case["model"]
        sched_name = p.get("scheduler")
        record = {
            "name": name,
            "pipeline": kind,
            "model": case["model"],
            "params": p,
        }
        print(f"\n[{name}] {json.dumps(p, ensure_ascii=False)}")

        if kind == "txt2img":
            given = None
            if "latents" in case:
                shape = (len(p["prompts"]), 4, p.get("height", 64) // 8, p.get("width", 64) // 8)
                given = torch.randn(shape, generator=draw_seed(case["latents_seed"]))
                assert case["latents"] not in written
                written.add(case["latents"])
                save_npy(out / case["latents"], given.numpy())
                record["latents"] = case["latents"]
            image, timesteps, final = run_txt2img(t2i_parts, scheduler_from_file(model_dir, sched_name),
                                                  p, given)

            # The loop with the two port changes undone must equal diffusers' pipeline (with the
            # generator handed to step); for DDIM/PNDM the port's loop itself must.
            compat, _, _ = run_txt2img(t2i_parts, scheduler_from_file(model_dir, sched_name), p, given,
                                       compat=True)
            gen = draw_seed(p["seed"])
            t2i_pipe.scheduler = with_generator_in_step(scheduler_from_file(model_dir, sched_name), gen)
            kwargs = {}
            if "height" in p:
                kwargs["height"] = p["height"]
            if "width" in p:
                kwargs["width"] = p["width"]
            if given is not None:
                kwargs["latents"] = given.clone()
            call = dict(num_inference_steps=p.get("steps", TXT2IMG_DEFAULTS["steps"]),
                        guidance_scale=p.get("guidance", TXT2IMG_DEFAULTS["guidance"]),
                        eta=p.get("eta", TXT2IMG_DEFAULTS["eta"]), output_type="np", **kwargs)
            pipe_img = t2i_pipe(p["prompts"], generator=gen, **call).images
            assert np.array_equal(compat, pipe_img), f"{name}: compat loop != pipeline"
            plain = sched_name in (None, "ddim", "pndm") and p.get("eta", 0.0) == 0.0
            if sched_name in (None, "ddim", "pndm"):
                assert np.array_equal(image, compat), f"{name}: port loop != compat loop for DDIM/PNDM"
            if plain:
                # The unmodified pipeline (no generator in step) too.
                t2i_pipe.scheduler = scheduler_from_file(model_dir, sched_name)
                plain_img = t2i_pipe(p["prompts"], generator=draw_seed(p["seed"]), **call).images
                assert np.array_equal(image, plain_img), f"{name}: != LDMTextToImagePipeline"
                print("  == LDMTextToImagePipeline(output_type='np') bit for bit")
            else:
                print("  compat loop == pipeline with generator in step, bit for bit")
            if "check_seed_alias" in case:
                alias = dict(p, seed=case["check_seed_alias"])
                img2, _, _ = run_txt2img(t2i_parts, scheduler_from_file(model_dir, sched_name), alias, given)
                assert np.array_equal(image, img2), f"{name}: seed alias differs"
                print(f"  == seed {case['check_seed_alias']} bit for bit")
            if not args.skip_f64:
                with Float32Noise():
                    img64, _, _ = run_txt2img(t2i_parts64, scheduler_from_file(model_dir, sched_name),
                                              p, None if given is None else given.double(),
                                              dtype=torch.float64)
                d = np.abs(image.astype(np.float64) - img64)
                assert d.max() < F64_CHECK_MAX, f"{name}: f32 and f64 differ by {d.max()}"
                f64_report.append((name, float(d.max()), float(d.mean()), None))
                print(f"  f32 vs f64: max {d.max():.3e} mean {d.mean():.3e}")
        else:
            pil = Image.open(out / case["image"]).convert("RGB")
            lowres, resized = preprocess_superres(pil)
            assert resized == bool(case.get("resized")), name
            record["image"] = case["image"]
            if resized:
                rname = f"sr-resize-{pil.size[0]}x{pil.size[1]}.npy"
                assert rname not in written
                written.add(rname)
                save_npy(out / rname, lowres.numpy())
                record["resized_input"] = rname
            image, timesteps, final = run_superres(sr_parts, scheduler_from_file(model_dir, sched_name),
                                                   p, lowres)
            gen = draw_seed(p["seed"])
            sr_pipe.scheduler = with_generator_in_step(scheduler_from_file(model_dir, sched_name), gen)
            call = dict(num_inference_steps=p.get("steps", SUPERRES_DEFAULTS["steps"]),
                        eta=p.get("eta", SUPERRES_DEFAULTS["eta"]), output_type="np")
            pipe_img = sr_pipe(pil, generator=gen, **call).images
            assert np.array_equal(image, pipe_img), f"{name}: != pipeline with generator in step"
            needs_gen = sched_name == "euler-a" or p.get("eta", 0.0) > 0
            if not needs_gen:
                sr_pipe.scheduler = scheduler_from_file(model_dir, sched_name)
                plain_img = sr_pipe(pil, generator=draw_seed(p["seed"]), **call).images
                assert np.array_equal(image, plain_img), f"{name}: != LDMSuperResolutionPipeline"
                print("  == LDMSuperResolutionPipeline(output_type='np') bit for bit")
            else:
                print("  == LDMSuperResolutionPipeline with generator in step, bit for bit")
            margin = vq_margin(sr_parts[1], final)
            print(f"  VQ nearest-code margin {margin:.3e}")
            assert margin > VQ_MARGIN_MIN, f"{name}: VQ quantisation too close to a tie ({margin})"
            if not args.skip_f64:
                with Float32Noise():
                    img64, _, final64 = run_superres(sr_parts64, scheduler_from_file(model_dir, sched_name),
                                                     p, lowres, dtype=torch.float64)
                d = np.abs(image.astype(np.float64) - img64)
                assert d.max() < F64_CHECK_MAX, f"{name}: f32 and f64 differ by {d.max()}"
                dl = float((final.double() - final64).abs().max())
                assert dl < LATENTS_TOLERANCE / 10, f"{name}: f32 and f64 latents differ by {dl}"
                f64_report.append((name, float(d.max()), float(d.mean()), dl))
                print(f"  f32 vs f64: max {d.max():.3e} mean {d.mean():.3e} (final latents max {dl:.3e}, "
                      f"max|latents| {float(final.abs().max()):.1f})")

        assert image.dtype == np.float32, image.dtype
        assert np.isfinite(image).all(), f"{name}: non-finite output"
        assert image.std() > 0.01, f"{name}: degenerate output (std {image.std()})"
        assert image.min() >= 0.0 and image.max() <= 1.0
        print(f"  image {tuple(image.shape)} {stats(image)}; model calls {len(timesteps)}")

        record["expected"] = f"{name}.npy"
        record["tolerance"] = 1e-4
        if kind == "superres":
            # The VQ decoder quantises, so the image only shows which code each latent picked:
            # a sampling error below the code margin leaves it unchanged (to ~1e-6). The final
            # latents let a test that can reach them check the sampling loop itself.
            record["expected_latents"] = f"{name}-latents.npy"
            assert record["expected_latents"] not in written
            written.add(record["expected_latents"])
            save_npy(out / record["expected_latents"], final.numpy())
            record["latents_tolerance"] = LATENTS_TOLERANCE
        record["model_calls"] = len(timesteps)
        record["timesteps"] = timesteps
        record["note"] = case["note"]
        if kind == "superres":
            record["note"] += (f" Seed chosen so that every final latent is at least {margin:.1e} "
                               "closer to its VQ code than to the next one.")
        for fname in (record["expected"], f"{name}.json"):
            assert fname not in written, f"{fname} written twice"
            written.add(fname)
        save_npy(out / record["expected"], image)
        with open(out / f"{name}.json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, ensure_ascii=False)
            f.write("\n")

    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print("\nfiles:")
    for f in sorted(out.iterdir()):
        if f.is_file():
            md5 = hashlib.md5(f.read_bytes()).hexdigest()
            print(f"  {f.stat().st_size:8d}  {md5}  {f.name}")
    print(f"total {total} bytes ({total / 1024 / 1024:.2f} MiB)")
    assert total < SIZE_BUDGET, "tests/cases over its 3 MB budget"
    if f64_report:
        print("\nf32 vs f64 (image max / mean abs diff; superres: final latents max abs diff):")
        for name, mx, mean, dl in f64_report:
            print(f"  {name:24s} {mx:.3e} {mean:.3e}" + ("" if dl is None else f"  {dl:.3e}"))
    print("\n[ok] all cases recorded and checked")


if __name__ == "__main__":
    sys.exit(main())
