"""Generate a small, learnable demo dataset and convert it to shards.

    python -m data.demo --out DIR [--classes 10 --per-class 300 --size 96 --seed 0 --val-per-class 30]

Each class is a shape/texture (disc, square, triangle, ring, cross, stripes at 3 angles, checker, dots,
... cycled for >12 classes) with a class hue; every image gets random position, scale, colour jitter,
a noisy textured background and pixel noise. A small model separates the classes within a few hundred
steps. Images are written as an ImageFolder into a temporary directory and then converted with
``data.convert`` (train + val split) into DIR (DIR/manifest.json, splits 'train' and 'val').
"""
from __future__ import annotations

import argparse
import colorsys
import logging
import os
import shutil
import sys
import tempfile

import numpy as np

SHAPES = ("disc", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "dstripes", "checker", "dots",
          "diamond", "grid")


def _mask(shape: str, s: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7, 2) * s
    r = rng.uniform(0.18, 0.35) * s
    dx, dy = xx - cx, yy - cy
    period = rng.uniform(0.12, 0.2) * s
    inside = (np.abs(dx) < r) & (np.abs(dy) < r)
    if shape == "disc":
        return dx * dx + dy * dy < r * r
    if shape == "square":
        return inside
    if shape == "triangle":
        return (dy < r) & (dy > -r) & (np.abs(dx) < (dy + r) / 2)
    if shape == "ring":
        d = np.sqrt(dx * dx + dy * dy)
        return (d < r) & (d > 0.6 * r)
    if shape == "cross":
        w = 0.3 * r
        return ((np.abs(dx) < w) & (np.abs(dy) < r)) | ((np.abs(dy) < w) & (np.abs(dx) < r))
    if shape == "hstripes":
        return inside & ((yy // (period / 2)) % 2 == 0)
    if shape == "vstripes":
        return inside & ((xx // (period / 2)) % 2 == 0)
    if shape == "dstripes":
        return inside & (((xx + yy) // (period / 2)) % 2 == 0)
    if shape == "checker":
        return inside & (((xx // period) + (yy // period)) % 2 == 0)
    if shape == "dots":
        return inside & (((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 3.5) ** 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) < r
    if shape == "grid":
        return inside & (((xx % period) < period / 4) | ((yy % period) < period / 4))
    raise ValueError(shape)


def render(cls: int, n_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    shape = SHAPES[cls % len(SHAPES)]
    hue = (cls * 0.61803) % 1.0 + rng.normal(0, 0.03)
    fg = np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0)), np.float32)
    bg = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.4), rng.uniform(0.1, 0.6)), np.float32)
    # low-frequency textured background
    low = rng.normal(0, 0.12, (size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
    tex = np.kron(low, np.ones((8, 8, 1), np.float32))[:size, :size]
    img = bg[None, None] + tex
    m = _mask(shape, size, rng)[..., None]
    img = np.where(m, fg[None, None] * rng.uniform(0.8, 1.2), img)
    img = img + rng.normal(0, 0.06, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_imagefolder(root: str, classes: int, per_class: int, size: int, seed: int) -> None:
    from PIL import Image
    for c in range(classes):
        d = os.path.join(root, f"class{c:03d}_{SHAPES[c % len(SHAPES)]}")
        os.makedirs(d, exist_ok=True)
        rng = np.random.default_rng([seed, c])
        for i in range(per_class):
            Image.fromarray(render(c, classes, size, rng)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def make_demo(out: str, classes: int = 10, per_class: int = 300, size: int = 96, seed: int = 0,
              val_per_class: int | None = None, workers: int | None = None, shard_bytes: int = 4 << 20,
              quiet: bool = False) -> dict:
    from .convert import build_parser, convert
    val_per_class = max(1, per_class // 10) if val_per_class is None else val_per_class
    tmp = tempfile.mkdtemp(prefix="hvp-demo-")
    try:
        src = os.path.join(tmp, "demo")
        write_imagefolder(src, classes, per_class, size, seed)
        args = build_parser().parse_args(
            ["--src", src, "--layout", "imagefolder", "--out", out, "--seed", str(seed),
             "--val-per-class", str(val_per_class), "--shard-bytes", str(shard_bytes),
             "--workers", str(workers or os.cpu_count() or 1)] + (["--quiet"] if quiet else []))
        return convert(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-per-class", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--shard-bytes", type=int, default=4 << 20)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    man = make_demo(a.out, a.classes, a.per_class, a.size, a.seed, a.val_per_class, a.workers, a.shard_bytes,
                    a.quiet)
    print({k: v["num_samples"] for k, v in man["splits"].items()}, "->", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
