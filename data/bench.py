"""Input-pipeline throughput.

    python -m data.bench --shards PATTERN|DIR [--workers N --batch 32 --size 224 --batches 0]
    python -m data.bench --shards PATTERN|DIR --compare [--repeats 3] [--cold]   # old reader vs new source
    python -m data.bench --make-data DIR [--num 1024]      # ImageNet-sized synthetic JPEGs -> shards

Default: images/s for decode-only references (PIL decode of the raw JPEG bytes; DALI CPU decoder),
the DALI CPU train pipeline, the DALI GPU ("mixed" decoder) train pipeline when CUDA is present, and
the torch fallback (PIL + timm transforms, DataLoader workers). Train pipelines run the full
augmentation (random-resized-crop, flip, RandAugment (--randaug, '' = off), normalise) at --size.
The first batch (pipeline build / worker start) is not timed.

``--compare``: the old DALI train input (``fn.readers.webdataset`` with a 1,024-sample shuffle buffer
over a contiguous per-rank range, then ``decoders.image_random_crop``) against the new one (the
loader: bytes read from the shard index in the global order through ``fn.external_source``, fused
``decoders.image_slice``), both decode + random-resized-crop + flip + normalise at --size (RandAugment
off), on the same shards, page cache warm and (``--cold``) cold: the cache is dropped
(``/proc/sys/vm/drop_caches`` when writable, else ``posix_fadvise(DONTNEED)`` on every shard file)
after both pipelines are built, before their first batch. Both run one epoch at once, alternating
blocks of 4 batches and timing each block, so both see the same background load; --repeats epochs.
The first batch is not timed (its reads include the old reader's 1,024-sample buffer fill), so use a
data set well above 1,024 samples (``--make-data DIR --num 4096``).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
import types

import numpy as np

from .shards import DatasetNotFoundError


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



# ---- old reader vs new source -----------------------------------------------------------------
def drop_page_cache(paths) -> str:
    """Evict ``paths`` from the page cache; returns how."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def _old_reader_pipe(vs, batch, workers, size, interpolation, seed=0):
    """The train input before the global order (kept here as the benchmark's reference): DALI's
    webdataset reader over the whole set with its 1,024-sample shuffle buffer, fused random crop."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types_
    from nvidia.dali import pipeline_def
    interp = types_.INTERP_CUBIC if interpolation == "bicubic" else types_.INTERP_LINEAR
    mean = [255 * m for m in (0.485, 0.456, 0.406)]
    std = [255 * s for s in (0.229, 0.224, 0.225)]

    @pipeline_def(batch_size=batch, num_threads=workers, device_id=None, seed=seed, prefetch_queue_depth=2,
                  exec_dynamic=True)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=vs.shards, index_paths=vs.index_paths, ext=["jpg", "cls"],
                                         shard_id=0, num_shards=1, random_shuffle=True,
                                         initial_fill=max(1, min(1024, vs.num_samples)), stick_to_shard=True,
                                         name="reader", dtypes=[types_.UINT8, types_.UINT8])
        images = fn.decoders.image_random_crop(jpg, device="cpu", output_type=types_.RGB, random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        images = fn.crop_mirror_normalize(images, dtype=types_.FLOAT, output_layout="CHW", mean=mean, std=std)
        return images, fn.pad(cls, fill_value=32)
    p = pipe()
    p.build()
    return p


def _old_batches(p, steps):
    """The old loader's output handling: torch images, labels parsed from the padded .cls bytes."""
    import torch
    for _ in range(steps):
        imgs, cls = p.run()
        c = np.array(cls.as_tensor())
        y = torch.from_numpy(np.array([int(bytes(r).decode("ascii").strip() or -1) for r in c], np.int64))
        yield torch.from_numpy(np.array(imgs.as_tensor())), y


def _interleaved_epoch(its: dict, steps: int, block: int = 4) -> dict:
    """Alternate blocks of ``block`` batches between the iterators (each already past its first batch)
    and sum each one's time: both see the same background load, which on a shared machine moves more
    than the difference being measured. A paused DALI pipeline only keeps its prefetch queue full."""
    spent = {k: 0.0 for k in its}
    imgs = {k: 0 for k in its}
    done = 1
    while done < steps:
        n = min(block, steps - done)
        for k, it in its.items():
            t = time.perf_counter()
            for _ in range(n):
                x, _ = next(it)
                imgs[k] += x.shape[0]
            spent[k] += time.perf_counter() - t
        done += n
    return {k: imgs[k] / max(spent[k], 1e-9) for k in its}


def compare(shards: str, workers: int, batch: int, size: int, repeats: int = 3, cold: bool = False,
            interpolation: str = "bicubic", block: int = 4) -> dict:
    """img/s of the old reader and the new source over one epoch each, interleaved in blocks of batches,
    ``repeats`` times per cache state; {(kind, cache): [runs]}."""
    from .loader import build_loader
    from .shards import resolve, validate_shards
    vs = validate_shards(resolve(shards, "train"))
    steps = vs.num_samples // batch
    res = {"how": None, "num_samples": vs.num_samples}
    for cache in (("warm", "cold") if cold else ("warm",)):
        for r in range(repeats):
            p = _old_reader_pipe(vs, batch, workers, size, interpolation, seed=r)
            L = build_loader("train", *_cfgs(shards, "dali", workers, "", interpolation), img_size=size,
                             micro_batch=batch, seed=r)
            its = {"old reader": _old_batches(p, steps), "new source": iter(L)}
            if cache == "cold":
                res["how"] = drop_page_cache(vs.shards)
            for it in its.values():
                next(it)  # first batch untimed: pipeline start, the old reader's shuffle-buffer fill
            for kind, ips in _interleaved_epoch(its, min(steps, len(L)), block).items():
                res.setdefault((kind, cache), []).append(ips)
            del its, p, L
    return res


def _print_compare(res: dict, a) -> int:
    print(f"shards={a.shards} ({res['num_samples']} samples) batch={a.batch} size={a.size} threads={a.workers} "
          f"cpus={os.cpu_count()} interpolation={a.interpolation} decode+RRC+flip+normalise, DALI CPU; "
          f"cold cache via {res['how'] or '-'}; load={os.getloadavg()[0]:.1f}")
    for cache in ("warm", "cold"):
        if ("old reader", cache) not in res:
            continue
        old, new = res["old reader", cache], res["new source", cache]
        mo, mn = float(np.median(old)), float(np.median(new))
        print(f"{cache:5s} old reader  {mo:8.1f} img/s  (runs {', '.join(f'{v:.1f}' for v in old)})")
        print(f"{cache:5s} new source  {mn:8.1f} img/s  (runs {', '.join(f'{v:.1f}' for v in new)})  "
              f"new/old = {mn / mo:.3f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="brace pattern, directory with manifest.json, or manifest path")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=0, help="batches per measurement (0 = one epoch)")
    p.add_argument("--randaug", default="rand-m9-mstd0.5-inc1", help="'' = off")
    p.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    p.add_argument("--compare", action="store_true", help="old webdataset reader vs new indexed source, side by side")
    p.add_argument("--repeats", type=int, default=3, help="--compare: alternating measurements of each")
    p.add_argument("--cold", action="store_true", help="--compare: also measure with the page cache dropped")
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
    try:
        if a.compare:
            return _print_compare(compare(a.shards, a.workers, a.batch, a.size, a.repeats, a.cold, a.interpolation),
                                  a)
        res = bench(a.shards, a.workers, a.batch, a.size, a.batches, a.randaug, a.interpolation)
    except DatasetNotFoundError as e:
        print(f"error: --shards: {e}", file=sys.stderr)
        return 2
    print(f"shards={a.shards} batch={a.batch} size={a.size} workers={a.workers} cpus={os.cpu_count()} "
          f"randaug={a.randaug!r} interpolation={a.interpolation} load={os.getloadavg()[0]:.1f}")
    for k, v in res.items():
        print(f"{k:45s} {v:8.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
