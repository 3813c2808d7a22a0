#!/usr/bin/env python3
"""Builds full-size Latent Diffusion pipelines with random weights, in the published layouts, for
the benchmark (bench/run.py). The configurations are those of the published checkpoints:

- CompVis/ldm-text2im-large-256: LDMBert (32 layers x 1280, 30522-token vocabulary),
  UNet2DConditionModel (320/640/1280/1280, cross-attention dim 1280), AutoencoderKL
  (128/256/512/512), DDIM;
- CompVis/ldm-super-resolution-4x-openimages: UNet2DModel (160/320/320/640, 6 input channels),
  VQModel (128/256/512, 8192 codes of 3), DDIM.

The weights are random (diffusers' own initialisation, seed 0) and float32 safetensors: about
7 GB in all, so they are written outside the repository (default target/bench/models).

    python bench/make_models.py --out target/bench/models
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
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

BERT = dict(vocab_size=30522, max_position_embeddings=77, encoder_layers=32, encoder_ffn_dim=5120,
            encoder_attention_heads=8, head_dim=64, d_model=1280, activation_function="gelu",
            dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0)
UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, cross_attention_dim=1280, downsample_padding=1, flip_sin_to_cos=True,
            freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, act_fn="silu")
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
           block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu")
TXT2IMG_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
SR_UNET = dict(sample_size=256, in_channels=6, out_channels=3, layers_per_block=2,
               block_out_channels=(160, 320, 320, 640),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=32, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, act_fn="silu")
VQ = dict(in_channels=3, out_channels=3, latent_channels=3, layers_per_block=2, sample_size=256,
          block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
          up_block_types=("UpDecoderBlock2D",) * 3, num_vq_embeddings=8192, vq_embed_dim=3,
          norm_num_groups=32, act_fn="silu")
SR_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading",
                    prediction_type="epsilon")


def vocab() -> list[str]:
    """A 30522-entry WordPiece vocabulary (bert-base-uncased cannot be downloaded here): the special
    tokens, characters with their ## forms, then filler words. Token ids do not change the timings."""
    out = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    out += chars + ["##" + c for c in chars]
    words = "a an the of on in with and red green blue painting squirrel eating burger".split()
    out += [w for w in words if w not in out]
    i = 0
    while len(out) < 30522:
        out.append(f"w{i}")
        i += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="target/bench/models")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    torch.manual_seed(0)
    if not (out / "txt2img" / "model_index.json").exists():
        tok_dir = out / "_vocab"
        tok_dir.mkdir(parents=True, exist_ok=True)
        (tok_dir / "vocab.txt").write_text("".join(t + "\n" for t in vocab()))
        tok = BertTokenizer(str(tok_dir / "vocab.txt"), do_lower_case=True)
        pipe = LDMTextToImagePipeline(vqvae=AutoencoderKL(**VAE), bert=LDMBertModel(LDMBertConfig(**BERT)),
                                      tokenizer=tok, unet=UNet2DConditionModel(**UNET),
                                      scheduler=DDIMScheduler(**TXT2IMG_SCHEDULER))
        pipe.save_pretrained(str(out / "txt2img"), safe_serialization=True)
        del pipe
        print(f"txt2img written ({time.time() - t0:.0f}s)", flush=True)
    if not (out / "superres" / "model_index.json").exists():
        pipe = LDMSuperResolutionPipeline(vqvae=VQModel(**VQ), unet=UNet2DModel(**SR_UNET),
                                          scheduler=DDIMScheduler(**SR_SCHEDULER))
        pipe.save_pretrained(str(out / "superres"), safe_serialization=True)
        print(f"superres written ({time.time() - t0:.0f}s)", flush=True)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*.safetensors"))}
    print(json.dumps(sizes, indent=1))


if __name__ == "__main__":
    main()
