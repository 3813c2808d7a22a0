#!/usr/bin/env python3
"""Train the shipped "shapes" models from scratch and save them in the published diffusers layouts.

One command trains everything, in this order, from one seed:

1. the synthetic data set (training/shapes.py): images of one shape on a background, with captions;
2. an 8x AutoencoderKL (64x64x3 <-> 8x8x4), as the published CompVis/ldm-text2im-large-256 has;
3. LDMBert (with its own BERT vocabulary) + UNet2DConditionModel with cross-attention, trained
   together on the autoencoder's latents, with 10% of the captions dropped (classifier-free guidance);
4. a 4x VQModel (3 blocks, 3 latent channels) for the super-resolution model;
5. a UNet2DModel with 6 input channels (3 of latents + the 16x16 low-resolution image), as
   CompVis/ldm-super-resolution-4x-openimages has.

and writes

    OUT/ldm-shapes/            LDMTextToImagePipeline folder (model_index.json, bert, tokenizer, unet,
                               vqvae, scheduler)
    OUT/ldm-shapes-superres/   LDMSuperResolutionPipeline folder (unet, vqvae, scheduler)
    OUT/training_log.json      arguments, timings, loss curves and final losses
    OUT/samples.png            a few images drawn by diffusers from the saved folders

The documented recipe (2 CPU cores, about an hour) is the default of every argument: the two
models train at the same time in two single-threaded processes.

    python training/train.py --out models

Requires torch, diffusers (0.42), transformers and Pillow. Deterministic on the CPU for a given
seed and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    LDMSuperResolutionPipeline,
    LDMTextToImagePipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

MAX_LEN = 77  # LDMTextToImagePipeline pads every prompt to 77 tokens (and passes no attention mask)
CAPTION_DROPOUT = 0.1

# ------------------------------------------------------------------------------------------------
# Model configurations (small enough for a CPU; the same structure as the published checkpoints)
# ------------------------------------------------------------------------------------------------

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 8x, as LDMTextToImagePipeline assumes (height // 8)
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)

LDMBERT_CONFIG = dict(
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=2,
    head_dim=32,
    encoder_ffn_dim=128,
    max_position_embeddings=MAX_LEN,
    activation_function="gelu",
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    pad_token_id=0,
)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=4,  # legacy name: the NUMBER of heads in UNet2DConditionModel
    cross_attention_dim=LDMBERT_CONFIG["d_model"],
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)

VQ_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,  # 4x, as the published super-resolution VQModel
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 48),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=3,
    num_vq_embeddings=512,
    vq_embed_dim=3,
    norm_num_groups=8,
    sample_size=64,
)

SR_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=6,  # 3 latent channels + the 3 channels of the low-resolution image
    out_channels=3,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 48, 48),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=16,  # per-head dimension in UNet2DModel
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)

# The published schedulers: CompVis/ldm-text2im-large-256 and ldm-super-resolution-4x-openimages.
TXT2IMG_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    prediction_type="epsilon",
)
SUPERRES_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading",
    prediction_type="epsilon",
)

# ------------------------------------------------------------------------------------------------
# Vocabulary: BERT WordPiece, uncased. Every word of the data set is a whole token; characters and
# ##characters let any other text tokenize too (into pieces the model never saw).
# ------------------------------------------------------------------------------------------------

EXTRA_WORDS = """an and of with to is are this that picture image drawing shape shapes colour color
grey gray center centre corner upper lower above below near far one two three medium large tiny huge
dark light bright pink brown cyan star heart""".split()


def build_vocab() -> list[str]:
    vocab: list[str] = []
    seen: set[str] = set()

    def add(t: str) -> None:
        if t not in seen:
            seen.add(t)
            vocab.append(t)

    for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        add(t)
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    for c in chars:
        add(c)
    for c in chars:
        add("##" + c)
    words = ["a", "background", *shapes.COLOURS, *shapes.SHAPES, *shapes.SIZES]
    for p in shapes.POSITIONS:
        words += p.split()
    for w in words + EXTRA_WORDS:
        add(w)
    return vocab


TOKENIZER_CONFIG = {
    "cls_token": "[CLS]",
    "do_basic_tokenize": True,
    "do_lower_case": True,
    "mask_token": "[MASK]",
    "model_max_length": 512,
    "name_or_path": "ldm-shapes",
    "never_split": None,
    "pad_token": "[PAD]",
    "sep_token": "[SEP]",
    "special_tokens_map_file": None,
    "strip_accents": None,
    "tokenize_chinese_chars": True,
    "tokenizer_class": "BertTokenizer",
    "unk_token": "[UNK]",
}
SPECIAL_TOKENS_MAP = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
                      "unk_token": "[UNK]"}


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in build_vocab()), encoding="utf-8")
    for name, obj in (("tokenizer_config.json", TOKENIZER_CONFIG), ("special_tokens_map.json", SPECIAL_TOKENS_MAP)):
        (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: Path, args: argparse.Namespace):
        self.path = path
        self.t0 = time.time()
        self.data = {"args": vars(args), "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
                     "stages": {}}

    def stage(self, name: str, **info) -> dict:
        self.data["stages"][name] = {"curve": [], **info}
        return self.data["stages"][name]

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def lr_at(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def to_tensor(imgs: list[Image.Image]) -> torch.Tensor:
    """uint8 (N, 3, H, W)."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.uint8) for i in imgs])).permute(0, 3, 1, 2).contiguous()


def to_float(u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], as the pipelines prepare images."""
    return u8.float() / 255.0 * 2.0 - 1.0


def box_down(x: torch.Tensor, f: int = 4) -> torch.Tensor:
    """The super-resolution input: the mean of each f x f block, rounded to 8 bits like Pillow's reduce()."""
    y = F.avg_pool2d(x.float(), f)
    return torch.floor(y + 0.5).clamp(0, 255).to(torch.uint8)


def mosaic_crops(images: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n 64x64 crops of random 2x2 mosaics of data-set images (offsets on the 4-pixel grid), so the
    super-resolution models also see edges between images, as in a mosaic of inputs."""
    N, C, H, W = images.shape
    idx = torch.randint(0, N, (n, 4), generator=g)
    top = torch.cat([images[idx[:, 0]], images[idx[:, 1]]], dim=3)
    bot = torch.cat([images[idx[:, 2]], images[idx[:, 3]]], dim=3)
    big = torch.cat([top, bot], dim=2)
    oy = torch.randint(0, H // 4 + 1, (n,), generator=g) * 4
    ox = torch.randint(0, W // 4 + 1, (n,), generator=g) * 4
    return torch.stack([big[i, :, oy[i]:oy[i] + H, ox[i]:ox[i] + W] for i in range(n)])


def sr_batch(images: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Half whole data-set images, half mosaic crops."""
    k = n // 2
    whole = images[torch.randint(0, images.shape[0], (k,), generator=g)]
    return torch.cat([whole, mosaic_crops(images, n - k, g)])


def alphas_cumprod(cfg: dict) -> torch.Tensor:
    return DDIMScheduler(**cfg).alphas_cumprod.clone()


def diffusion_loss(pred: torch.Tensor, noise: torch.Tensor, ab_t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Epsilon MSE weighted by min(SNR, gamma) / SNR (Hang et al. 2023, "Min-SNR"): faster convergence."""
    snr = ab_t / (1 - ab_t)
    w = torch.clamp(snr, max=gamma) / snr
    per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    return (w * per).mean()


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach(), 1 - d)


def train_loop(name, log, steps, params, loss_fn, lr, args, on_step=None):
    """AdamW with warm-up and cosine decay. With --stage-seconds, the step count is cut so that the
    stage ends in about that time (measured over the first 30 steps); the log records the count."""
    fused = {"fused": True} if args.device.startswith("cuda") else {}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **fused)
    info = log.stage(name, steps=steps)
    t0 = time.time()
    window: list[float] = []
    tail: list[float] = []
    step = 0
    while step < steps:
        for gparam in opt.param_groups:
            gparam["lr"] = lr_at(step, steps, lr)
        loss, extra = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if on_step:
            on_step(step)
        v = loss.item()
        window.append(v)
        step += 1
        if step == 10:
            t10 = time.time()
        if args.stage_seconds and step == 40:
            per = (time.time() - t10) / 30
            steps = max(41, min(steps, int(args.stage_seconds * STAGE_SHARE[name] / per)))
            info["steps"] = steps
            print(f"[{name}] {per * 1000:.1f} ms/step: {steps} steps", flush=True)
        if step > steps - max(1, steps // 10):
            tail.append(v)
        if step % args.log_every == 0 or step == steps:
            el = time.time() - t0
            row = {"step": step, "loss": round(sum(window) / len(window), 6), "elapsed_s": round(el, 1), **extra}
            info["curve"].append(row)
            print(f"[{name}] step {step}/{steps} loss {row['loss']:.5f} {extra} {el:.0f}s", flush=True)
            window = []
            log.save()
    info["final_loss"] = round(sum(tail) / len(tail), 6)
    info["final_loss_over_last_steps"] = len(tail)
    info["seconds"] = round(time.time() - t0, 1)
    info["cpu_seconds"] = round(time.process_time(), 1)  # of the whole process so far
    log.save()


# Shares of --stage-seconds per stage (the GPU run's time plan; each part runs in its own process).
STAGE_SHARE = {"autoencoder": 0.25, "txt2img": 0.75, "vqmodel": 0.3, "superres": 0.7}


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def train_autoencoder(images, args, log, device):
    torch.manual_seed(args.seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG).to(device).train()
    # Start with a tiny posterior variance (log-variance -8): at diffusers' initialisation it is
    # about 1, so the decoder first learns from latents drowned in sampling noise, and the tiny KL
    # weight takes thousands of steps to shrink it. This halves the steps to a given loss.
    with torch.no_grad():
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"]:] = -8.0
    g = torch.Generator().manual_seed(args.seed + 11)
    N = images.shape[0]
    crop = args.ae_crop

    def loss_fn(step):
        x = to_float(images[torch.randint(0, N, (args.ae_batch,), generator=g)]).to(device)
        if crop < x.shape[-1]:
            # a random crop on the 8-pixel latent grid: the autoencoder is convolutional, and a
            # quarter of the pixels per image buys four times the images per second
            oy, ox = (int(v) * 8 for v in torch.randint(0, (x.shape[-1] - crop) // 8 + 1, (2,), generator=g))
            x = x[:, :, oy:oy + crop, ox:ox + crop]
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = ((rec - x) ** 2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + mse + args.kl_weight * kl
        return loss, {"mse": round(mse.item(), 6)}

    train_loop("autoencoder", log, args.ae_steps, list(vae.parameters()), loss_fn, args.ae_lr, args)
    vae.eval()
    log.data["stages"]["autoencoder"]["params"] = n_params(vae)
    return vae


@torch.no_grad()
def encode_latents(vae, images, device, batch=256):
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        d = vae.encode(to_float(images[i:i + batch]).to(device)).latent_dist
        means.append(d.mean.cpu())
        stds.append(d.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_txt2img(vae, images, scenes, args, log, device):
    mean, std = encode_latents(vae, images, device)
    scale = 1.0 / mean.std().item()  # the published convention: scaling_factor = 1 / std of the latents
    vae.register_to_config(scaling_factor=round(scale, 5))
    log.data["stages"]["autoencoder"]["scaling_factor"] = round(scale, 5)
    mean, std = mean.to(device), std.to(device)

    vocab_dir = Path(args.out) / "_vocab"
    write_tokenizer(vocab_dir)
    tok = BertTokenizer.from_pretrained(str(vocab_dir))
    cache: dict[str, list[int]] = {}

    def ids(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tok(text, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
        return cache[text]

    torch.manual_seed(args.seed + 2)
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(build_vocab()), **LDMBERT_CONFIG)).to(device).train()
    unet = UNet2DConditionModel(**UNET_CONFIG).to(device).train()
    ema_bert, ema_unet = EMA(bert, args.ema), EMA(unet, args.ema)
    ab = alphas_cumprod(TXT2IMG_SCHEDULER).to(device)
    g = torch.Generator().manual_seed(args.seed + 12)
    crng = random.Random(args.seed + 13)
    N = images.shape[0]

    def loss_fn(step):
        idx = torch.randint(0, N, (args.batch,), generator=g)
        caps = ["" if crng.random() < CAPTION_DROPOUT else shapes.caption(scenes[i], crng) for i in idx.tolist()]
        input_ids = torch.tensor([ids(c) for c in caps], device=device)
        i_d = idx.to(device)
        x0 = (mean[i_d] + std[i_d] * torch.randn(mean[i_d].shape, generator=g).to(device)) * scale
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ctx = bert(input_ids)[0]
        pred = unet(xt, t, encoder_hidden_states=ctx).sample
        return diffusion_loss(pred, noise, ab[t]), {}

    def on_step(step):
        ema_bert.update(bert, step)
        ema_unet.update(unet, step)

    params = list(bert.parameters()) + list(unet.parameters())
    train_loop("txt2img", log, args.steps, params, loss_fn, args.lr, args, on_step)
    log.data["stages"]["txt2img"]["params"] = {"bert": n_params(bert), "unet": n_params(unet)}
    log.data["stages"]["txt2img"]["distinct_captions_seen"] = len(cache)
    return ema_bert.shadow, ema_unet.shadow, tok, vocab_dir


def train_vq(images, args, log, device):
    torch.manual_seed(args.seed + 3)
    vq = VQModel(**VQ_CONFIG).to(device).train()
    g = torch.Generator().manual_seed(args.seed + 14)
    n_codes = VQ_CONFIG["num_vq_embeddings"]
    usage = torch.zeros(n_codes, device=device)
    recent: list[torch.Tensor] = []

    def loss_fn(step):
        x = to_float(sr_batch(images, args.vq_batch, g)).to(device)
        h = vq.encode(x).latents
        quant, commit, (_, _, ind) = vq.quantize(h)
        rec = vq.decode(quant, force_not_quantize=True).sample
        l1 = (rec - x).abs().mean()
        mse = ((rec - x) ** 2).mean()
        # keep the latents near unit variance: they are what the super-resolution UNet diffuses
        scale_reg = (h.var() - 1.0) ** 2
        loss = l1 + mse + commit.mean() + 0.1 * scale_reg
        usage.index_add_(0, ind.view(-1), torch.ones(ind.numel(), device=device))
        recent.append(h.detach().permute(0, 2, 3, 1).reshape(-1, 3))
        del recent[:-4]
        return loss, {"mse": round(mse.item(), 6), "h_std": round(h.std().item(), 3)}

    def on_step(step):
        # dead-code restart: codes unused for 100 steps are moved onto recent encoder outputs
        if (step + 1) % 100 == 0 and step + 1 < int(log.data["stages"]["vqmodel"]["steps"] * 0.9):
            with torch.no_grad():
                dead = (usage == 0).nonzero().view(-1)
                if len(dead):
                    pool = torch.cat(recent)
                    pick = torch.randint(0, pool.shape[0], (len(dead),), generator=g).to(device)
                    vq.quantize.embedding.weight[dead] = pool[pick] + 0.01 * torch.randn(
                        len(dead), 3, generator=g).to(device)
                usage.zero_()

    train_loop("vqmodel", log, args.vq_steps, list(vq.parameters()), loss_fn, args.ae_lr, args, on_step)
    vq.eval()
    log.data["stages"]["vqmodel"]["params"] = n_params(vq)
    return vq


def train_superres(vq, images, args, log, device):
    torch.manual_seed(args.seed + 4)
    unet = UNet2DModel(**SR_UNET_CONFIG).to(device).train()
    ema = EMA(unet, args.ema)
    ab = alphas_cumprod(SUPERRES_SCHEDULER).to(device)
    g = torch.Generator().manual_seed(args.seed + 15)

    def loss_fn(step):
        hr = sr_batch(images, args.sr_batch, g)
        lr_img = to_float(box_down(hr)).to(device)
        with torch.no_grad():
            x0 = vq.encode(to_float(hr).to(device)).latents
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g).to(device)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(torch.cat([xt, lr_img], dim=1), t).sample
        return diffusion_loss(pred, noise, ab[t]), {}

    train_loop("superres", log, args.sr_steps, list(unet.parameters()), loss_fn, args.sr_lr, args,
               lambda s: ema.update(unet, s))
    log.data["stages"]["superres"]["params"] = n_params(unet)
    return ema.shadow


# ------------------------------------------------------------------------------------------------
# Saving and a check through diffusers itself
# ------------------------------------------------------------------------------------------------


def half_weights(folder: Path) -> None:
    """Stores the diffusers components' weights as float16 (same file names; diffusers and ldm
    upcast on load): half the bytes in the repository, no visible change in the images."""
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*/diffusion_pytorch_model.safetensors"):
        sd = load_file(str(f))
        save_file({k: v.half().contiguous() for k, v in sd.items()}, str(f), metadata={"format": "pt"})


def save_txt2img(out: Path, vae, bert, unet, tok, vocab_dir):
    folder = out / "ldm-shapes"
    shutil.rmtree(folder, ignore_errors=True)
    pipe = LDMTextToImagePipeline(vqvae=vae.cpu(), bert=bert.cpu(), tokenizer=tok, unet=unet.cpu(),
                                  scheduler=DDIMScheduler(**TXT2IMG_SCHEDULER))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # the published tokenizer layout: vocab.txt + tokenizer_config.json + special_tokens_map.json
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(vocab_dir, folder / "tokenizer")
    shutil.rmtree(vocab_dir)
    half_weights(folder)
    return folder


def save_superres(out: Path, vq, unet):
    folder = out / "ldm-shapes-superres"
    shutil.rmtree(folder, ignore_errors=True)
    pipe = LDMSuperResolutionPipeline(vqvae=vq.cpu(), unet=unet.cpu(), scheduler=DDIMScheduler(**SUPERRES_SCHEDULER))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    half_weights(folder)
    return folder


SAMPLE_PROMPTS = ["a red circle", "a big blue square on the left, yellow background",
                  "a small white triangle, black background", "a green circle at the top, purple background",
                  "an orange triangle", "a purple square at the bottom"]


@torch.no_grad()
def sample_txt2img(folder: Path, path: Path, steps: int) -> None:
    """Reloads the folder with diffusers and draws SAMPLE_PROMPTS at guidance 1 (top) and 4 (bottom)."""
    pipe = LDMTextToImagePipeline.from_pretrained(str(folder))
    rows = []
    for gs in (1.0, 4.0):
        ims = pipe(SAMPLE_PROMPTS, num_inference_steps=steps, guidance_scale=gs,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
        rows.append(np.concatenate(list(ims), axis=1))
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)


@torch.no_grad()
def sample_superres(folder: Path, images: torch.Tensor, path: Path, steps: int) -> dict:
    """Reloads the folder with diffusers; rows: 16x16 input (nearest), bicubic, super-resolved,
    original. Returns the PSNR of bicubic and of the model against the originals."""
    pipe = LDMSuperResolutionPipeline.from_pretrained(str(folder))
    lr_img = box_down(images)
    up = pipe(to_float(lr_img), num_inference_steps=steps, eta=0.0, generator=torch.Generator().manual_seed(0),
              output_type="np").images
    near = F.interpolate(lr_img.float(), scale_factor=4, mode="nearest").permute(0, 2, 3, 1).numpy() / 255.0
    bic = F.interpolate(lr_img.float(), scale_factor=4, mode="bicubic", align_corners=False)
    bic = bic.clamp(0, 255).permute(0, 2, 3, 1).numpy() / 255.0
    hr = images.permute(0, 2, 3, 1).numpy() / 255.0

    def psnr(a):
        return float(10 * np.log10(1.0 / np.mean((a - hr) ** 2)))

    rows = [np.concatenate(list(x), axis=1) for x in (near, bic, up, hr)]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)
    return {"psnr_bicubic": round(psnr(bic), 2), "psnr_model": round(psnr(up), 2), "steps": steps}


@torch.no_grad()
def recon_psnr(fn, images: torch.Tensor, device) -> float:
    """PSNR (dB, pixels in [0, 1]) of an autoencoder's reconstruction of `images`."""
    x = to_float(images).to(device)
    y = fn(x).clamp(-1, 1)
    mse = (((y - x) / 2) ** 2).mean().item()
    return round(10 * math.log10(1 / mse), 2)


def make_data(seed: int, n: int, workers: int):
    if workers <= 1:
        data = list(shapes.examples(seed, n))
    else:
        from concurrent.futures import ProcessPoolExecutor

        chunk = (n + workers - 1) // workers
        with ProcessPoolExecutor(workers) as ex:
            parts = ex.map(_data_chunk, [(seed, min(chunk, n - s), s) for s in range(0, n, chunk)])
            data = [d for part in parts for d in part]
    return to_tensor([d[0] for d in data]), [d[2] for d in data]


def _data_chunk(a):
    seed, n, start = a
    return list(shapes.examples(seed, n, start=start))


def run_parts(args: argparse.Namespace) -> None:
    """Runs the two parts in two processes (one core each on a 2-core machine: no thread
    synchronisation in the many small operations) and merges their logs into training_log.json."""
    import subprocess

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    procs = []
    for part in ("txt2img", "superres"):
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--part", part, "--jobs", "1"]
        logf = open(out / f"log_{part}.txt", "w")
        procs.append((part, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), logf))
        print(f"started {part}: log in {out / f'log_{part}.txt'}", flush=True)
    failed = []
    for part, p, logf in procs:
        if p.wait() != 0:
            failed.append(part)
        logf.close()
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see {out}/log_*.txt)")
    merged = {"args": vars(args), "elapsed_s": round(time.time() - t0, 1), "parts": {}}
    for part in ("txt2img", "superres"):
        f = out / f"training_log_{part}.json"
        merged["parts"][part] = json.loads(f.read_text())
        f.unlink()
        (out / f"log_{part}.txt").unlink()
    (out / "training_log.json").write_text(json.dumps(merged, indent=1) + "\n")
    for part, d in merged["parts"].items():
        print(part, json.dumps({k: v.get("final_loss") for k, v in d["stages"].items()}),
              f"{d['elapsed_s']:.0f}s, cpu {d['cpu_seconds']:.0f}s", flush=True)
    print(f"total {time.time() - t0:.0f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models", help="where the model folders and the log go")
    ap.add_argument("--part", default="all", choices=["all", "txt2img", "superres"],
                    help="train both models, or one (two processes can share a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=2,
                    help="with --part all: 2 trains the two models at the same time in two processes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    ap.add_argument("--workers", type=int, default=1, help="processes drawing the data set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=int, default=20000, help="data-set size (images)")
    ap.add_argument("--ae-steps", type=int, default=3000, help="AutoencoderKL steps")
    ap.add_argument("--steps", type=int, default=3800, help="LDMBert + UNet2DConditionModel steps")
    ap.add_argument("--vq-steps", type=int, default=2000, help="VQModel steps")
    ap.add_argument("--sr-steps", type=int, default=7000, help="super-resolution UNet2DModel steps")
    ap.add_argument("--ae-batch", type=int, default=32, help="batch of the AutoencoderKL")
    ap.add_argument("--ae-crop", type=int, default=32, help="AutoencoderKL training crop (pixels, multiple of 8)")
    ap.add_argument("--vq-batch", type=int, default=16, help="batch of the VQModel")
    ap.add_argument("--batch", type=int, default=128, help="batch of the text-to-image UNet")
    ap.add_argument("--sr-batch", type=int, default=64, help="batch of the super-resolution UNet")
    ap.add_argument("--ae-lr", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sr-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-5)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--stage-seconds", type=float, default=0,
                    help="if set, cut each part's step counts to end in about this many seconds")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the sample grids (0: none)")
    args = ap.parse_args()
    if args.part == "all" and args.jobs > 1:
        return run_parts(args)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # Adam's tiny second moments are otherwise very slow on some CPUs
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.part == "all" else f"_{args.part}"
    log = Log(out / f"training_log{suffix}.json", args)

    t = time.time()
    images, scenes = make_data(args.seed, args.data, args.workers)
    log.data["data"] = {"images": len(scenes), "seconds": round(time.time() - t, 1), "seed": args.seed}
    print(f"data: {len(scenes)} images in {time.time() - t:.1f}s", flush=True)
    held_out, _ = make_data(args.seed + 1, 64, 1)  # a different seed: images not trained on

    if args.part in ("all", "txt2img"):
        vae = train_autoencoder(images, args, log, device)
        log.data["stages"]["autoencoder"]["held_out_psnr"] = recon_psnr(
            lambda x: vae.decode(vae.encode(x).latent_dist.mean).sample, held_out, device)
        bert, unet, tok, vocab_dir = train_txt2img(vae, images, scenes, args, log, device)
        t2i = save_txt2img(out, vae, bert, unet, tok, vocab_dir)
        log.save()
        if args.sample_steps:
            sample_txt2img(t2i, out / "samples_txt2img.png", args.sample_steps)
    if args.part in ("all", "superres"):
        vq = train_vq(images, args, log, device)
        log.data["stages"]["vqmodel"]["held_out_psnr"] = recon_psnr(
            lambda x: vq.decode(vq.encode(x).latents).sample, held_out, device)
        sr_unet = train_superres(vq, images, args, log, device)
        sr = save_superres(out, vq, sr_unet)
        log.save()
        if args.sample_steps:
            log.data["superres_check"] = sample_superres(sr, held_out[:8], out / "samples_superres.png",
                                                         args.sample_steps)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*.safetensors"))}
    log.data["weight_bytes"] = sizes
    log.data["cpu_seconds"] = round(time.process_time(), 1)
    log.save()
    print(json.dumps({k: v.get("final_loss") for k, v in log.data["stages"].items()}), flush=True)
    print(json.dumps(log.data.get("superres_check", {})), flush=True)
    print(f"weights: {sum(sizes.values()) / 1e6:.2f} MB; total {time.time() - log.t0:.0f}s, "
          f"cpu {time.process_time():.0f}s", flush=True)


if __name__ == "__main__":
    main()
