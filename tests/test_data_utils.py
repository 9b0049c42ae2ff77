"""Helpers for the data tests (no tests here): tiny images, source layouts, loader configs."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def jpeg_bytes(arr: np.ndarray, mode: str = "RGB", fmt: str = "JPEG", quality: int = 95) -> bytes:
    im = Image.fromarray(arr)
    if mode != im.mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=quality) if fmt == "JPEG" else im.save(buf, format=fmt)
    return buf.getvalue()


def rand_img(rng, size=24) -> np.ndarray:
    return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)


def id_color(i: int) -> tuple:
    """A colour that survives JPEG + resize and encodes i (< 4096)."""
    return (16 * (i % 16) + 8, 16 * ((i // 16) % 16) + 8, 16 * ((i // 256) % 16) + 8)


def decode_ids(x, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """Inverse of id_color on a normalised NCHW batch (centre pixel)."""
    import torch
    c = x[:, :, x.shape[2] // 2, x.shape[3] // 2].double()
    rgb = (c * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)) * 255
    q = torch.clamp(torch.floor(rgb / 16), 0, 15).long()
    return (q[:, 0] + 16 * q[:, 1] + 256 * q[:, 2]).tolist()


def make_imagefolder(root, classes=("cat", "dog", "eel"), per_class=6, size=24, seed=0):
    rng = np.random.default_rng(seed)
    names = {}
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            p = os.path.join(root, c, f"{c}_{i}.JPEG")
            with open(p, "wb") as f:
                f.write(jpeg_bytes(rand_img(rng, size)))
            names[f"{c}/{c}_{i}.JPEG"] = c
    return names


def make_id_imagefolder(root, n, n_classes=5, size=16):
    """Uniform-colour images whose colour encodes the sample id; label = id % n_classes."""
    for i in range(n):
        c = f"c{i % n_classes}"
        os.makedirs(os.path.join(root, c), exist_ok=True)
        arr = np.zeros((size, size, 3), np.uint8) + np.array(id_color(i), np.uint8)
        Image.fromarray(arr).save(os.path.join(root, c, f"id{i:05d}.jpg"), quality=98)


def make_synset_tars(root, synsets, per=4, size=24, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for s in synsets:
        with tarfile.open(os.path.join(root, f"{s}.tar"), "w") as tf:
            for i in range(per):
                b = jpeg_bytes(rand_img(rng, size))
                ti = tarfile.TarInfo(f"{s}_{i}.JPEG")
                ti.size = len(b)
                tf.addfile(ti, io.BytesIO(b))


def convert(*args: str):
    from data.convert import build_parser, convert as _c
    a = build_parser().parse_args(list(args) + ["--quiet"])
    return _c(a)


def read_shards(out, split=None):
    """All samples of a converted dir: list of (key, jpg bytes, cls int, synset or None)."""
    import json
    with open(os.path.join(out, "manifest.json")) as f:
        man = json.load(f)
    res = []
    for name, sp in man["splits"].items():
        if split and name != split:
            continue
        for s in sp["shards"]:
            with tarfile.open(os.path.join(out, s["file"])) as tf:
                cur = {}
                for m in tf:
                    key, ext = m.name.split(".", 1)
                    cur.setdefault(key, {})[ext] = tf.extractfile(m).read()
            for k, d in cur.items():
                res.append((k, d["jpg"], int(d["cls"]), d.get("synset", b"").decode() or None))
    return man, res


def cfgs(path, pipeline, *, eval_path=None, randaug="", reprob=0.0, hflip=0.5, workers=1, train_crop="rrc",
         eval_crop="center", crop_pct=0.875, interpolation="bicubic"):
    dc = types.SimpleNamespace(train=path, eval=eval_path or path, pipeline=pipeline, workers=workers,
                               crop_pct=crop_pct, eval_crop=eval_crop, train_crop=train_crop,
                               interpolation=interpolation)
    ac = types.SimpleNamespace(randaug=randaug, reprob=reprob, hflip=hflip)
    return dc, ac


def run_py(code: str, *args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + str(ROOT / "tests"), OMP_NUM_THREADS="1")
    r = subprocess.run([PY, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"subprocess failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r.stdout
