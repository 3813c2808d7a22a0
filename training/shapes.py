#!/usr/bin/env python3
"""The synthetic "shapes" data set: one flat-coloured shape on a flat background, with a caption.

Each example is drawn from a seeded generator, so the data set is a pure function of the seed:
`examples(seed, n)` gives the same images and captions on every machine (Pillow draws at 4x and
box-filters down, which is exact integer arithmetic).

    a big red circle on the left, blue background
    a small yellow triangle at the top
    a green square, black background
    a purple circle

Grammar: "a [SIZE] COLOUR SHAPE [POSITION][, BACKGROUND background]": the size, the position and
the background are each left out of some captions (the picture still has one), so that short
prompts such as "a red circle" are in distribution.

Run as a script to write sample images and captions:

    python training/shapes.py --out /tmp/shapes --n 32 --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# Colours far apart in RGB, so that "which colour is this" has one clear answer.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 40),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "purple": (140, 40, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]
SIZES = {"big": (0.21, 0.25), "small": (0.11, 0.15)}  # half-width as a fraction of the side
# Anchor (x, y) of the shape's centre, as fractions of the side; jittered by +-JITTER.
POSITIONS = {
    "on the left": (0.3, 0.5),
    "on the right": (0.7, 0.5),
    "at the top": (0.5, 0.3),
    "at the bottom": (0.5, 0.7),
    "in the middle": (0.5, 0.5),
}
JITTER = 0.03
# How often each optional part of the caption is kept.
KEEP_SIZE, KEEP_POSITION, KEEP_BACKGROUND = 0.5, 0.5, 0.6
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str
    cx: float  # centre and half-width, fractions of the side
    cy: float
    r: float


def sample_scene(rng: random.Random) -> Scene:
    colour = rng.choice(COLOURS)
    background = rng.choice([c for c in COLOURS if c != colour])
    shape = rng.choice(SHAPES)
    size = rng.choice(list(SIZES))
    position = rng.choice(list(POSITIONS))
    ax, ay = POSITIONS[position]
    lo, hi = SIZES[size]
    return Scene(
        colour=colour,
        shape=shape,
        size=size,
        position=position,
        background=background,
        cx=ax + rng.uniform(-JITTER, JITTER),
        cy=ay + rng.uniform(-JITTER, JITTER),
        r=rng.uniform(lo, hi),
    )


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """The scene's caption; with `rng`, optional parts are dropped at random, else all are kept."""
    keep = (lambda p: True) if rng is None else (lambda p: rng.random() < p)
    words = ["a"]
    if keep(KEEP_SIZE):
        words.append(scene.size)
    words += [scene.colour, scene.shape]
    if keep(KEEP_POSITION):
        words.append(scene.position)
    text = " ".join(words)
    if keep(KEEP_BACKGROUND):
        text += f", {scene.background} background"
    return text


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of `size` x `size`, anti-aliased by drawing at 4x and box-filtering."""
    s = size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), PALETTE[scene.background])
    d = ImageDraw.Draw(img)
    cx, cy, r = scene.cx * s, scene.cy * s, scene.r * s
    fill = PALETTE[scene.colour]
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "triangle":  # pointing up, as wide as it is tall: half its bounding box
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return img.reduce(SUPERSAMPLE)


def downscale(img: Image.Image, factor: int = 4) -> Image.Image:
    """The low-resolution input of the super-resolution model: a box filter (mean of each block)."""
    return img.reduce(factor)


def example(seed: int, i: int, size: int = 64):
    """Example `i` of the data set of `seed`: (image, caption, scene). Each example has its own
    generator, so any slice of the data set can be made alone (and in parallel)."""
    rng = random.Random(seed * 1_000_003 + i)
    scene = sample_scene(rng)
    return render(scene, size), caption(scene, rng), scene


def examples(seed: int, n: int, size: int = 64, start: int = 0):
    """Examples `start` .. `start + n` of the data set of `seed`."""
    for i in range(start, start + n):
        yield example(seed, i, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for NNNN.png and captions.json")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (img, cap, scene) in enumerate(examples(args.seed, args.n, args.size)):
        name = f"{i:04d}.png"
        img.save(out / name, optimize=True)
        index.append({"file": name, "caption": cap, **scene.__dict__})
    (out / "captions.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"wrote {len(index)} images to {out}")


if __name__ == "__main__":
    main()
