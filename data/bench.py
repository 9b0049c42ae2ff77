"""Input-pipeline throughput.

    python -m data.bench --shards PATTERN|DIR [--workers N --batch 32 --size 224 --batches 0]
    python -m data.bench --make-data DIR [--num 1024]      # ImageNet-sized synthetic JPEGs -> shards

Prints images/s for: decode-only references (PIL decode of the raw JPEG bytes; DALI CPU decoder),
the DALI CPU train pipeline, the DALI GPU ("mixed" decoder) train pipeline when CUDA is present, and
the torch fallback (PIL + timm transforms, DataLoader workers). Train pipelines run the full
augmentation (random-resized-crop, flip, RandAugment (--randaug, '' = off), normalise) at --size.
The first batch (pipeline build / worker start) is not timed.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
import types

import numpy as np


def make_data(out: str, num: int = 1024, seed: int = 0, workers: int = 2) -> dict:
    """~500x375 natural-ish JPEGs (smooth fields + texture + noise, 60-110 KB) -> shards in ``out``."""
    import shutil
    import tempfile
    from PIL import Image
    from .convert import build_parser, convert
    tmp = tempfile.mkdtemp(prefix="hvp-bench-")
    try:
        rng = np.random.default_rng(seed)
        for i in range(num):
            c = f"c{i % 10}"
            os.makedirs(os.path.join(tmp, c), exist_ok=True)
            h, w = (375, 500) if i % 3 else (500, 375)
            low = rng.normal(0, 1, (h // 25 + 2, w // 25 + 2, 3))
            field = np.array(Image.fromarray(((low - low.min()) / (np.ptp(low) + 1e-6) * 255).astype(np.uint8))
                             .resize((w, h), Image.BICUBIC), np.float32)
            mid = rng.normal(0, 1, (h // 4 + 1, w // 4 + 1, 1)).repeat(4, 0).repeat(4, 1)[:h, :w] * 18
            img = field + mid + rng.normal(0, 6, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(tmp, c, f"{i:05d}.jpg"), quality=90)
        args = build_parser().parse_args(["--src", tmp, "--layout", "imagefolder", "--out", out, "--workers",
                                          str(workers), "--shard-bytes", str(16 << 20), "--quiet"])
        return convert(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cfgs(shards, pipeline, workers, randaug="rand-m9-mstd0.5-inc1", interpolation="bicubic"):
    dc = types.SimpleNamespace(train=shards, eval=shards, pipeline=pipeline, workers=workers, crop_pct=0.875,
                               eval_crop="center", train_crop="rrc", interpolation=interpolation)
    ac = types.SimpleNamespace(randaug=randaug, reprob=0.0, hflip=0.5)
    return dc, ac


def _time_loader(L, max_batches: int) -> float:
    it = iter(L)
    next(it)  # warm-up (pipeline build, worker start)
    t, n = time.perf_counter(), 0
    for x, _ in it:
        n += x.shape[0]
        if max_batches and n >= max_batches * x.shape[0]:
            break
    if hasattr(x, "device") and x.device.type == "cuda":
        import torch
        torch.cuda.synchronize()
    return n / max(time.perf_counter() - t, 1e-9)


def bench(shards: str, workers: int, batch: int, size: int, batches: int = 0, randaug: str = "rand-m9-mstd0.5-inc1",
          interpolation: str = "bicubic") -> dict:
    import torch
    from .loader import _dali_available, build_loader
    from .shards import resolve, validate_shards
    res = {}
    vs = validate_shards(resolve(shards, "train"))
    # decode-only: PIL
    from PIL import Image
    blobs = []
    for p, smp in zip(vs.shards, vs.samples):
        with open(p, "rb") as f:
            for jo, js, *_ in smp[: 256 - len(blobs)]:
                f.seek(jo)
                blobs.append(f.read(js))
        if len(blobs) >= 256:
            break
    t = time.perf_counter()
    for b in blobs:
        Image.open(io.BytesIO(b)).convert("RGB")
    res["decode-only PIL (1 core)"] = len(blobs) / (time.perf_counter() - t)
    if _dali_available():
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types_
        from nvidia.dali import pipeline_def

        @pipeline_def(batch_size=batch, num_threads=workers, device_id=None)
        def dec():
            jpg = fn.readers.webdataset(paths=vs.shards, index_paths=vs.index_paths, ext=["jpg"])
            return fn.decoders.image(jpg, device="cpu", output_type=types_.RGB)
        p = dec()
        p.build()
        p.run()
        n_it = max(1, (batches or (vs.num_samples // batch)))
        t = time.perf_counter()
        for _ in range(n_it):
            p.run()
        res[f"decode-only DALI CPU ({workers} threads)"] = n_it * batch / (time.perf_counter() - t)
        del p
        L = build_loader("train", *_cfgs(shards, "dali", workers, randaug, interpolation), img_size=size, micro_batch=batch)
        res[f"DALI CPU train ({workers} threads)"] = _time_loader(L, batches)
        del L
        if torch.cuda.is_available():
            L = build_loader("train", *_cfgs(shards, "dali", workers, randaug, interpolation), img_size=size, micro_batch=batch,
                             device="cuda")
            res["DALI GPU (mixed decoder) train"] = _time_loader(L, batches)
            del L
    L = build_loader("train", *_cfgs(shards, "torch", workers, randaug, interpolation), img_size=size, micro_batch=batch)
    res[f"torch fallback train ({workers} workers)"] = _time_loader(L, batches)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="brace pattern, directory with manifest.json, or manifest path")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=0, help="batches per measurement (0 = one epoch)")
    p.add_argument("--randaug", default="rand-m9-mstd0.5-inc1", help="'' = off")
    p.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    p.add_argument("--make-data", metavar="DIR", help="write synthetic ImageNet-sized shards to DIR and exit")
    p.add_argument("--num", type=int, default=1024)
    a = p.parse_args(argv)
    if a.make_data:
        man = make_data(a.make_data, a.num, workers=a.workers)
        sp = man["splits"]["train"]
        print(f"wrote {sp['num_samples']} images, {sum(s['bytes'] for s in sp['shards']) / sp['num_samples'] / 1e3:.0f} KB "
              f"avg, {len(sp['shards'])} shards -> {a.make_data}")
        return 0
    if not a.shards:
        p.error("--shards is required")
    res = bench(a.shards, a.workers, a.batch, a.size, a.batches, a.randaug, a.interpolation)
    print(f"shards={a.shards} batch={a.batch} size={a.size} workers={a.workers} cpus={os.cpu_count()} "
          f"randaug={a.randaug!r} interpolation={a.interpolation} load={os.getloadavg()[0]:.1f}")
    for k, v in res.items():
        print(f"{k:45s} {v:8.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
