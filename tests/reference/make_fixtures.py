#!/usr/bin/env python3
"""Generate the tiny-model fixtures and diffusers reference outputs for the ldm Rust port.

Run once by hand (see tests/reference/README.md); the outputs are committed.
PyTorch is never needed by the project's own tests.

Everything is CPU / float32 / fixed seeds, so a rerun with the same package versions
reproduces the same files bit for bit (up to JSON version strings).

Usage:
    /opt/ref/bin/python tests/reference/make_fixtures.py [--repo-root PATH] [--skip-verify]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LDMSuperResolutionPipeline,
    LDMTextToImagePipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from transformers import BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

MAX_LEN = 77  # LDMTextToImagePipeline hard-codes max_length=77

# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------

UNET_COND_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
    # In UNet2DConditionModel, `attention_head_dim` is (for legacy reasons) used as the NUMBER of
    # heads when `num_attention_heads` is not given: 8 heads -> head dim 2 at 16 ch, 4 at 32 ch.
    attention_head_dim=8,
    cross_attention_dim=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    use_linear_projection=False,
    act_fn="silu",
    norm_eps=1e-5,
)

UNET_COND_LINEAR_CONFIG = dict(UNET_COND_CONFIG)
UNET_COND_LINEAR_CONFIG.update(
    use_linear_projection=True,
    attention_head_dim=(2, 4, 4),  # = heads per block: 2 heads of 8 at 16 ch, 4 heads of 8 at 32 ch
    layers_per_block=1,  # differs from txt2img on purpose (and keeps the fixture small)
)

# The pipeline hard-codes an 8x VAE (latents are height // 8), so the tiny VAE has 4 blocks
# (3 downsamplings) like the published one.
VAE_KL_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.5,  # deliberately not the 0.18215 default, so a port must read the config
)

LDMBERT_CONFIG = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    head_dim=16,
    encoder_ffn_dim=64,
    max_position_embeddings=MAX_LEN,
    activation_function="gelu",
    dropout=0.1,  # as published; inactive in eval()
    pad_token_id=0,
    # vocab_size filled in from the tokenizer
)

UNET2D_CONFIG = dict(
    sample_size=16,
    in_channels=6,
    out_channels=3,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 16, 32),
    layers_per_block=2,
    norm_num_groups=8,
    # In UNet2DModel `attention_head_dim` really is the per-head dimension: heads = ch // 8.
    attention_head_dim=8,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embedding_type="positional",
    act_fn="silu",
    norm_eps=1e-5,
)

# The published super-resolution VQ model has 3 blocks (4x upscaling); keep that structure.
VQ_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 16, 32),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=3,
    num_vq_embeddings=64,
    vq_embed_dim=3,
    norm_num_groups=8,
    sample_size=64,
)

# Published CompVis/ldm-text2im-large-256 uses DDIM with the "scaled_linear" 0.00085..0.012 betas
# (the LDM "linear" schedule is linear in sqrt(beta)).
TXT2IMG_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)

# Published CompVis/ldm-super-resolution-4x-openimages scheduler (286-byte scheduler_config.json):
# scaled_linear 0.0015..0.0155, clip_sample false, set_alpha_to_one true, steps_offset 1.
SUPERRES_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0015,
    beta_end=0.0155,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)

PROMPTS = [
    "a painting of a squirrel eating a burger",
    "",
    "A RED Circle, on the LEFT!!! (blue background?)",
    "café naïve résumé Ångström",
    "中文 字符 a cat 日本",
    (
        "a very detailed oil painting of a small red fox sitting on a green hill under a bright "
        "blue sky with white clouds, next to an old wooden house and a tall tree, while a little "
        "girl in a yellow dress is reading a book and a black dog is playing with a ball in the "
        "long grass near the river, in the style of a classic landscape painter, warm light, "
        "high quality, trending, sharp focus, beautiful colors"
    ),
    # extra edge cases (not in the original brief): control chars, tab/newline, emoji,
    # a word with an out-of-vocabulary symbol, characters that are not accent-stripped.
    "Straße\tøl\nnew\x00line 🙂 x☃y don't 3.14",
]

UNET_TIMESTEPS = [[981.0], [1.0], [500.5], [37.25], [981.0, 37.25]]

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def stats(name: str, t: torch.Tensor, check: bool = True) -> None:
    tf = t.detach().double()
    maxabs = tf.abs().max().item()
    std = tf.std().item() if tf.numel() > 1 else 0.0
    print(f"    {name:34s} {str(tuple(t.shape)):20s} {str(t.dtype):14s} max|x|={maxabs:10.4f} std={std:9.4f}")
    if check and t.is_floating_point():
        assert torch.isfinite(t).all(), f"{name}: non-finite values"
        assert 0.05 <= std <= 50.0, f"{name}: degenerate std {std}"
        assert maxabs <= 200.0, f"{name}: too large {maxabs}"


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    """Give EVERY parameter a random value (norm scales/biases included)."""
    g = torch.Generator().manual_seed(seed)
    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
    seen = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            shape = p.shape
            if isinstance(mod, norm_types):
                if p_name == "weight":
                    v = 1.0 + 0.2 * torch.randn(shape, generator=g)
                else:
                    v = 0.2 * torch.randn(shape, generator=g)
            elif isinstance(mod, nn.Embedding):
                if "quantize" in full:  # VQ codebook
                    v = torch.randn(shape, generator=g)
                else:
                    v = 0.5 * torch.randn(shape, generator=g)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                v = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            else:  # biases and any other 1-D parameter
                v = 0.2 * torch.randn(shape, generator=g)
            p.copy_(v.to(p.dtype))


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save_ref(path: Path, tensors: dict, check_skip=()) -> None:
    print(f"  -> {path.relative_to(ROOT)}")
    out = {}
    for k, v in tensors.items():
        stats(k, v, check=(k not in check_skip and not k.startswith("timestep") and k != "input_ids"))
        out[k] = v.detach().contiguous().clone()
    save_file(out, str(path))


def assert_same(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != b.dtype or a.shape != b.shape:
        raise AssertionError(f"{name}: dtype/shape mismatch {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
    d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    print(f"    verify {name:40s} max|diff|={d}")
    if d != 0.0:
        raise AssertionError(f"{name}: reload mismatch, max abs diff {d}")


def legacy_attention_keys(model: nn.Module) -> dict:
    """State dict with the pre-0.14 diffusers attention names (query/key/value/proj_attn)."""
    paths = [n for n, m in model.named_modules() if getattr(m, "_from_deprecated_attn_block", False)]
    ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in model.state_dict().items():
        nk = k
        for p in paths:
            for new, old in ren.items():
                for suffix in ("weight", "bias"):
                    if k == f"{p}.{new}.{suffix}":
                        nk = f"{p}.{old}.{suffix}"
        out[nk] = v.detach().clone().contiguous()
    assert len(out) == len(model.state_dict())
    return out


def keys_table(sd: dict, prefix: str = "") -> str:
    lines = []
    for k, v in sd.items():
        if k.startswith(prefix):
            lines.append(f"| `{k}` | {list(v.shape)} | {str(v.dtype).replace('torch.', '')} |")
    return "| key | shape | dtype |\n|---|---|---|\n" + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Tokenizer vocabulary
# --------------------------------------------------------------------------------------

WORDS = """
a an the of on in at to for with from by and or but not no is are was were be been being has have had
do does did will would can could should may might must this that these those it its he she they we you
i me my your our their his her them us who what when where why how which there here all any some many
much more most few one two three four five six seven eight nine ten first last next new old big small
little long short tall high low good bad best great beautiful pretty ugly happy sad dark light bright
warm cold hot fresh clean dirty red green blue yellow black white gray grey orange purple pink brown gold
silver color colors colour cat dog fox bird fish horse cow pig sheep mouse rabbit squirrel bear lion tiger
wolf deer duck owl frog snake man woman boy girl child people person king queen house home room tree
trees flower flowers grass river lake sea ocean mountain hill sky cloud clouds sun moon star stars rain snow
wind fire water stone rock road street city town village forest field garden park bridge castle tower
car boat ship train plane book ball chair table door window wall floor bed cup food apple bread cake
pizza burger coffee tea milk photo picture image painting drawing sketch art style artist painter
portrait landscape scene view oil canvas digital render realistic detailed quality focus sharp soft
left right top bottom front back middle center near far under over above below behind between inside
outside around into onto through up down out off sitting standing walking running flying playing
eating reading looking holding wearing dress hat shirt coat shoes glasses face eyes hair hand hands
head body small very too so just only also again still even ever never always often day night
morning evening time year old trending classic modern vintage style epic cinematic lighting shadow
circle square triangle shape line lines background foreground cafe naive resume don t s
"""

PIECES = """
paint draw eat burg squ cir circ rec tri ang back fore ground res ume na caf pho to gra ph ic al
ly ing ed er est s es ion tion ment ness ful able ous ive ize ise less ish ity y en ly st rom ger le
ound irrel un re pre dis in im ex sub super ultra over under
"""

SUFFIXES = """
##ing ##ed ##er ##est ##s ##es ##ion ##tion ##ment ##ness ##ful ##able ##ous ##ive ##ize ##ise
##less ##ish ##ity ##y ##en ##ly ##st ##rom ##ger ##le ##ground ##ound ##irrel ##ume ##ive ##e
##al ##ic ##ph ##to ##ra ##ro ##ck ##ng ##nd ##th ##ch ##sh ##ar ##or ##ur ##ir ##an ##in ##on
##at ##it ##et ##ot ##ut ##ow ##ew ##aw ##ee ##oo ##ll ##ss ##tt ##pp ##rr
"""


# whole words kept OUT of the vocab so that WordPiece splitting really happens
NOT_IN_VOCAB = {"painting", "eating", "burger", "circle", "background", "naive", "resume", "cafe", "angstrom"}


def build_vocab() -> list[str]:
    vocab: list[str] = []
    seen = set()

    def add(tok: str) -> None:
        if tok and tok not in seen and tok not in NOT_IN_VOCAB:
            seen.add(tok)
            vocab.append(tok)

    # Special tokens at non-trivial ids: a port must look them up by name.
    add("[PAD]")  # 0, like bert-base-uncased
    for i in range(5):
        add(f"[unused{i}]")
    for t in ("[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        add(t)
    printable = [chr(c) for c in range(33, 127)]
    accented = list("àáâäãåæçèéêëìíîïñòóôöõøùúûüýÿßœ")
    cjk = list("中文字日本人大小山水火")  # deliberately NOT 符 -> [UNK]
    for c in printable + accented + cjk:
        add(c)
    for c in printable + accented:
        add("##" + c)
    for w in WORDS.split():
        add(w)
    for w in PIECES.split():
        add(w)
    for w in SUFFIXES.split():
        add(w)
    return vocab


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

ROOT: Path = Path(".")


def main() -> None:
    global ROOT
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo-root", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--skip-verify", action="store_true")
    args = ap.parse_args()
    ROOT = Path(args.repo_root).resolve()
    fx = ROOT / "tests" / "fixtures"
    ref = fx / "reference"
    owned = ["txt2img-tiny", "superres-tiny", "unet-linear-proj", "tokenizer-json", "variants"]
    for d in owned:
        shutil.rmtree(fx / d, ignore_errors=True)
    # reference/ is shared with the scheduler and rng scripts: remove only what this script writes.
    ref.mkdir(parents=True, exist_ok=True)
    for f in ref.iterdir():
        if not f.name.startswith(("sched_", "rng")):
            f.unlink()

    print(f"torch {torch.__version__}  diffusers {diffusers.__version__}  transformers {transformers.__version__}")
    keys_md: list[str] = []

    # ---------------------------------------------------------------- tokenizer
    print("\n[tokenizer]")
    vocab = build_vocab()
    print(f"  vocab size {len(vocab)}")
    tok_dir = fx / "txt2img-tiny" / "tokenizer"  # written after the pipeline save (overwrites it)
    tmp_vocab_dir = ref / "_tmp_vocab"
    tmp_vocab_dir.mkdir(parents=True, exist_ok=True)
    (tmp_vocab_dir / "vocab.txt").write_text("".join(v + "\n" for v in vocab), encoding="utf-8")

    # Published tokenizer folder layout (vocab.txt + tokenizer_config.json + special_tokens_map.json).
    # model_max_length is 512 in the published checkpoint; the pipeline passes max_length=77 itself.
    tokenizer_config = {
        "cls_token": "[CLS]",
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "mask_token": "[MASK]",
        "model_max_length": 512,
        "name_or_path": "ldm-tiny-fixture",
        "never_split": None,
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "special_tokens_map_file": None,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
        "unk_token": "[UNK]",
    }
    special_tokens_map = {
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
    }
    for name, obj in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special_tokens_map)):
        (tmp_vocab_dir / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    tok_from_vocab = BertTokenizer.from_pretrained(str(tmp_vocab_dir))
    tok_legacy = BertTokenizerLegacy(vocab_file=str(tmp_vocab_dir / "vocab.txt"), do_lower_case=True)
    tj_dir = fx / "tokenizer-json"
    tok_from_vocab.save_pretrained(str(tj_dir))
    assert (tj_dir / "tokenizer.json").exists()
    tok_from_json = BertTokenizer.from_pretrained(str(tj_dir))

    all_ids = []
    for p in PROMPTS:
        a = tok_from_vocab(p, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
        b = tok_from_json(p, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
        c = tok_legacy(p, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
        assert a == b == c, f"tokenizers disagree on {p!r}:\n{a}\n{b}\n{c}"
        assert len(a) == MAX_LEN
        toks = tok_legacy.convert_ids_to_tokens([i for i in a if i != 0])
        print(f"  {p[:50]!r:54s} -> {' '.join(toks[:24])}{' ...' if len(toks) > 24 else ''}")
        all_ids.append(a)
    # one prompt / one id row per line, to keep the file diffable
    text = '{\n  "max_length": %d,\n  "prompts": [\n' % MAX_LEN
    text += ",\n".join("    " + json.dumps(p, ensure_ascii=False) for p in PROMPTS)
    text += '\n  ],\n  "input_ids": [\n'
    text += ",\n".join("    " + json.dumps(row) for row in all_ids)
    text += "\n  ]\n}\n"
    assert json.loads(text) == {"max_length": MAX_LEN, "prompts": PROMPTS, "input_ids": all_ids}
    (ref / "tokens.json").write_text(text, encoding="utf-8")
    input_ids = torch.tensor(all_ids, dtype=torch.int64)

    # ---------------------------------------------------------------- txt2img components
    print("\n[txt2img-tiny]")
    bert_cfg = LDMBertConfig(vocab_size=len(vocab), **LDMBERT_CONFIG)
    torch.manual_seed(0)
    bert = LDMBertModel(bert_cfg).eval()
    randomize(bert, 101)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_COND_CONFIG).eval()
    randomize(unet, 102)

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_KL_CONFIG).eval()
    randomize(vae, 103)

    sched = DDIMScheduler(**TXT2IMG_SCHEDULER_CONFIG)
    pipe = LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tok_from_vocab, unet=unet, scheduler=sched)
    t2i_dir = fx / "txt2img-tiny"
    pipe.save_pretrained(str(t2i_dir), safe_serialization=True)

    # tokenizer: replace whatever transformers wrote with the published vocab.txt-only layout
    shutil.rmtree(tok_dir)
    shutil.copytree(tmp_vocab_dir, tok_dir)
    shutil.rmtree(tmp_vocab_dir)

    # bert: the published checkpoint ships pytorch_model.bin (transformers 5 only writes safetensors)
    bert_dir = t2i_dir / "bert"
    for f in list(bert_dir.iterdir()):
        if f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json"):
            f.unlink()
    bert_sd = {k: v.detach().clone().contiguous() for k, v in bert.state_dict().items()}
    torch.save(bert_sd, str(bert_dir / "pytorch_model.bin"))

    keys_md.append("## LDMBertModel (`txt2img-tiny/bert/pytorch_model.bin`)\n\n" + keys_table(bert_sd))

    with torch.no_grad():
        hidden = bert(input_ids)[0]
    save_ref(ref / "bert.safetensors", {"input_ids": input_ids, "last_hidden_state": hidden})

    def unet_cond_refs(model, seed):
        g = rng(seed)
        sample = torch.randn(2, 4, 8, 8, generator=g)
        ehs = torch.randn(2, MAX_LEN, 32, generator=g)
        out = {"sample": sample, "encoder_hidden_states": ehs}
        with torch.no_grad():
            for i, ts in enumerate(UNET_TIMESTEPS):
                t = torch.tensor(ts, dtype=torch.float32)
                out[f"timestep_{i}"] = t
                out[f"out_{i}"] = model(sample, t, encoder_hidden_states=ehs).sample
        return out

    save_ref(ref / "unet_cond.safetensors", unet_cond_refs(unet, 201))

    with torch.no_grad():
        g = rng(202)
        latents = torch.randn(2, 4, 8, 8, generator=g)
        image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        decoded = vae.decode(latents).sample
        dist = vae.encode(image).latent_dist
    save_ref(
        ref / "vae_kl.safetensors",
        {"latents": latents, "decoded": decoded, "image": image, "encoded_mean": dist.mean, "encoded_std": dist.std},
    )

    # full pipeline run (eta = 0, so the only randomness is the given initial latents)
    with torch.no_grad():
        g = rng(203)
        pipe_latents = torch.randn(2, 4, 8, 8, generator=g)
        pipe_prompts = [PROMPTS[0], PROMPTS[2]]
        pipe_image = pipe(
            pipe_prompts,
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=3.0,
            eta=0.0,
            latents=pipe_latents.clone(),
            output_type="pt",
        ).images
        pipe_image_nocfg = pipe(
            pipe_prompts,
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=1.0,
            eta=0.0,
            latents=pipe_latents.clone(),
            output_type="pt",
        ).images
    # the same loop written out by hand, to also record the final latents (must match bit for bit)
    def txt2img_by_hand(gs: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            ids = tok_from_vocab(pipe_prompts, padding="max_length", max_length=MAX_LEN, truncation=True,
                                 return_tensors="pt").input_ids
            uncond_ids = tok_from_vocab([""] * len(pipe_prompts), padding="max_length", max_length=MAX_LEN,
                                        truncation=True, return_tensors="pt").input_ids
            cond, uncond = bert(ids)[0], bert(uncond_ids)[0]
            sched.set_timesteps(4)
            lat = pipe_latents.clone()
            for t in sched.timesteps:
                if gs == 1.0:
                    eps = unet(lat, t, encoder_hidden_states=cond).sample
                else:
                    eps = unet(torch.cat([lat] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                    e_u, e_c = eps.chunk(2)
                    eps = e_u + gs * (e_c - e_u)
                lat = sched.step(eps, t, lat, eta=0.0).prev_sample
            img = vae.decode(1 / vae.config.scaling_factor * lat).sample
            return lat, (img / 2 + 0.5).clamp(0, 1)

    fin3, img3 = txt2img_by_hand(3.0)
    fin1, img1 = txt2img_by_hand(1.0)
    assert torch.equal(img3, pipe_image) and torch.equal(img1, pipe_image_nocfg), "hand-written loop differs"
    sched.set_timesteps(4)
    save_ref(
        ref / "pipeline_txt2img.safetensors",
        {
            "latents": pipe_latents,
            "input_ids": input_ids[[0, 2]],
            "uncond_input_ids": input_ids[[1, 1]],
            "timesteps": sched.timesteps.clone(),
            "final_latents_cfg3": fin3,
            "image_cfg3": pipe_image,
            "final_latents_cfg1": fin1,
            "image_cfg1": pipe_image_nocfg,
        },
        check_skip=("timesteps", "uncond_input_ids"),
    )

    # ---------------------------------------------------------------- linear-projection UNet
    print("\n[unet-linear-proj]")
    torch.manual_seed(0)
    unet_lin = UNet2DConditionModel(**UNET_COND_LINEAR_CONFIG).eval()
    randomize(unet_lin, 104)
    unet_lin.save_pretrained(str(fx / "unet-linear-proj"), safe_serialization=True)
    save_ref(ref / "unet_cond_linear.safetensors", unet_cond_refs(unet_lin, 204))
    keys_md.append(
        "## UNet2DConditionModel, one CrossAttnDownBlock2D, conv projection (`txt2img-tiny/unet`, `down_blocks.0.`)\n\n"
        + keys_table(unet.state_dict(), "down_blocks.0.")
    )
    keys_md.append(
        "## UNet2DConditionModel, one CrossAttnDownBlock2D, linear projection (`unet-linear-proj`, `down_blocks.0.`)\n\n"
        + keys_table(unet_lin.state_dict(), "down_blocks.0.")
    )

    # ---------------------------------------------------------------- superres
    print("\n[superres-tiny]")
    torch.manual_seed(0)
    unet2d = UNet2DModel(**UNET2D_CONFIG).eval()
    randomize(unet2d, 105)
    torch.manual_seed(0)
    vq = VQModel(**VQ_CONFIG).eval()
    randomize(vq, 106)
    sr_sched = DDIMScheduler(**SUPERRES_SCHEDULER_CONFIG)
    sr_pipe = LDMSuperResolutionPipeline(vqvae=vq, unet=unet2d, scheduler=sr_sched)
    sr_dir = fx / "superres-tiny"
    sr_pipe.save_pretrained(str(sr_dir), safe_serialization=True)
    # The published super-res checkpoint (diffusers 0.8 era) stores its attention blocks under the
    # deprecated names query/key/value/proj_attn, and its unet as diffusion_pytorch_model.bin.
    # Reproduce both here: superres-tiny/unet (.bin) and superres-tiny/vqvae (.safetensors) use the
    # legacy names, which diffusers still renames on load (non-sharded checkpoints only).
    for sub in ("unet", "vqvae"):
        for f in list((sr_dir / sub).iterdir()):
            if f.name.startswith("diffusion_pytorch_model"):
                f.unlink()
    unet2d_legacy_sd = legacy_attention_keys(unet2d)
    torch.save(unet2d_legacy_sd, str(sr_dir / "unet" / "diffusion_pytorch_model.bin"))
    vq_legacy_sd = legacy_attention_keys(vq)
    save_file(vq_legacy_sd, str(sr_dir / "vqvae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    keys_md.append(
        "## UNet2DModel, one AttnDownBlock2D, diffusers names (`down_blocks.1.`; as in memory and as "
        "diffusers >= 0.14 saves it)\n\n" + keys_table(unet2d.state_dict(), "down_blocks.1.")
    )
    keys_md.append(
        "## UNet2DModel, one AttnDownBlock2D, as stored in `superres-tiny/unet/diffusion_pytorch_model.bin` "
        "(legacy attention names, like the published checkpoint)\n\n" + keys_table(unet2d_legacy_sd, "down_blocks.1.")
    )
    vq_sd = vq.state_dict()
    keys_md.append(
        "## VQModel quantizer and the convs around it (`superres-tiny/vqvae`, `variants/*`)\n\n"
        + keys_table({k: v for k, v in vq_sd.items() if k.startswith(("quantize.", "quant_conv.", "post_quant_conv."))})
    )
    keys_md.append(
        "## VQModel decoder mid-block attention: diffusers names (`variants/*`, and `txt2img-tiny/vqvae` for "
        "AutoencoderKL)\n\n" + keys_table(vq_sd, "decoder.mid_block.attentions.")
    )
    keys_md.append(
        "## VQModel decoder mid-block attention: legacy names as stored in `superres-tiny/vqvae`\n\n"
        + keys_table(vq_legacy_sd, "decoder.mid_block.attentions.")
    )

    with torch.no_grad():
        g = rng(205)
        sample = torch.randn(2, 6, 16, 16, generator=g)
        out = {"sample": sample}
        for i, ts in enumerate(UNET_TIMESTEPS):
            t = torch.tensor(ts, dtype=torch.float32)
            out[f"timestep_{i}"] = t
            out[f"out_{i}"] = unet2d(sample, t).sample
    save_ref(ref / "unet2d.safetensors", out)

    def vq_latents(model: VQModel, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents near (but not on) codebook entries, so nearest-code choice is unambiguous."""
        g = rng(seed)
        cb = model.quantize.embedding.weight.detach().float()
        n = cb.shape[0]
        idx = torch.randint(0, n, (2 * 8 * 8,), generator=g)
        z = cb[idx] + 0.05 * torch.randn(idx.shape[0], cb.shape[1], generator=g)
        lat = z.view(2, 8, 8, cb.shape[1]).permute(0, 3, 1, 2).contiguous()
        # margin check: best vs second-best distance
        d = torch.cdist(z.double(), cb.double())
        top2 = d.topk(2, largest=False).values
        margin = (top2[:, 1] - top2[:, 0]).min().item()
        chosen = d.argmin(1)
        print(f"    vq latents: {len(set(chosen.tolist()))} distinct codes, min margin {margin:.4f}")
        assert margin > 1e-3
        return lat, chosen.view(2, 8, 8)

    with torch.no_grad():
        vq_lat, vq_idx = vq_latents(vq, 206)
        quant, _, (_, _, idx_torch) = vq.quantize(vq_lat)
        assert torch.equal(idx_torch.view(2, 8, 8), vq_idx)
        vq_dec = vq.decode(vq_lat).sample
        vq_dec_nq = vq.decode(vq_lat, force_not_quantize=True).sample
        g = rng(207)
        vq_img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
        vq_enc = vq.encode(vq_img).latents
        lookup = vq.quantize.embedding.weight[vq_idx.view(-1)].view(2, 8, 8, 3).permute(0, 3, 1, 2)
        print(f"    z + (z_q - z) vs plain codebook lookup: max|diff| = {(quant - lookup).abs().max().item():.3e}")
    save_ref(
        ref / "vq.safetensors",
        {
            "latents": vq_lat,
            "indices": vq_idx,
            "quantized": quant,
            "decoded": vq_dec,
            "decoded_force_not_quantize": vq_dec_nq,
            "image": vq_img,
            "encoded": vq_enc,
        },
        check_skip=("indices",),
    )

    # super-resolution pipeline run (eta = 0; initial noise = torch.randn with the given seed)
    with torch.no_grad():
        g = rng(208)
        lr_image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        seed = 209
        init_noise = torch.randn((1, 3, 16, 16), generator=rng(seed))
        sr_out = sr_pipe(lr_image.clone(), num_inference_steps=4, eta=0.0, generator=rng(seed), output_type="pt").images
        # by hand, to record the final latents
        sr_sched.set_timesteps(4)
        lat = init_noise * sr_sched.init_noise_sigma
        for t in sr_sched.timesteps:
            inp = sr_sched.scale_model_input(torch.cat([lat, lr_image], dim=1), t)
            lat = sr_sched.step(unet2d(inp, t).sample, t, lat, eta=0.0).prev_sample
        by_hand = torch.clamp(vq.decode(lat).sample, -1.0, 1.0) / 2 + 0.5
        assert torch.equal(by_hand, sr_out), "hand-written super-res loop differs"
    save_ref(
        ref / "pipeline_superres.safetensors",
        {
            "image": lr_image,
            "init_noise": init_noise,
            "timesteps": sr_sched.timesteps.clone(),
            "final_latents": lat,
            "output": sr_out,
        },
        check_skip=("timesteps",),
    )

    # ---------------------------------------------------------------- DDIM scheduler
    print("\n[ddim scheduler]")
    sref = {}
    for tag, cfg in (("txt2img", TXT2IMG_SCHEDULER_CONFIG), ("superres", SUPERRES_SCHEDULER_CONFIG)):
        s = DDIMScheduler(**cfg)
        sref[f"{tag}_alphas_cumprod"] = s.alphas_cumprod.clone()
        for n in (4, 50):
            s.set_timesteps(n)
            sref[f"{tag}_timesteps_{n}"] = s.timesteps.clone()
        s.set_timesteps(4)
        g = rng(301)
        x = torch.randn(1, 4, 8, 8, generator=g)
        for k, t in enumerate(s.timesteps):
            eps = torch.randn(1, 4, 8, 8, generator=g)
            noise = torch.randn(1, 4, 8, 8, generator=g)
            sref[f"{tag}_step{k}_sample"] = x.clone()
            sref[f"{tag}_step{k}_model_output"] = eps
            sref[f"{tag}_step{k}_variance_noise"] = noise
            sref[f"{tag}_step{k}_prev_eta0"] = s.step(eps, t, x, eta=0.0).prev_sample
            sref[f"{tag}_step{k}_prev_eta05"] = s.step(eps, t, x, eta=0.5, variance_noise=noise).prev_sample
            x = sref[f"{tag}_step{k}_prev_eta0"]
    save_ref(ref / "ddim.safetensors", sref, check_skip=tuple(k for k in sref if "timesteps" in k or "alphas" in k))

    # ---------------------------------------------------------------- weight-format variants
    print("\n[variants] (VQModel, same config/weights as superres-tiny/vqvae)")
    vdir = fx / "variants"
    vq.save_pretrained(str(vdir / "sharded"), safe_serialization=True, max_shard_size="150KB")
    vq.save_pretrained(str(vdir / "bin"), safe_serialization=False)
    vq_half = VQModel(**VQ_CONFIG).eval()
    vq_half.load_state_dict(vq.state_dict())
    vq_half = vq_half.half()
    vq_half.save_pretrained(str(vdir / "fp16"), safe_serialization=True, variant="fp16")
    with torch.no_grad():
        vq_up = VQModel(**VQ_CONFIG).eval()
        vq_up.load_state_dict(vq_half.state_dict())  # fp16 weights upcast to f32 (load_state_dict casts)
        vq_up = vq_up.float()
        vlat, vidx = vq_latents(vq, 210)
        cb16 = vq_up.quantize.embedding.weight.double()
        z = vlat.permute(0, 2, 3, 1).reshape(-1, 3).double()
        assert torch.equal(torch.cdist(z, cb16).argmin(1).view(2, 8, 8), vidx), "fp16 codebook changes the codes"
        dec32 = vq.decode(vlat).sample
        dec16 = vq_up.decode(vlat).sample
    print(f"    fp16-vs-f32 weights decode max|diff| = {(dec32 - dec16).abs().max().item():.4e}")
    save_ref(
        ref / "variants.safetensors",
        {"latents": vlat, "indices": vidx, "decoded_f32": dec32, "decoded_fp16": dec16},
        check_skip=("indices",),
    )

    # ---------------------------------------------------------------- KEYS.md
    kpath = ROOT / "tests" / "reference" / "KEYS.md"
    header = (
        "# State-dict keys of the fixture models\n\n"
        "Generated by `tests/reference/make_fixtures.py` (do not edit by hand). "
        "Shapes are PyTorch shapes: Linear `[out, in]`, Conv2d `[out, in, kh, kw]`.\n\n"
    )
    kpath.write_text(header + "\n".join(keys_md))
    print(f"\nwrote {kpath.relative_to(ROOT)}")

    if not args.skip_verify:
        verify(fx, ref)

    print("\nfiles:")
    total = 0
    for p in sorted(fx.rglob("*")):
        if p.is_file() and any(str(p.relative_to(fx)).startswith(d) for d in owned):
            total += p.stat().st_size
            print(f"  {p.stat().st_size:10d}  {p.relative_to(ROOT)}")
    print(f"  {total:10d}  total ({total / 1e6:.2f} MB)")


# --------------------------------------------------------------------------------------
# Verification: reload every saved folder and reproduce the recorded outputs exactly
# --------------------------------------------------------------------------------------


@torch.no_grad()
def verify(fx: Path, ref: Path) -> None:
    print("\n[verify] reloading saved folders with from_pretrained")
    toks = json.loads((ref / "tokens.json").read_text(encoding="utf-8"))
    pipe = LDMTextToImagePipeline.from_pretrained(str(fx / "txt2img-tiny"))
    assert type(pipe.bert).__name__ == "LDMBertModel"
    pipe.bert.eval(), pipe.unet.eval(), pipe.vqvae.eval()
    tj = BertTokenizer.from_pretrained(str(fx / "tokenizer-json"))
    for p, ids in zip(toks["prompts"], toks["input_ids"]):
        a = pipe.tokenizer(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        b = tj(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert a == ids == b, p
    print("    verify tokens.json (both tokenizer folders)        ok")

    r = load_file(str(ref / "bert.safetensors"))
    assert_same("bert.last_hidden_state", pipe.bert(r["input_ids"])[0], r["last_hidden_state"])
    assert r["input_ids"].tolist() == toks["input_ids"]

    def check_unet_cond(model, path, tag):
        r = load_file(str(path))
        i = 0
        while f"out_{i}" in r:
            o = model(r["sample"], r[f"timestep_{i}"], encoder_hidden_states=r["encoder_hidden_states"]).sample
            assert_same(f"{tag}.out_{i}", o, r[f"out_{i}"])
            i += 1

    check_unet_cond(pipe.unet, ref / "unet_cond.safetensors", "unet_cond")
    lin = UNet2DConditionModel.from_pretrained(str(fx / "unet-linear-proj")).eval()
    check_unet_cond(lin, ref / "unet_cond_linear.safetensors", "unet_cond_linear")

    r = load_file(str(ref / "vae_kl.safetensors"))
    assert_same("vae_kl.decoded", pipe.vqvae.decode(r["latents"]).sample, r["decoded"])
    d = pipe.vqvae.encode(r["image"]).latent_dist
    assert_same("vae_kl.encoded_mean", d.mean, r["encoded_mean"])
    assert_same("vae_kl.encoded_std", d.std, r["encoded_std"])

    r = load_file(str(ref / "pipeline_txt2img.safetensors"))
    prompts = [toks["prompts"][0], toks["prompts"][2]]
    for tag, gs in (("image_cfg3", 3.0), ("image_cfg1", 1.0)):
        img = pipe(prompts, height=64, width=64, num_inference_steps=4, guidance_scale=gs, eta=0.0,
                   latents=r["latents"].clone(), output_type="pt").images
        assert_same(f"pipeline_txt2img.{tag}", img, r[tag])

    sr = LDMSuperResolutionPipeline.from_pretrained(str(fx / "superres-tiny"))
    sr.unet.eval(), sr.vqvae.eval()
    r = load_file(str(ref / "unet2d.safetensors"))
    i = 0
    while f"out_{i}" in r:
        assert_same(f"unet2d.out_{i}", sr.unet(r["sample"], r[f"timestep_{i}"]).sample, r[f"out_{i}"])
        i += 1
    r = load_file(str(ref / "vq.safetensors"))
    assert_same("vq.decoded", sr.vqvae.decode(r["latents"]).sample, r["decoded"])
    assert_same("vq.decoded_force_not_quantize",
                sr.vqvae.decode(r["latents"], force_not_quantize=True).sample, r["decoded_force_not_quantize"])
    assert_same("vq.encoded", sr.vqvae.encode(r["image"]).latents, r["encoded"])
    r = load_file(str(ref / "pipeline_superres.safetensors"))
    out = sr(r["image"].clone(), num_inference_steps=4, eta=0.0, generator=rng(209), output_type="pt").images
    assert_same("pipeline_superres.output", out, r["output"])

    r = load_file(str(ref / "variants.safetensors"))
    for name, kw, key in (
        ("sharded", {}, "decoded_f32"),
        ("bin", {}, "decoded_f32"),
        ("fp16", {"variant": "fp16"}, "decoded_fp16"),
    ):
        m = VQModel.from_pretrained(str(fx / "variants" / name), **kw).eval().float()
        assert_same(f"variants/{name}.{key}", m.decode(r["latents"]).sample, r[key])
    print("[verify] all outputs reproduced exactly")


if __name__ == "__main__":
    sys.exit(main())
