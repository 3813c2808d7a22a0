#!/usr/bin/env python3
"""Reference chains of diffusers' EulerDiscrete, EulerAncestralDiscrete and DPMSolverMultistep
schedulers, for crates/ldm-core/tests/schedulers_euler_dpm.rs.

Run once by hand; the outputs are committed, so the Rust tests never need PyTorch:

    /opt/ref/bin/python tests/reference/make_scheduler_refs_euler_dpm.py [--repo-root PATH]

(diffusers 0.42.1, torch 2.15.0, numpy 2.4.6 on the CPU; see tests/reference/README.md for the
environment.) It writes, and owns, only:

    tests/fixtures/reference/sched_euler_dpm.safetensors   the recorded tensors (float32)
    tests/fixtures/reference/sched_euler_dpm.json          the index of cases

Each case is one (scheduler class, config, number of steps). The config dict is written to a
`scheduler_config.json` and loaded with `Class.from_pretrained(dir)`, as our loader reads the
file, so every key in it is explicit and absent keys take that class's own defaults (several
configs are the DDIM configs of LDM checkpoints, `_class_name` included). For each case it
records, under `<case>/...`:

    timesteps   [n]        `scheduler.timesteps` after `set_timesteps(steps)` (what the UNet gets)
    sigmas      [m]        `scheduler.sigmas`
    init        [1 + S]    `init_noise_sigma`, then the initial sample (S values, already
                           multiplied by init_noise_sigma)
    chain       [n, 4, S]  per model call i: model output, scaled model input, step output,
                           and the noise the step drew (zeros where it drew none)

The chain is the pipeline loop with a stand-in model (see `stand_in_model`):
    input_i = scale_model_input(sample_i, t_i)
    output_i = the epsilon/v/x0 prediction implied by a clean-sample estimate x0* + 0.3 * randn
    sample_{i+1} = step(output_i, t_i, sample_i, generator=generator_noise).prev_sample
The step's noise is whatever diffusers' `randn_tensor` returns inside `step` (it is wrapped to
record its draws), so the Rust test can replay it through a NoiseSource in the same order.

The JSON index holds `configs` (name -> the dict written to scheduler_config.json), `cases`
(name, class, config name, steps, model_calls, init_noise_sigma, draws_noise, begin_index_set)
and `errors`: configs our port must refuse with an Error::Config naming `field`, with what
diffusers does with them (some it accepts: thresholding and beta sigmas, which we do not port).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.schedulers import (
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

SHAPE = (1, 2, 2, 2)
STEPS = (1, 4, 10, 25)

# The DDIM config of CompVis/ldm-text2im-large-256 (keys as published; those DDIM-only keys are
# ignored by these classes, and the absent timestep_spacing means each class's default).
LDM = {
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

# The same schedule as DDIMScheduler 0.42 saves it (tests/fixtures/txt2img-tiny): every key
# explicit, timestep_spacing "leading".
LDM_SAVED = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.42.1",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

COS = {"beta_schedule": "squaredcos_cap_v2"}

# A short custom schedule: 100 training steps with explicit betas.
TRAINED = {
    "num_train_timesteps": 100,
    "trained_betas": [float(b) for b in np.linspace(0.001, 0.05, 100)],
}


def with_(base: dict, **kw) -> dict:
    d = dict(base)
    d.update(kw)
    return d


EULER = "EulerDiscreteScheduler"
ANCESTRAL = "EulerAncestralDiscreteScheduler"
DPM = "DPMSolverMultistepScheduler"
CLASSES = {EULER: EulerDiscreteScheduler, ANCESTRAL: EulerAncestralDiscreteScheduler, DPM: DPMSolverMultistepScheduler}

# (class, short name, config, step counts)
CONFIGS = [
    (EULER, "ldm", LDM, STEPS + (61,)),
    (EULER, "ldm_saved", LDM_SAVED, STEPS),
    (EULER, "default", {}, STEPS),
    (EULER, "cos_leading", with_(COS, timestep_spacing="leading", steps_offset=1), STEPS),
    (EULER, "trailing", with_(LDM, timestep_spacing="trailing"), STEPS + (61,)),
    (EULER, "vpred", with_(LDM, prediction_type="v_prediction"), STEPS),
    (EULER, "sample_trailing", {"prediction_type": "sample", "timestep_spacing": "trailing"}, STEPS),
    (EULER, "karras", with_(LDM, use_karras_sigmas=True), STEPS),
    (EULER, "karras_cos_leading", with_(COS, use_karras_sigmas=True, timestep_spacing="leading"), STEPS),
    (EULER, "karras_range", with_(LDM, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), STEPS),
    (EULER, "exponential", with_(LDM, use_exponential_sigmas=True), STEPS),
    (EULER, "log_linear", with_(LDM, interpolation_type="log_linear"), STEPS),
    (EULER, "final_sigma_min", with_(LDM, final_sigmas_type="sigma_min", timestep_spacing="trailing"), STEPS),
    (EULER, "continuous_vpred", with_(LDM, prediction_type="v_prediction", timestep_type="continuous",
                                      use_karras_sigmas=True), STEPS),
    (EULER, "zero_snr", with_(LDM, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                              prediction_type="v_prediction"), STEPS),
    (EULER, "trained_betas", TRAINED, STEPS),
    (ANCESTRAL, "ldm", LDM, STEPS),
    (ANCESTRAL, "ldm_saved", LDM_SAVED, STEPS),
    (ANCESTRAL, "default", {}, STEPS),
    (ANCESTRAL, "cos_leading", with_(COS, timestep_spacing="leading", steps_offset=1), STEPS),
    (ANCESTRAL, "trailing_vpred", with_(LDM, timestep_spacing="trailing", prediction_type="v_prediction"), STEPS),
    (ANCESTRAL, "zero_snr", with_(LDM, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                  prediction_type="v_prediction"), STEPS),
    (DPM, "ldm", LDM, STEPS),
    (DPM, "ldm_saved", LDM_SAVED, STEPS),
    (DPM, "default", {}, STEPS),
    (DPM, "order1", with_(LDM, solver_order=1), STEPS),
    (DPM, "order3", with_(LDM, solver_order=3), STEPS),
    (DPM, "order3_no_lof", with_(LDM, solver_order=3, lower_order_final=False), STEPS),
    (DPM, "order2_no_lof_sigma_min", with_(LDM, lower_order_final=False, final_sigmas_type="sigma_min"), STEPS),
    (DPM, "order3_no_lof_sigma_min", with_(LDM, solver_order=3, lower_order_final=False,
                                           final_sigmas_type="sigma_min"), STEPS),
    (DPM, "heun", with_(LDM, solver_type="heun"), STEPS),
    (DPM, "euler_at_final", with_(LDM, euler_at_final=True, lower_order_final=False,
                                  final_sigmas_type="sigma_min"), STEPS),
    (DPM, "dpmsolver", with_(LDM, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), STEPS),
    (DPM, "dpmsolver_heun", with_(LDM, algorithm_type="dpmsolver", solver_type="heun",
                                  final_sigmas_type="sigma_min"), STEPS),
    (DPM, "dpmsolver_order3", with_(LDM, algorithm_type="dpmsolver", solver_order=3, lower_order_final=False,
                                    final_sigmas_type="sigma_min"), STEPS),
    (DPM, "dpmsolver_vpred", with_(LDM, algorithm_type="dpmsolver", prediction_type="v_prediction",
                                   final_sigmas_type="sigma_min"), STEPS),
    (DPM, "dpmsolver_sample", with_(LDM, algorithm_type="dpmsolver", prediction_type="sample",
                                    final_sigmas_type="sigma_min"), STEPS),
    (DPM, "vpred", with_(LDM, prediction_type="v_prediction"), STEPS),
    (DPM, "sample", with_(LDM, prediction_type="sample", solver_order=3), STEPS),
    (DPM, "leading", with_(LDM, timestep_spacing="leading"), STEPS),
    (DPM, "trailing", with_(LDM, timestep_spacing="trailing"), STEPS + (61,)),
    (DPM, "karras", with_(LDM, use_karras_sigmas=True), STEPS),
    (DPM, "karras_cos", with_(COS, use_karras_sigmas=True), STEPS),
    (DPM, "karras_hidden_range", with_(LDM, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), STEPS),
    (DPM, "lu_lambdas", with_(LDM, use_lu_lambdas=True), STEPS),
    (DPM, "exponential", with_(LDM, use_exponential_sigmas=True), STEPS),
    (DPM, "lambda_clipped_cos", with_(COS, lambda_min_clipped=-5.1), STEPS),
    (DPM, "zero_snr", with_(LDM, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                            prediction_type="v_prediction"), STEPS),
    (DPM, "deis_names", with_(LDM, algorithm_type="deis", solver_type="logrho", final_sigmas_type="sigma_min"),
     STEPS),
    (DPM, "sde_pp", with_(LDM, algorithm_type="sde-dpmsolver++"), STEPS),
    (DPM, "sde_pp_order3_heun", with_(LDM, algorithm_type="sde-dpmsolver++", solver_order=3,
                                      solver_type="heun"), STEPS),
    (DPM, "sde", with_(LDM, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), STEPS),
    (DPM, "trained_betas", TRAINED, STEPS),
]

# Configs our port must refuse, with the key its Error::Config must name. `diffusers` says what
# diffusers does with them (recorded below).
ERRORS = [
    (DPM, with_(LDM, algorithm_type="dpmsolver-plus"), "algorithm_type"),
    (DPM, with_(LDM, algorithm_type="dpmsolver"), "final_sigmas_type"),
    # diffusers checks the final sigma against the name as written, before mapping deis to dpmsolver++.
    (DPM, with_(LDM, algorithm_type="deis"), "final_sigmas_type"),
    (DPM, with_(LDM, algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"), "solver_order"),
    (DPM, with_(LDM, solver_type="rk4"), "solver_type"),
    (DPM, with_(LDM, thresholding=True), "thresholding"),
    (DPM, with_(LDM, use_beta_sigmas=True), "use_beta_sigmas"),
    (DPM, with_(LDM, final_sigmas_type="one"), "final_sigmas_type"),
    (DPM, with_(LDM, beta_schedule="sigmoid"), "beta_schedule"),
    (EULER, with_(LDM, interpolation_type="cubic"), "interpolation_type"),
    (EULER, with_(LDM, timestep_spacing="uniform"), "timestep_spacing"),
    (EULER, with_(LDM, use_karras_sigmas=True, use_exponential_sigmas=True), "use_karras_sigmas"),
    (EULER, with_(LDM, use_beta_sigmas=True), "use_beta_sigmas"),
    (EULER, with_(LDM, prediction_type="flow"), "prediction_type"),
    (ANCESTRAL, with_(LDM, prediction_type="sample"), "prediction_type"),
    (ANCESTRAL, with_(LDM, timestep_spacing="uniform"), "timestep_spacing"),
]


class NoiseRecorder:
    """Wraps diffusers' `randn_tensor` in the three scheduler modules and keeps every draw."""

    def __init__(self):
        self.draws: list[torch.Tensor] = []
        self.originals = {}

    def __enter__(self):
        for mod in (scheduling_euler_discrete, scheduling_euler_ancestral_discrete, scheduling_dpmsolver_multistep):
            orig = mod.randn_tensor
            self.originals[mod] = orig

            def wrapped(*args, _orig=orig, **kwargs):
                t = _orig(*args, **kwargs)
                self.draws.append(t.detach().clone())
                return t

            mod.randn_tensor = wrapped
        return self

    def __exit__(self, *exc):
        for mod, orig in self.originals.items():
            mod.randn_tensor = orig


def load(cls_name: str, config: dict, tmp: Path):
    (tmp / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    return CLASSES[cls_name].from_pretrained(str(tmp))


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def stand_in_model(sched, i: int, inp: torch.Tensor, x0_star: torch.Tensor, g_model) -> torch.Tensor:
    """A model that denoises about as well as a real one: its estimate of the clean sample is a
    fixed x0* plus fresh noise (so the multistep differences are not trivial), and it returns the
    epsilon, v or x0 prediction that estimate implies for the (variance-preserving) model input
    at this step's sigma. Keeping the implied clean sample O(1), as a real UNet's is, keeps the
    test about the schedulers rather than about float32 rounding amplified by 1 / alpha_t."""
    sigma = float(sched.sigmas[i])
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    sigma_t = sigma * alpha
    x0_hat = x0_star + 0.3 * torch.randn(SHAPE, generator=g_model, dtype=torch.float64)
    eps = (inp.double() - alpha * x0_hat) / sigma_t
    kind = sched.config.prediction_type
    out = {"epsilon": eps, "sample": x0_hat, "v_prediction": alpha * eps - sigma_t * x0_hat}[kind]
    return out.to(torch.float32)


def run_case(cls_name: str, config: dict, steps: int, name: str, tmp: Path):
    sched = load(cls_name, config, tmp)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone()
    # diffusers finds its first step by looking the first timestep up, and takes the SECOND
    # match when it occurs twice (meant for img2img), so a schedule that starts with a repeated
    # timestep (DPM-Solver with Karras sigmas on the cosine schedule: 998, 998, ...) would skip a
    # step and then index past its sigmas. Our schedulers index model calls, which is what
    # `set_begin_index(0)` makes diffusers do; the index notes where it was needed.
    begin_index_set = bool((timesteps == timesteps[0]).sum() > 1)
    if begin_index_set:
        sched.set_begin_index(0)
    sigmas = torch.as_tensor(sched.sigmas).to(torch.float32).clone()
    init_sigma = float(sched.init_noise_sigma)
    seed = seed_of(name)
    g_sample = torch.Generator().manual_seed(seed)
    g_model = torch.Generator().manual_seed(seed + 1)
    g_noise = torch.Generator().manual_seed(seed + 2)
    sample = torch.randn(SHAPE, generator=g_sample, dtype=torch.float32) * sched.init_noise_sigma
    init = torch.cat([torch.tensor([init_sigma], dtype=torch.float32), sample.flatten()])
    rows = []
    draws_noise = False
    x0_star = torch.randn(SHAPE, generator=g_model, dtype=torch.float64)
    with NoiseRecorder() as rec:
        for i, t in enumerate(timesteps):
            inp = sched.scale_model_input(sample, t)
            out = stand_in_model(sched, i, inp, x0_star, g_model)
            before = len(rec.draws)
            sample = sched.step(out, t, sample, generator=g_noise).prev_sample
            new = rec.draws[before:]
            assert len(new) <= 1, "more than one draw in a step"
            noise = new[0].flatten() if new else torch.zeros(out.numel())
            draws_noise |= bool(new)
            rows.append(torch.stack([out.flatten(), inp.flatten(), sample.flatten(), noise.to(torch.float32)]))
    chain = torch.stack(rows)
    assert torch.isfinite(chain).all(), f"{name}: non-finite values"
    tensors = {
        f"{name}/timesteps": timesteps.to(torch.float32).contiguous(),
        f"{name}/sigmas": sigmas.contiguous(),
        f"{name}/init": init.contiguous(),
        f"{name}/chain": chain.contiguous(),
    }
    entry = {
        "name": name,
        "class": cls_name,
        "steps": steps,
        "model_calls": len(timesteps),
        "init_noise_sigma": init_sigma,
        "draws_noise": draws_noise,
        "begin_index_set": begin_index_set,
        "max_abs_sample": float(chain[:, 2].abs().max()),
    }
    return tensors, entry


def diffusers_error(cls_name: str, config: dict, tmp: Path) -> str:
    """What diffusers does with a config we refuse: its exception, or "accepted"."""
    try:
        sched = load(cls_name, config, tmp)
        sched.set_timesteps(4)
        x = torch.zeros(SHAPE)
        t = sched.timesteps[0]
        sched.step(sched.scale_model_input(x, t), t, x)
        return "accepted"
    except Exception as e:  # noqa: BLE001 - we record whatever diffusers raises
        return f"{type(e).__name__}: {e}"[:300]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo-root", default=str(Path(__file__).resolve().parents[2]))
    args = ap.parse_args()
    out_dir = Path(args.repo_root) / "tests" / "fixtures" / "reference"
    out_dir.mkdir(parents=True, exist_ok=True)
    diffusers.utils.logging.set_verbosity_error()

    tensors: dict[str, torch.Tensor] = {}
    cases = []
    configs = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for cls_name, short, config, step_counts in CONFIGS:
            prefix = {EULER: "euler", ANCESTRAL: "euler_a", DPM: "dpm"}[cls_name]
            configs[f"{prefix}.{short}"] = config
            for steps in step_counts:
                name = f"{prefix}.{short}.s{steps}"
                t, entry = run_case(cls_name, config, steps, name, tmp)
                entry["config"] = f"{prefix}.{short}"
                tensors.update(t)
                cases.append(entry)
                print(f"{name:45s} calls {entry['model_calls']:3d}  init_sigma {entry['init_noise_sigma']:10.4f}  "
                      f"noise {entry['draws_noise']!s:5s}  max|x| {entry['max_abs_sample']:.3g}")
        errors = []
        for cls_name, config, field in ERRORS:
            errors.append({"class": cls_name, "config": config, "field": field,
                           "diffusers": diffusers_error(cls_name, config, tmp)})
            print(f"error case {cls_name} {field}: diffusers -> {errors[-1]['diffusers'][:100]}")

    index = {
        "about": "diffusers reference chains for the Euler, Euler ancestral and DPM-Solver multistep schedulers; "
                 "written by tests/reference/make_scheduler_refs_euler_dpm.py",
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "sample_shape": list(SHAPE),
        "tensors": "<case>/timesteps [n], <case>/sigmas [m], <case>/init [1 + S] (init_noise_sigma, initial sample), "
                   "<case>/chain [n, 4, S] (model output, scaled model input, step output, step noise)",
        "configs": configs,
        "cases": cases,
        "errors": errors,
    }
    st = out_dir / "sched_euler_dpm.safetensors"
    save_file(tensors, str(st), metadata={"format": "pt"})
    (out_dir / "sched_euler_dpm.json").write_text(json.dumps(index, indent=1) + "\n")
    st.chmod(0o644)
    print(f"{len(cases)} cases, {len(tensors)} tensors: {st} ({st.stat().st_size} bytes), "
          f"{(out_dir / 'sched_euler_dpm.json').stat().st_size} bytes of index")


if __name__ == "__main__":
    main()
