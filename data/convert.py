"""Convert an image dataset into pre-shuffled WebDataset shards (+ DALI index + manifest.json).

    python -m data.convert --src DIR --layout imagefolder|synset-tars|imagenet-val \
        [--labels in1k|in21k-fall11|in22k-ms|in21k-winter21|FILE] --out DIR \
        [--shard-bytes N] [--workers N] [--seed N] [--val-per-class N] [--val-labels FILE]

Layouts
  imagefolder   ``DIR/<class>/<file>``; without ``--labels`` the sorted class folders are the label
                space, with ``--labels`` the folder names must be synsets of that space.
  synset-tars   the ImageNet-21K release: ``DIR/<wnid>.tar`` holding that synset's JPEGs.
  imagenet-val  flat ``DIR/*.JPEG`` plus a label file (``--val-labels``, else auto-detected in DIR):
                ``file,synset`` CSV (also Kaggle's ``LOC_val_solution.csv``), or the devkit's
                ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per line for the sorted
                file names) together with ``--devkit-synsets`` (synsets in ILSVRC2012_ID order, one per
                line) or the devkit's ``meta.mat`` (needs scipy).

Shuffling. Every source sample is listed first (file names / tar headers, no image data), the list
is permuted with ``--seed`` (a true global shuffle, also for 21K-scale sources) and cut into shards
by the source byte sizes (``--shard-bytes``). Each shard is then written independently by a worker,
which makes the result deterministic and resumable shard by shard. For synset-tars this means random
reads into the source tars (fine on SSD/NFS; on spinning disks prefer to unpack first). The list of
~14M entries for full ImageNet-21K needs a few GB of RAM.

Images: every file is decoded once (PIL) to check it. RGB JPEGs are stored byte-for-byte; CMYK,
grayscale, palette, PNG/other-format-in-.JPEG files are converted to RGB and re-encoded as JPEG (q=95).
Undecodable files are skipped and listed in ``manifest.json["skipped"]``.

Resuming: a rerun with the same arguments skips the shards whose file matches its recorded sha256.
An --out holding a different dataset (other source/arguments) is refused.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import sys
import tarfile
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from .labels import LabelSpace, UnknownSynsetError, imagefolder_label_space, load_label_space
from .shards import sha256_file, write_dali_index

log = logging.getLogger("data.convert")

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
FORMAT_VERSION = 1

# an item: (src, member_offset, member_size, synset, name)
#   src = file path; for tar members src is the tar path and offset/size address the data
Item = Tuple[str, int, int, str, str]


class ConvertError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# listing sources
# ----------------------------------------------------------------------------------------------
def _is_img(name: str) -> bool:
    return name.lower().endswith(IMG_EXTS)


def list_imagefolder(src: str) -> Tuple[List[Item], List[str]]:
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise ConvertError(f"{src}: no class folders found (layout imagefolder expects DIR/<class>/<image>)")
    items = []
    for c in classes:
        for root, _, files in os.walk(os.path.join(src, c)):
            for fn in sorted(files):
                if _is_img(fn):
                    p = os.path.join(root, fn)
                    items.append((p, -1, os.path.getsize(p), c, os.path.relpath(p, src)))
    return items, classes


def list_synset_tars(src: str) -> Tuple[List[Item], List[str]]:
    tars = sorted(f for f in os.listdir(src) if f.endswith(".tar"))
    if not tars:
        raise ConvertError(f"{src}: no <synset>.tar files found (layout synset-tars)")
    items, classes = [], []
    for t in tars:
        syn = t[:-4]
        classes.append(syn)
        p = os.path.join(src, t)
        try:
            with tarfile.open(p, "r:") as tf:
                for m in tf:
                    if m.isreg() and _is_img(m.name):
                        # members cut off by a truncated tar are listed and then skipped as corrupt
                        items.append((p, m.offset_data, m.size, syn, f"{t}/{m.name}"))
        except (tarfile.ReadError, EOFError, OSError) as e:
            log.warning("%s: unreadable past some point (%s); keeping the members listed so far", p, e)
    return items, classes


def _read_val_labels(src: str, label_file: Optional[str], devkit_synsets: Optional[str], files: List[str]) -> Dict[str, str]:
    if label_file is None:
        for cand in ("val_labels.csv", "LOC_val_solution.csv", "labels.csv", "ILSVRC2012_validation_ground_truth.txt"):
            for d in (src, os.path.dirname(os.path.abspath(src))):
                if os.path.isfile(os.path.join(d, cand)):
                    label_file = os.path.join(d, cand)
                    break
            if label_file:
                break
    if label_file is None:
        raise ConvertError(f"{src}: layout imagenet-val needs a label file (--val-labels)")
    with open(label_file) as f:
        lines = [l.strip() for l in f if l.strip()]
    if all(l.isdigit() for l in lines):  # devkit ground truth: ILSVRC2012_ID per sorted file
        if devkit_synsets is None:
            meta = os.path.join(os.path.dirname(label_file), "meta.mat")
            if not os.path.isfile(meta):
                raise ConvertError(f"{label_file} holds ILSVRC2012_IDs: pass --devkit-synsets (synsets in ID order) "
                                   "or put the devkit's meta.mat beside it")
            import scipy.io  # noqa: optional
            m = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
            id2syn = {int(r[0]): str(r[1]) for r in m if int(r[0]) <= 1000}
        else:
            with open(devkit_synsets) as f:
                id2syn = {i + 1: l.split()[0] for i, l in enumerate(x for x in f if x.strip())}
        names = sorted(files)
        if len(names) != len(lines):
            raise ConvertError(f"{label_file}: {len(lines)} labels for {len(names)} images")
        return {n: id2syn[int(l)] for n, l in zip(names, lines)}
    out = {}
    for row in csv.reader(lines):
        if len(row) < 2 or row[0].lower() in ("imageid", "file", "filename"):
            continue
        name, syn = row[0].strip(), row[1].strip().split()[0]
        out[os.path.splitext(os.path.basename(name))[0]] = syn
    return out


def list_imagenet_val(src: str, label_file: Optional[str], devkit_synsets: Optional[str]) -> Tuple[List[Item], List[str]]:
    files = sorted(f for f in os.listdir(src) if _is_img(f))
    if not files:
        raise ConvertError(f"{src}: no images found (layout imagenet-val)")
    lab = _read_val_labels(src, label_file, devkit_synsets, files)
    items, missing = [], []
    for fn in files:
        syn = lab.get(fn) or lab.get(os.path.splitext(fn)[0])
        if syn is None:
            missing.append(fn)
            continue
        p = os.path.join(src, fn)
        items.append((p, -1, os.path.getsize(p), syn, fn))
    if missing:
        raise ConvertError(f"{len(missing)} image(s) without a label: {', '.join(missing[:20])}")
    return items, sorted({it[3] for it in items})


# ----------------------------------------------------------------------------------------------
# image normalisation
# ----------------------------------------------------------------------------------------------
def read_item(it: Item) -> bytes:
    src, off, size, _, _ = it
    with open(src, "rb") as f:
        if off >= 0:
            f.seek(off)
            data = f.read(size)
            if len(data) != size:
                raise OSError("truncated tar member")
            return data
        return f.read()


def to_rgb_jpeg(data: bytes, quality: int = 95) -> Tuple[bytes, str]:
    """Return (jpeg_bytes, note). Raises on undecodable data."""
    from PIL import Image
    im = Image.open(io.BytesIO(data))
    fmt, mode = im.format, im.mode
    im.load()  # full decode: catches truncated / corrupt files
    if fmt == "JPEG" and mode == "RGB" and data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
        return data, ""
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.split()[-1])
        im = bg
    else:
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), f"converted {fmt}/{mode}"


# ----------------------------------------------------------------------------------------------
# shard writing
# ----------------------------------------------------------------------------------------------
def plan_shards(n_bytes: Sequence[int], shard_bytes: int) -> List[Tuple[int, int]]:
    out, start, acc = [], 0, 0
    for i, b in enumerate(n_bytes):
        if acc > 0 and acc + b + 1536 > shard_bytes:
            out.append((start, i))
            start, acc = i, 0
        acc += b + 1536  # headers of .jpg/.cls/.synset
    if start < len(n_bytes):
        out.append((start, len(n_bytes)))
    return out


def _write_shard(job) -> dict:
    import webdataset as wds
    path, items, start_index, with_synset = job
    tmp = path + ".tmp"
    skipped, converted = [], 0
    n = 0
    with open(tmp, "wb") as f:
        tw = wds.TarWriter(f, mtime=0, encoder=False)
        for j, (it, cls) in enumerate(items):
            name = it[4]
            try:
                jpg, note = to_rgb_jpeg(read_item(it))
            except Exception as e:  # noqa: BLE001 - any decode failure means skip
                skipped.append({"file": name, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            converted += bool(note)
            stem = os.path.splitext(os.path.basename(name))[0].replace(".", "_").replace(" ", "_")
            key = f"{start_index + j:09d}_{stem}"[:90]
            sample = {"__key__": key, "jpg": jpg, "cls": str(cls).encode()}
            if with_synset:
                sample["synset"] = it[3].encode()
            tw.write(sample)
            n += 1
        tw.close()
    os.replace(tmp, path)
    idx = write_dali_index(path)
    return {"file": os.path.basename(path), "index": os.path.basename(idx), "count": n,
            "bytes": os.path.getsize(path), "sha256": sha256_file(path), "skipped": skipped,
            "converted": converted}


def _fingerprint(args, listing: List[Item], label_space: LabelSpace) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "layout": args.layout, "seed": args.seed, "shard_bytes": args.shard_bytes,
                         "val_per_class": args.val_per_class, "labels": label_space.name,
                         "nclass": len(label_space)}).encode())
    for it in listing:
        h.update(f"{it[4]}|{it[2]}|{it[3]}\n".encode())
    for s in label_space.synsets:
        h.update(s.encode())
    return h.hexdigest()


def convert(args) -> dict:
    t0 = time.time()
    src, out = args.src, args.out
    if not os.path.isdir(src):
        raise ConvertError(f"--src {src} is not a directory")
    if args.layout == "imagefolder":
        items, classes = list_imagefolder(src)
    elif args.layout == "synset-tars":
        items, classes = list_synset_tars(src)
    elif args.layout == "imagenet-val":
        items, classes = list_imagenet_val(src, args.val_labels, args.devkit_synsets)
    else:
        raise ConvertError(f"unknown layout {args.layout}")
    if args.labels:
        space = load_label_space(args.labels)
        space.check(classes)  # UnknownSynsetError listing offending names
    elif args.layout == "imagefolder":
        space = imagefolder_label_space(classes, name=os.path.basename(os.path.normpath(src)) or "imagefolder")
    else:
        raise ConvertError(f"--labels is required for layout {args.layout}")
    fp = _fingerprint(args, items, space)

    os.makedirs(out, exist_ok=True)
    man_path = os.path.join(out, "manifest.json")
    state_dir = os.path.join(out, ".convert")
    if os.path.isfile(man_path):
        with open(man_path) as f:
            old = json.load(f)
        if old.get("fingerprint") != fp:
            raise ConvertError(f"--out {out} already holds a different dataset (manifest.json from source "
                               f"{old.get('source')!r}, layout {old.get('layout')!r}); use another --out or delete it")
    else:
        foreign = [f for f in os.listdir(out) if f not in (".convert",)]
        st_fp = os.path.join(state_dir, "fingerprint")
        if os.path.isfile(st_fp):
            with open(st_fp) as f:
                if f.read().strip() != fp:
                    raise ConvertError(f"--out {out} holds an unfinished conversion of a different dataset; "
                                       "use another --out or delete it")
        elif foreign:
            raise ConvertError(f"--out {out} is not empty and has no manifest.json ({', '.join(sorted(foreign)[:5])}...); "
                               "refusing to write a dataset into it")
    os.makedirs(state_dir, exist_ok=True)
    with open(os.path.join(state_dir, "fingerprint"), "w") as f:
        f.write(fp)

    # split + global shuffle
    rng = random.Random(args.seed)
    splits: Dict[str, List[Item]] = {}
    if args.val_per_class:
        by_cls = defaultdict(list)
        for it in items:
            by_cls[it[3]].append(it)
        tr, va = [], []
        for c in sorted(by_cls):
            lst = by_cls[c]
            sel = set(rng.sample(range(len(lst)), min(args.val_per_class, len(lst) // 2 if len(lst) > 1 else 0)))
            for i, it in enumerate(lst):
                (va if i in sel else tr).append(it)
        splits = {"train": tr, "val": va}
    else:
        splits = {args.split or ("val" if args.layout == "imagenet-val" else "train"): list(items)}

    jobs, plan = [], {}
    for name, lst in splits.items():
        rng.shuffle(lst)
        ranges = plan_shards([it[2] for it in lst], args.shard_bytes)
        plan[name] = []
        for si, (a, b) in enumerate(ranges):
            fname = f"{name}-{si:06d}.tar"
            plan[name].append(fname)
            rec_path = os.path.join(state_dir, fname + ".json")
            path = os.path.join(out, fname)
            if os.path.isfile(rec_path) and os.path.isfile(path):
                with open(rec_path) as f:
                    rec = json.load(f)
                if rec.get("bytes") == os.path.getsize(path) and rec.get("sha256") == sha256_file(path) \
                        and os.path.isfile(os.path.join(out, rec["index"])):
                    continue
                log.warning("shard %s does not match its record: rewriting", fname)
            jobs.append((path, [(it, space.index(it[3])) for it in lst[a:b]], a, args.synset))

    from tqdm import tqdm
    done = sum(len(v) for v in plan.values()) - len(jobs)
    if done:
        log.info("resuming: %d shard(s) already complete", done)
    total = sum(len(j[1]) for j in jobs)
    workers = max(1, int(args.workers))
    with tqdm(total=total, unit="img", desc="convert", disable=args.quiet) as bar:
        def _finish(rec):
            with open(os.path.join(state_dir, rec["file"] + ".json.tmp"), "w") as f:
                json.dump(rec, f)
            os.replace(os.path.join(state_dir, rec["file"] + ".json.tmp"), os.path.join(state_dir, rec["file"] + ".json"))
            bar.update(rec["count"] + len(rec["skipped"]))
        if workers == 1 or len(jobs) <= 1:
            for j in jobs:
                _finish(_write_shard(j))
        else:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(min(workers, len(jobs))) as pool:
                for rec in pool.imap_unordered(_write_shard, jobs):
                    _finish(rec)

    man = {"format": "webdataset", "format_version": FORMAT_VERSION, "fingerprint": fp,
           "source": os.path.abspath(src), "layout": args.layout, "seed": args.seed,
           "shard_bytes": args.shard_bytes, "val_per_class": args.val_per_class,
           "label_space": space.to_manifest(), "num_classes": len(space), "splits": {}, "skipped": [],
           "converted_to_rgb_jpeg": 0, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name, files in plan.items():
        shards = []
        for fname in files:
            with open(os.path.join(state_dir, fname + ".json")) as f:
                rec = json.load(f)
            man["skipped"].extend(rec["skipped"])
            man["converted_to_rgb_jpeg"] += rec.get("converted", 0)
            shards.append({k: rec[k] for k in ("file", "index", "count", "bytes", "sha256")})
        man["splits"][name] = {"num_samples": sum(s["count"] for s in shards), "shards": shards,
                               "pattern": f"{name}-{{000000..{len(files) - 1:06d}}}.tar"}
    with open(man_path + ".tmp", "w") as f:
        json.dump(man, f, indent=1)
    os.replace(man_path + ".tmp", man_path)
    if man["skipped"]:
        log.warning("skipped %d corrupt file(s); listed in %s", len(man["skipped"]), man_path)
    log.info("wrote %s in %.1fs", {k: v["num_samples"] for k, v in man["splits"].items()}, time.time() - t0)
    return man


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True)
    p.add_argument("--layout", required=True, choices=["imagefolder", "synset-tars", "imagenet-val"])
    p.add_argument("--labels", default=None, help="in1k | in21k-fall11 | in22k-ms | in21k-winter21 | FILE")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-bytes", type=int, default=1 << 30)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-per-class", type=int, default=0)
    p.add_argument("--val-labels", default=None, help="imagenet-val label file (file,synset CSV or devkit ground truth)")
    p.add_argument("--devkit-synsets", default=None, help="synsets in ILSVRC2012_ID order (for devkit ground truth)")
    p.add_argument("--split", default=None, help="split name when --val-per-class is 0 (default train; val for imagenet-val)")
    p.add_argument("--no-synset", dest="synset", action="store_false", help="do not store {key}.synset")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        convert(args)
    except (ConvertError, UnknownSynsetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
