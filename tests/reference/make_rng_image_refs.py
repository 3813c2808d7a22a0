#!/usr/bin/env python3
"""Record torch's CPU random numbers and Pillow's image behaviour for ldm-core's `rng` and `image`
tests (crates/ldm-core/tests/{rng,image}.rs).

Run by hand from the repository root; the outputs are committed, so the tests never need Python:

    /opt/ref/bin/python tests/reference/make_rng_image_refs.py

Writes
  tests/fixtures/reference/rng.safetensors   torch.randn draws (float32), one tensor per case
  tests/fixtures/reference/rng.json          the index: seed, sizes and tensor key of every case
  tests/fixtures/reference/rng_latents_f4.npy, rng_latents_f8.npy
                                             torch.randn(1, 4, 8, 8) of seed 0 saved by numpy
  tests/fixtures/images/*.png|jpg|webp       small source images and Pillow's outputs for them
  tests/fixtures/images/index.json           what each image case is and which file holds
                                             Pillow's answer

Everything is deterministic: a rerun with the same torch / Pillow / numpy versions rewrites the
same bytes (JPEG and WebP encoders included).

Note: tests/reference/make_fixtures.py empties tests/fixtures/reference/ before it writes; run
this script after it.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "tests" / "fixtures" / "reference"
IMG = ROOT / "tests" / "fixtures" / "images"

# --------------------------------------------------------------------------------------
# torch.randn
# --------------------------------------------------------------------------------------

SEEDS = [0, 1, 42, 2**32 + 5, 2**63 - 1]
SIZES = [1, 2, 3, 15, 16, 17, 31, 32, 33, 100, 1000, 4 * 8 * 8, 2 * 4 * 32 * 32]
# Successive calls on one generator. The n < 16 path caches the second Box-Muller value on the
# generator; the n >= 16 path neither reads nor clears that cache. These sequences pin both facts.
SEQUENCES = [
    (0, [64, 7, 3, 100]),
    (42, [3, 16, 1, 1, 17, 2]),
    (1, [1, 1, 1, 20, 1, 5, 5]),
    (2**32 + 5, [16384, 1, 33]),
]
# Shaped draws: must equal the flat draw of the same number of elements.
SHAPES = [(0, [1, 4, 8, 8]), (7, [2, 4, 32, 32]), (3, [1, 3, 5])]


def randn(seed: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def record_rng() -> None:
    tensors: dict[str, torch.Tensor] = {}
    cases, sequences, shaped = [], [], []
    for seed in SEEDS:
        for n in SIZES:
            key = f"randn/{seed}/{n}"
            tensors[key] = randn(seed, n)
            cases.append({"seed": seed, "n": n, "key": key})
    for k, (seed, sizes) in enumerate(SEQUENCES):
        g = torch.Generator().manual_seed(seed)
        keys = []
        for i, n in enumerate(sizes):
            key = f"seq/{k}/{i}"
            tensors[key] = torch.randn(n, generator=g)
            keys.append(key)
        sequences.append({"seed": seed, "sizes": sizes, "keys": keys})
    for seed, shape in SHAPES:
        key = f"shape/{seed}/" + "x".join(map(str, shape))
        t = randn(seed, shape)
        assert torch.equal(t.flatten(), randn(seed, t.numel())), "shaped draw differs from flat draw"
        tensors[key] = t.contiguous()
        shaped.append({"seed": seed, "shape": shape, "key": key})

    # The same float32 draws computed by torch's portable (non-AVX2) kernel, as on ARM machines:
    # std::log / std::cos / std::sin on float instead of avx_mathfun's polynomials.
    portable = json.loads(
        subprocess.run(
            [sys.executable, __file__, "--portable-draws"],
            env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    portable_cases = []
    for item in portable["cases"]:
        key = f"portable/{item['seed']}/{item['n']}"
        tensors[key] = torch.tensor(item["values"], dtype=torch.float32)
        portable_cases.append({"seed": item["seed"], "n": item["n"], "key": key})

    REF.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(REF / "rng.safetensors"))
    index = {
        "about": "torch.randn(n, generator=torch.Generator().manual_seed(seed)) on the CPU, float32",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "portable_cpu_capability": portable["cpu_capability"],
        "cases": cases,
        "sequences": sequences,
        "shapes": shaped,
        "portable": portable_cases,
    }
    (REF / "rng.json").write_text(json.dumps(index, indent=1) + "\n")

    lat = randn(0, [1, 4, 8, 8]).numpy()
    np.save(REF / "rng_latents_f4.npy", lat.astype("<f4"))
    np.save(REF / "rng_latents_f8.npy", lat.astype("<f8"))
    print(f"rng: {len(tensors)} tensors, capability {index['cpu_capability']}")


def portable_draws() -> None:
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": []}
    for seed in [0, 42]:
        for n in [16, 17, 1000, 2 * 4 * 32 * 32]:
            out["cases"].append({"seed": seed, "n": n, "values": randn(seed, n).tolist()})
    json.dump(out, sys.stdout)


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def test_image(w: int, h: int, seed: int) -> np.ndarray:
    """A random-ish RGB8 picture: smooth gradients, hard black/white edges (Lanczos overshoots and
    must clip) and plain noise, so that every part of the resize is exercised."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    img[..., 0] = 255 * x / max(w - 1, 1)
    img[..., 1] = 255 * y / max(h - 1, 1)
    img[..., 2] = 127.5 + 127.5 * np.sin(x / 3.0 + y / 5.0)
    checker = ((x // 4 + y // 4) % 2) * 255
    band = (x > w / 3) & (x < 2 * w / 3)
    img[band] = checker[band][:, None]
    noise = y > 2 * h / 3
    img[noise] = rs.randint(0, 256, size=(int(noise.sum()), 3))
    img += rs.randint(-8, 9, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def save_png(arr: np.ndarray, name: str) -> str:
    Image.fromarray(arr).save(IMG / name, optimize=False, compress_level=9)
    return name


def raw_png(w: int, h: int, color_type: int, depth: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand, for the sample formats Pillow cannot write (16-bit colour)."""

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + r for r in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def pillow_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def record_images() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    for f in IMG.iterdir():
        f.unlink()
    sources = {
        "src_100x75.png": test_image(100, 75, 1),
        "src_37x50.png": test_image(37, 50, 2),
        "src_65x129.png": test_image(65, 129, 3),
    }
    for name, arr in sources.items():
        save_png(arr, name)

    # Image.resize((w, h), LANCZOS): the call diffusers' super-resolution pipeline makes.
    resizes = [
        # Pillow 13 runs the vertical pass first when the height loses more than twice as many
        # pixels as the width (python-pillow/Pillow#9549): these two sit on either side.
        ("src_100x75.png", 96, 64),  # vertical first: 11 > 2 * 4
        ("src_100x75.png", 96, 67),  # horizontal first: 8 == 2 * 4
        ("src_37x50.png", 32, 32),  # vertical first
        ("src_65x129.png", 64, 128),
        ("src_100x75.png", 100, 75),  # identity
        ("src_100x75.png", 32, 32),  # factor 3 down
        ("src_100x75.png", 64, 75),  # horizontal pass only
        ("src_65x129.png", 65, 32),  # vertical pass only, factor 4
        ("src_37x50.png", 64, 80),  # up
        ("src_37x50.png", 1, 1),
    ]
    lanczos = []
    for src, w, h in resizes:
        with Image.open(IMG / src) as im:
            out = np.asarray(im.convert("RGB").resize((w, h), Image.LANCZOS))
        name = save_png(out, f"lanczos_{src[4:-4]}_to_{w}x{h}.png")
        lanczos.append({"source": src, "width": w, "height": h, "expected": name})

    # Decoding: files of many kinds, and Pillow's Image.open(f).convert("RGB") of each.
    base = sources["src_37x50.png"]
    rs = np.random.RandomState(9)
    decode = []

    def add(name: str, exact: bool, note: str) -> None:
        expected = save_png(pillow_rgb(IMG / name), f"expected_{name.replace('.', '_')}.png")
        with Image.open(IMG / name) as im:
            mode = im.mode
        decode.append({"file": name, "pillow_mode": mode, "expected": expected, "exact": exact, "note": note})

    gray = (base.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    Image.fromarray(gray, "L").save(IMG / "gray8.png")
    add("gray8.png", True, "8-bit grey")
    alpha = rs.randint(0, 256, size=gray.shape).astype(np.uint8)
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(IMG / "gray_alpha8.png")
    add("gray_alpha8.png", True, "8-bit grey + alpha: alpha dropped")
    Image.fromarray(np.dstack([base, alpha]), "RGBA").save(IMG / "rgba8.png")
    add("rgba8.png", True, "RGBA: alpha dropped, not composited")
    pal = Image.fromarray(base).quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    pal.info["transparency"] = 3
    pal.save(IMG / "palette.png", transparency=3)
    add("palette.png", True, "16-colour palette with a transparent index")
    Image.fromarray(gray > 127).save(IMG / "bilevel.png")
    add("bilevel.png", True, "1-bit")
    h, w = gray.shape
    g16 = (gray.astype(np.uint16) * 257 + rs.randint(0, 257, size=gray.shape)).astype(">u2")
    g16[:, : w // 2] //= 256  # a band of small values, so that the clamp below is visible
    (IMG / "gray16.png").write_bytes(raw_png(w, h, 0, 16, [r.tobytes() for r in g16]))
    add("gray16.png", True, "16-bit grey: Pillow opens it as I;16 and convert('RGB') CLAMPS to 255")
    rgb16 = (base.astype(np.uint16) * 257 + rs.randint(0, 257, size=base.shape)).astype(">u2")
    (IMG / "rgb16.png").write_bytes(raw_png(w, h, 2, 16, [r.tobytes() for r in rgb16]))
    add("rgb16.png", True, "16-bit RGB: Pillow keeps the high byte (truncates)")
    a16 = (alpha.astype(np.uint16) * 257).astype(">u2")
    rgba16 = np.dstack([rgb16, a16]).astype(">u2")
    (IMG / "rgba16.png").write_bytes(raw_png(w, h, 6, 16, [r.tobytes() for r in rgba16]))
    add("rgba16.png", True, "16-bit RGBA: high byte, alpha dropped")
    la16 = np.dstack([g16, a16]).astype(">u2")
    (IMG / "gray_alpha16.png").write_bytes(raw_png(w, h, 4, 16, [r.tobytes() for r in la16]))
    add("gray_alpha16.png", True, "16-bit grey + alpha: Pillow opens it as RGBA, high byte")

    src100 = sources["src_100x75.png"]
    Image.fromarray(base).save(IMG / "rgb_q90.jpg", quality=90)
    add("rgb_q90.jpg", False, "baseline JPEG, 4:2:0, odd size")
    Image.fromarray(src100).save(IMG / "rgb_444_progressive.jpg", quality=85, subsampling=0, progressive=True)
    add("rgb_444_progressive.jpg", False, "progressive JPEG, 4:4:4")
    Image.fromarray(gray).save(IMG / "gray.jpg", quality=90)
    add("gray.jpg", False, "greyscale JPEG")
    Image.fromarray(base).convert("CMYK").save(IMG / "cmyk.jpg", quality=95)
    add("cmyk.jpg", False, "CMYK JPEG (Adobe, inverted)")
    Image.fromarray(base).save(IMG / "lossless.webp", lossless=True)
    add("lossless.webp", True, "lossless WebP")
    Image.fromarray(np.dstack([base, alpha]), "RGBA").save(IMG / "lossless_alpha.webp", lossless=True, exact=True)
    add("lossless_alpha.webp", True, "lossless WebP with alpha (exact=True keeps RGB under alpha 0)")
    Image.fromarray(src100).save(IMG / "lossy.webp", quality=90, method=6)
    add("lossy.webp", False, "lossy WebP")

    # diffusers' numpy_to_pil: (images * 255).round().astype("uint8") on float32 in [0, 1].
    vals = np.concatenate(
        [
            (np.arange(0, 511, dtype=np.float32) + 0.0) / np.float32(510),  # ties k + 0.5 and near
            (np.arange(0, 256, dtype=np.float32) + np.float32(0.5)) / np.float32(255),
            rs.rand(256).astype(np.float32),
            np.array([0.0, 1.0, 0.5, 0.9999999, 1e-9], dtype=np.float32),
        ]
    ).astype(np.float32)
    vals = np.clip(vals, 0, 1)
    to_u8 = (vals * 255).round().astype("uint8")
    assert vals.dtype == np.float32 and (vals * 255).dtype == np.float32

    index = {
        "about": "Pillow outputs for crates/ldm-core/tests/image.rs (all images RGB8 unless noted)",
        "numpy_to_pil": {"inputs_f32_bits": vals.view(np.uint32).tolist(), "outputs": to_u8.tolist()},
        "pillow": Image.__version__,
        "libjpeg_turbo": features.version("jpg"),
        "libwebp": features.version("webp"),
        "lanczos": lanczos,
        "decode": decode,
    }
    (IMG / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(f.stat().st_size for f in IMG.iterdir())
    print(f"images: {len(lanczos)} resizes, {len(decode)} decodes, {total / 1024:.0f} KiB")


if __name__ == "__main__":
    if "--portable-draws" in sys.argv:
        portable_draws()
    else:
        torch.manual_seed(0)
        record_rng()
        record_images()
