"""Manual check that `ldm` reproduces diffusers on model folders the project has never seen.

Builds text-to-image and super-resolution pipelines with configurations unlike the fixtures
(other block counts, head layouts, projections, a VQModel decoder for text to image, weights in
the other format), all weights random, saves them in the published layout, runs diffusers and the
`ldm` binary on them, and prints the max abs difference of the images. Run by hand:

    cargo build --release -p ldm-cli
    /opt/ref/bin/python tests/reference/check_unseen.py /tmp/unseen target/release/ldm
"""
import json, subprocess, sys, os
import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel, VQModel,
                       LDMTextToImagePipeline, LDMSuperResolutionPipeline)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from transformers import BertTokenizer
from PIL import Image

out, ldm = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
torch.manual_seed(123)

def randomize(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return m.eval()

vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + \
    ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + ["a", "the", "dog", "on", "grass", "blue", "sky", "red", "cat"]
tokdir = os.path.join(out, "tok"); os.makedirs(tokdir, exist_ok=True)
open(os.path.join(tokdir, "vocab.txt"), "w").write("\n".join(vocab) + "\n")
tokenizer = BertTokenizer(os.path.join(tokdir, "vocab.txt"), do_lower_case=True, model_max_length=77)

unet = randomize(UNet2DConditionModel(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(24, 48, 48, 48), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=24, attention_head_dim=(2, 3, 6, 6), norm_num_groups=12, use_linear_projection=True,
    flip_sin_to_cos=False, freq_shift=1, transformer_layers_per_block=2))
bert = randomize(LDMBertModel(LDMBertConfig(vocab_size=len(vocab), d_model=24, encoder_layers=3, encoder_attention_heads=3,
                                            head_dim=8, encoder_ffn_dim=40, max_position_embeddings=77)))
vq = randomize(VQModel(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=32, block_out_channels=(8, 8, 16, 16),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       norm_num_groups=4, layers_per_block=2, scaling_factor=0.7))
sched = DDIMScheduler(beta_start=0.001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                      set_alpha_to_one=True, steps_offset=1, timestep_spacing="trailing")
pipe = LDMTextToImagePipeline(vqvae=vq, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=sched)
t2i = os.path.join(out, "txt2img")
pipe.save_pretrained(t2i, safe_serialization=False)
pipe = LDMTextToImagePipeline.from_pretrained(t2i)

def run_ldm(args):
    r = subprocess.run([ldm] + args + ["--quiet"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr)

for prompt, guidance, seed in [("a red dog on the grass", 4.0, 3), ("blue sky", 1.0, 11)]:
    ref = pipe(prompt, num_inference_steps=5, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
               output_type="np", height=64, width=64).images
    npy = os.path.join(out, "t2i.npy")
    run_ldm(["txt2img", "--model", t2i, "--prompt", prompt, "--steps", "5", "--guidance", str(guidance),
             "--seed", str(seed), "--output", npy])
    print(f"txt2img {prompt!r} g={guidance}: max abs diff {np.abs(np.load(npy) - ref).max():.3e}")

sr_unet = randomize(UNet2DModel(sample_size=16, in_channels=6, out_channels=3, layers_per_block=1, block_out_channels=(8, 16, 16, 32),
                                down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=4, norm_num_groups=4, mid_block_scale_factor=1.5))
sr_vq = randomize(VQModel(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=16, block_out_channels=(8, 16, 16),
                          down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4))
sr = LDMSuperResolutionPipeline(vqvae=sr_vq, unet=sr_unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0155))
srdir = os.path.join(out, "superres")
sr.save_pretrained(srdir)
sr = LDMSuperResolutionPipeline.from_pretrained(srdir)
img = Image.fromarray((np.random.RandomState(0).rand(40, 72, 3) * 255).astype(np.uint8))
img.save(os.path.join(out, "in.png"))
ref = sr(img, num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="np").images
npy = os.path.join(out, "sr.npy")
run_ldm(["superres", "--model", srdir, "--image", os.path.join(out, "in.png"), "--steps", "4", "--seed", "5", "--output", npy])
print(f"superres 72x40 -> {ref.shape[2]}x{ref.shape[1]}: max abs diff {np.abs(np.load(npy) - ref).max():.3e}")
r = subprocess.run([ldm, "info", "--model", t2i], capture_output=True, text=True)
print(r.stdout if r.returncode == 0 else r.stderr)
