"""Convert an image dataset into pre-shuffled WebDataset shards (+ DALI index + manifest.json).

    python -m data.convert --src DIR --layout imagefolder|synset-tars|imagenet-val \
        [--labels in1k|in21k-fall11|in22k-ms|in21k-winter21|FILE] --out DIR \
        [--shard-bytes N] [--workers N] [--seed N] [--val-per-class N] [--val-labels FILE] \
        [--devkit-synsets FILE] [--allow-partial]

Layouts
  imagefolder   ``DIR/<class>/<file>``; without ``--labels`` the sorted class folders are the label
                space, with ``--labels`` the folder names must be synsets of that space. Every class
                folder must hold at least one image file.
  synset-tars   the ImageNet-21K release: ``DIR/<wnid>.tar`` holding that synset's JPEGs.
  imagenet-val  flat ``DIR/*.JPEG`` plus a label file (``--val-labels``, else auto-detected in DIR):
                ``file,synset`` CSV (also Kaggle's ``LOC_val_solution.csv``), or the devkit's
                ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per line for the sorted
                file names) together with ``--devkit-synsets`` (synsets in ILSVRC2012_ID order, one per
                line) or the devkit's ``meta.mat`` (needs scipy).

Damaged source tars (synset-tars). Every tar is read to its end, past damage: a corrupt header
mid-archive, a tar cut short, or one that cannot be read at all is reported with the number of
members that could not be read, and the conversion stops before writing anything (exit 2) unless
``--allow-partial`` is given; then the readable members are converted and ``manifest.json
["damaged_sources"]`` lists every damaged tar with what was lost.

Shuffling. Every source sample is listed first (file names / tar headers, no image data), the list
is permuted with ``--seed`` (a true global shuffle, also for 21K-scale sources) and cut into shards
by the source byte sizes (``--shard-bytes``). Each shard is then written independently by a worker,
which makes the result deterministic and resumable shard by shard. For synset-tars this means random
reads into the source tars (fine on SSD/NFS; on spinning disks prefer to unpack first). The list of
~14M entries for full ImageNet-21K needs a few GB of RAM.

Images: every file is decoded once (PIL) to check it. RGB JPEGs are stored byte-for-byte; CMYK,
grayscale, palette, PNG/other-format-in-.JPEG files are converted to RGB and re-encoded as JPEG (q=95).
Undecodable files are skipped and listed in ``manifest.json["skipped"]``; classes left without any
readable image are listed in ``manifest.json["classes_without_samples"]``. A source without a single
readable image is an error and leaves nothing behind.

Resuming: a rerun with the same arguments skips the shards whose file matches its recorded sha256.
An --out holding a different dataset (other source/arguments) is refused.

Exit codes: 0 written; 2 refused (bad arguments or source, damaged source tars without
``--allow-partial``, an --out that is not this conversion's) -- one ``error:`` line on stderr and
nothing written.
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
import shutil
import sys
import tarfile
import time
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from .labels import LabelSpace, LabelSpaceError, UnknownSynsetError, imagefolder_label_space, load_label_space
from .shards import sha256_file, write_dali_index

log = logging.getLogger("data.convert")

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
FORMAT_VERSION = 1

# an item: (src, member_offset, member_size, synset, name)
#   src = file path; for tar members src is the tar path and offset/size address the data
Item = Tuple[str, int, int, str, str]


class ConvertError(RuntimeError):
    """A refusal shown to the user as one ``error:`` line (exit code 2); raised before anything is written."""


# ----------------------------------------------------------------------------------------------
# listing sources
# ----------------------------------------------------------------------------------------------
def _is_img(name: str) -> bool:
    return name.lower().endswith(IMG_EXTS)


def _shown(names: Sequence[str], k: int = 10) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def list_imagefolder(src: str) -> Tuple[List[Item], List[str]]:
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise ConvertError(f"{src}: no class folders found (layout imagefolder expects DIR/<class>/<image>)")
    items, empty = [], []
    for c in classes:
        n0 = len(items)
        for root, _, files in os.walk(os.path.join(src, c)):
            for fn in sorted(files):
                if _is_img(fn):
                    p = os.path.join(root, fn)
                    items.append((p, -1, os.path.getsize(p), c, os.path.relpath(p, src)))
        if len(items) == n0:
            empty.append(c)
    if empty:
        # a class without images would be a label no sample carries (torchvision's ImageFolder refuses it too)
        what = "none of the" if len(empty) == len(classes) else f"{len(empty)} of the"
        raise ConvertError(f"{src}: {what} {len(classes)} class folder(s) hold an image file ({', '.join(IMG_EXTS)}): "
                           f"{_shown(empty)}")
    return items, classes


# ----------------------------------------------------------------------------------------------
# source tars: read past damage and count what was lost
# ----------------------------------------------------------------------------------------------
BLOCK = 512  # tar block: headers and member data start on multiples of it
# typeflags of headers that start a member; pax ('x', 'g') and GNU long-name ('L', 'K') headers only
# describe the header that follows them
_MEMBER_TYPES = frozenset(b"01234567\0")
# first bytes of the image formats IMG_EXTS covers (BMP / PPM left out: their 2-byte magics are too
# likely in random data)
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"RIFF")


def _header_name(blk: bytes) -> str:
    name = blk[:100].split(b"\0", 1)[0]
    if blk[257:263] == b"ustar\0":  # POSIX ustar splits long paths into prefix / name
        prefix = blk[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _count_lost(f, start: int, end: int) -> Tuple[int, List[str]]:
    """Members whose header lay in the damaged byte range [start, end) of a tar: (count, names known).

    Written by hand because tarfile reports nothing about what it skips. Scans the raw 512-byte blocks:
    a block that still carries the ``ustar`` magic is a header whose checksum or fields broke (its name
    is recovered); a block that starts with an image signature and follows no such header is the data
    of a member whose header is gone. A damaged range holds at least one member (a header was due at
    ``start``). Exact for tars of images (bar an embedded thumbnail that happens to start on a block
    boundary) and for damage that leaves the magic; two destroyed headers in a row whose members are not
    images count as one."""
    n, names, after_header = 0, [], False
    for chunk in _read_range(f, start, end):
        for i in range(0, len(chunk), BLOCK):
            blk = chunk[i:i + BLOCK]
            if blk[257:262] == b"ustar":
                after_header = blk[156] in _MEMBER_TYPES
                if after_header:
                    n += 1
                    names.append(_header_name(blk))
                continue
            if not after_header and blk.startswith(_IMAGE_MAGIC):
                n += 1
            after_header = False
    return max(n, 1), names


def _read_range(f, start: int, end: int):
    """Blocks of up to 1 MiB of ``f`` from ``start`` to ``end`` (or the end of the file)."""
    f.seek(start)
    pos = start
    while pos < end:
        chunk = f.read(min(1 << 20, end - pos))
        if not chunk:
            return
        yield chunk
        pos += len(chunk)


def _all_zero(f, start: int, end: int) -> bool:
    for chunk in _read_range(f, start, end):
        if chunk.strip(b"\0"):
            return False
    return True


def scan_source_tar(path: str) -> Tuple[List[tarfile.TarInfo], Optional[dict]]:
    """Members of a source tar (headers only) and, if it is damaged, a report of what could not be read:
    ``{tar, members_read, members_lost, lost_names, cut_short, problems}`` (None for an intact tar).

    tarfile alone cannot tell: at a corrupt header mid-archive (and at a tar cut at a member boundary)
    it stops without an error, exactly as at a normal end. With ``ignore_zeros=True`` it instead skips
    unreadable 512-byte blocks up to the next valid header (the documented way to read past damage, GNU
    tar's ``--ignore-zeros``), which also recovers the members after the damage. The skipped byte ranges
    are where a member's header offset lies past the end of the member before it (``TarFile.offset``
    after each member); :func:`_count_lost` counts the members in them. A tar must end with zero blocks
    after its last member: data there, a last member cut short, or no end marker at all is damage too.
    (``TarFile.errorlevel`` does not help here: it only governs errors while extracting.)"""
    base = os.path.basename(path)
    rep = {"tar": base, "members_read": 0, "members_lost": 0, "lost_names": [], "cut_short": False, "problems": []}
    try:
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        rep.update(members_lost=None, problems=[f"cannot be read ({e.strerror or e})"])
        return [], rep
    members: List[tarfile.TarInfo] = []
    with f:
        pos, gaps, err = 0, [], ""  # pos: where the next header is due
        try:
            tf = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
            while True:
                m = tf.next()
                if m is None:
                    break
                if m.offset > pos:
                    gaps.append((pos, m.offset))
                members.append(m)
                pos = tf.offset  # the block after this member's data
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            err = f" ({e})"
        for a, b in gaps:
            k, names = _count_lost(f, a, b)
            rep["members_lost"] += k
            rep["lost_names"] += names
            rep["problems"].append(f"unreadable header at byte {a}, next valid header at byte {b}: {k} member(s) lost")
        read = len(members)
        if pos > size:  # the last member's data (or its padding) runs past the end of the file
            last = members[-1]
            rep["cut_short"] = True
            if last.offset_data + last.size > size:
                read -= 1
                rep["members_lost"] += 1
                rep["lost_names"].append(last.name)
                rep["problems"].append(f"cut short at byte {size} inside member {last.name}")
            else:
                rep["problems"].append(f"cut short at byte {size} after the last member's data (no end-of-archive marker)")
        elif pos == size:
            rep["cut_short"] = True
            rep["problems"].append("empty file" if size == 0 else f"cut short at byte {size} (no end-of-archive marker)")
        elif err or not _all_zero(f, pos, min(size, pos + 2 * BLOCK)):
            # two zero blocks are the end-of-archive marker (what follows them is not part of the
            # archive); anything else after the last member is a member tarfile could not read
            if size - pos < BLOCK:
                rep["cut_short"] = True
                rep["members_lost"] += 1
                rep["problems"].append(f"cut short at byte {size} inside a member header")
            else:
                k, names = _count_lost(f, pos, size)
                rep["members_lost"] += k
                rep["lost_names"] += names
                rep["problems"].append(f"unreadable from byte {pos} to the end{err}: {k} member(s) lost")
    rep["members_read"] = read
    return members, (rep if rep["problems"] else None)


def damage_line(rep: dict) -> str:
    lost = "an unknown number of" if rep["members_lost"] is None else str(rep["members_lost"])
    more = " (and whatever followed the cut: it cannot be counted)" if rep["cut_short"] else ""
    return f"{rep['tar']}: {'; '.join(rep['problems'])} -> {lost} member(s) unreadable{more}, {rep['members_read']} read"


def list_synset_tars(src: str) -> Tuple[List[Item], List[str], List[dict]]:
    """(items, classes, damage reports of the tars that are corrupt, cut short or unreadable)."""
    tars = sorted(f for f in os.listdir(src) if f.endswith(".tar"))
    if not tars:
        raise ConvertError(f"{src}: no <synset>.tar files found (layout synset-tars)")
    items, classes, damaged, empty = [], [], [], []
    for t in tars:
        syn = t[:-4]
        classes.append(syn)
        p = os.path.join(src, t)
        members, rep = scan_source_tar(p)
        n0 = len(items)
        for m in members:
            if m.isreg() and _is_img(m.name):
                # a member cut off by a truncated tar stays listed: it is then skipped (and listed) as corrupt
                items.append((p, m.offset_data, m.size, syn, f"{t}/{m.name}"))
        if rep is not None:
            damaged.append(rep)
        elif len(items) == n0:
            empty.append(t)
    if empty:
        raise ConvertError(f"{src}: {len(empty)} of the {len(tars)} tar(s) hold no image member "
                           f"({', '.join(IMG_EXTS)}): {_shown(empty)}")
    return items, classes, damaged


def _read_lines(path: str, what: str) -> List[str]:
    if not os.path.isfile(path):
        raise ConvertError(f"{what} {path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [l.strip() for l in f if l.strip()]
    except UnicodeDecodeError as e:
        raise ConvertError(f"{what} {path} is not a text file ({e.reason} at byte {e.start})") from None


def _devkit_ids(meta: str) -> Dict[int, str]:
    """ILSVRC2012_ID -> synset of the 1000 classes, from the devkit's meta.mat (a MATLAB file: scipy)."""
    try:
        import scipy.io
    except ImportError:
        raise ConvertError(f"reading {meta} needs scipy (pip install scipy); or pass --devkit-synsets FILE "
                           "(the 1000 synsets in ILSVRC2012_ID order, one per line)") from None
    try:
        m = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
        return {int(r[0]): str(r[1]) for r in m if int(r[0]) <= 1000}
    except Exception as e:  # noqa: BLE001 - whatever fails inside a bad meta.mat, the user's fix is the same
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ConvertError(f"{meta}: not the devkit's meta.mat ({type(e).__name__}: {msg})") from None


def _read_val_labels(src: str, label_file: Optional[str], devkit_synsets: Optional[str], files: List[str]) -> Dict[str, str]:
    if devkit_synsets is not None and not os.path.isfile(devkit_synsets):
        raise ConvertError(f"--devkit-synsets {devkit_synsets}: no such file")
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
    lines = _read_lines(label_file, "--val-labels")
    if lines and all(l.isdigit() for l in lines):  # devkit ground truth: ILSVRC2012_ID per sorted file
        if devkit_synsets is None:
            meta = os.path.join(os.path.dirname(label_file), "meta.mat")
            if not os.path.isfile(meta):
                raise ConvertError(f"{label_file} holds ILSVRC2012_IDs: pass --devkit-synsets (synsets in ID order) "
                                   "or put the devkit's meta.mat beside it")
            id2syn, origin = _devkit_ids(meta), meta
        else:
            id2syn = {i + 1: l.split()[0] for i, l in enumerate(_read_lines(devkit_synsets, "--devkit-synsets"))}
            origin = devkit_synsets
        names = sorted(files)
        if len(names) != len(lines):
            raise ConvertError(f"{label_file}: {len(lines)} labels for {len(names)} images")
        bad = [(i + 1, int(l)) for i, l in enumerate(lines) if int(l) not in id2syn]
        if bad:
            raise ConvertError(f"{label_file}: {len(bad)} ILSVRC2012_ID(s) outside 1..{len(id2syn)} (the ids {origin} "
                               f"defines), first {bad[0][1]} on line {bad[0][0]}")
        return {n: id2syn[int(l)] for n, l in zip(names, lines)}
    out = {}
    for row in csv.reader(lines):
        if len(row) < 2 or not row[1].strip() or row[0].lower() in ("imageid", "file", "filename"):
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
    per_class: Counter = Counter()
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
            per_class[it[3]] += 1
            n += 1
        tw.close()
    os.replace(tmp, path)
    idx = write_dali_index(path)
    return {"file": os.path.basename(path), "index": os.path.basename(idx), "count": n,
            "bytes": os.path.getsize(path), "sha256": sha256_file(path), "skipped": skipped,
            "converted": converted, "class_counts": dict(per_class)}


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


def _read_json(path: str):
    """The parsed file, or None when it is not valid JSON (a corrupt or half-written record)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


def _existing_manifest(out: str) -> Optional[dict]:
    """The manifest of an earlier conversion in --out (None if there is none). Refuses, before anything is
    created, an --out that is a file or whose manifest.json is not a manifest."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConvertError(f"--out {out} exists and is not a directory")
    man_path = os.path.join(out, "manifest.json")
    if not os.path.isfile(man_path):
        return None
    old = _read_json(man_path)
    if not isinstance(old, dict) or "fingerprint" not in old:
        raise ConvertError(f"--out {out}: manifest.json is corrupt (not a manifest this tool wrote); "
                           "delete it (or the whole directory) or use another --out")
    return old


def _check_out(out: str, old: Optional[dict], fp: str) -> None:
    """Refuse an --out that holds anything but this very conversion (finished or not)."""
    if old is not None:
        if old.get("fingerprint") != fp:
            raise ConvertError(f"--out {out} already holds a different dataset (manifest.json from source "
                               f"{old.get('source')!r}, layout {old.get('layout')!r}); use another --out or delete it")
        return
    if not os.path.isdir(out):
        return
    foreign = [f for f in os.listdir(out) if f not in (".convert",)]
    st_fp = os.path.join(out, ".convert", "fingerprint")
    if os.path.isfile(st_fp):
        with open(st_fp, "rb") as f:
            if f.read().strip() != fp.encode():
                raise ConvertError(f"--out {out} holds an unfinished conversion of a different dataset; "
                                   "use another --out or delete it")
    elif foreign:
        raise ConvertError(f"--out {out} is not empty and has no manifest.json ({', '.join(sorted(foreign)[:5])}...); "
                           "refusing to write a dataset into it")


def convert(args) -> dict:
    t0 = time.time()
    src, out = args.src, args.out
    if not os.path.isdir(src):
        raise ConvertError(f"--src {src} is not a directory")
    space = None
    if args.labels:  # first: a misspelt name fails at once, not after listing 21K tars
        try:
            space = load_label_space(args.labels)
        except LabelSpaceError as e:
            raise ConvertError(f"--labels: {e}") from None
    elif args.layout != "imagefolder":
        raise ConvertError(f"--labels is required for layout {args.layout}")
    old_man = _existing_manifest(out)
    damaged: List[dict] = []
    if args.layout == "imagefolder":
        items, classes = list_imagefolder(src)
    elif args.layout == "synset-tars":
        items, classes, damaged = list_synset_tars(src)
    elif args.layout == "imagenet-val":
        items, classes = list_imagenet_val(src, args.val_labels, args.devkit_synsets)
    else:
        raise ConvertError(f"unknown layout {args.layout}")
    if space is not None:
        space.check(classes)  # UnknownSynsetError listing offending names
    else:
        space = imagefolder_label_space(classes, name=os.path.basename(os.path.normpath(src)) or "imagefolder")
    fp = _fingerprint(args, items, space)
    _check_out(out, old_man, fp)
    if damaged:
        partial = getattr(args, "allow_partial", False)
        lost = sum(r["members_lost"] or 0 for r in damaged)
        unknown = " (and an unknown number)" if any(r["members_lost"] is None for r in damaged) else ""
        for r in damaged:
            (log.warning if partial else log.error)("%s", damage_line(r))
        summary = (f"{len(damaged)} of the {len(classes)} source tar(s) are damaged or cut short: {lost}{unknown} "
                   "member(s) unreadable")
        if not partial:
            raise ConvertError(f"{summary}; nothing written. Rerun with --allow-partial to convert the readable "
                               "members (manifest.json then lists what was lost)")
        log.warning("%s; converting the rest (--allow-partial), listed in manifest.json['damaged_sources']", summary)
        if not items:
            raise ConvertError(f"{src}: no tar has a readable image member; nothing written")

    # Everything that can be refused has been checked: from here on files are written. Remember what
    # existed, so that a conversion that yields no sample at all can leave --out as it found it.
    man_path = os.path.join(out, "manifest.json")
    state_dir = os.path.join(out, ".convert")
    created_out = not os.path.isdir(out)
    out_times = None if created_out else (os.stat(out).st_atime_ns, os.stat(out).st_mtime_ns)
    created_state = not os.path.isdir(state_dir)
    os.makedirs(state_dir, exist_ok=True)
    written: List[str] = []
    st_fp = os.path.join(state_dir, "fingerprint")
    if not os.path.isfile(st_fp):
        with open(st_fp, "w") as f:
            f.write(fp)
        written.append(st_fp)

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
                rec = _read_json(rec_path)
                if isinstance(rec, dict) and rec.get("bytes") == os.path.getsize(path) \
                        and rec.get("sha256") == sha256_file(path) and os.path.isfile(os.path.join(out, rec["index"])):
                    continue
                log.warning("shard %s does not match its record: rewriting", fname)
            jobs.append((path, [(it, space.index(it[3])) for it in lst[a:b]], a, args.synset))

    from tqdm import tqdm
    done = sum(len(v) for v in plan.values()) - len(jobs)
    if done:
        log.info("resuming: %d shard(s) already complete", done)
    total = sum(len(j[1]) for j in jobs)
    workers = max(1, int(args.workers))
    # leave=False: the bar is erased when done, so that what stays on the terminal is the log (or the one
    # error line when nothing could be converted)
    with tqdm(total=total, unit="img", desc="convert", disable=args.quiet, leave=False) as bar:
        def _finish(rec):
            rec_path = os.path.join(state_dir, rec["file"] + ".json")
            with open(rec_path + ".tmp", "w") as f:
                json.dump(rec, f)
            os.replace(rec_path + ".tmp", rec_path)
            written.extend([os.path.join(out, rec["file"]), os.path.join(out, rec["index"]), rec_path])
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
           "converted_to_rgb_jpeg": 0, "damaged_sources": damaged, "classes_without_samples": [],
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    per_class: Optional[Counter] = Counter()
    for name, files in plan.items():
        shards = []
        for fname in files:
            rec = _read_json(os.path.join(state_dir, fname + ".json"))
            man["skipped"].extend(rec["skipped"])
            man["converted_to_rgb_jpeg"] += rec.get("converted", 0)
            if per_class is not None and "class_counts" in rec:
                per_class.update(rec["class_counts"])
            else:  # a record from before class counts were kept
                per_class = None
            shards.append({k: rec[k] for k in ("file", "index", "count", "bytes", "sha256")})
        man["splits"][name] = {"num_samples": sum(s["count"] for s in shards), "shards": shards,
                               "pattern": f"{name}-{{000000..{len(files) - 1:06d}}}.tar"}
    if sum(sp["num_samples"] for sp in man["splits"].values()) == 0:
        # nothing usable: take back what this run wrote, so that the refusal leaves --out as it was
        if created_out:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for p in written:
                if os.path.isfile(p):
                    os.remove(p)
            if created_state:
                shutil.rmtree(state_dir, ignore_errors=True)
            os.utime(out, ns=out_times)  # entries came and went: give the directory back its times too
        first = man["skipped"][0] if man["skipped"] else {"file": "?", "error": "?"}
        raise ConvertError(f"{src}: none of the {len(items)} image file(s) could be read (e.g. {first['file']}: "
                           f"{first['error']}); nothing written")
    if per_class is not None:
        man["classes_without_samples"] = sorted(set(classes) - {c for c, n in per_class.items() if n})
        if man["classes_without_samples"]:
            log.warning("%d class(es) have no readable image: %s (listed in %s)", len(man["classes_without_samples"]),
                        _shown(man["classes_without_samples"]), man_path)
    with open(man_path + ".tmp", "w") as f:
        json.dump(man, f, indent=1)
    os.replace(man_path + ".tmp", man_path)
    if man["skipped"]:
        log.warning("skipped %d corrupt file(s); listed in %s", len(man["skipped"]), man_path)
    log.info("wrote %s in %.1fs", {k: v["num_samples"] for k, v in man["splits"].items()}, time.time() - t0)
    return man


def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} is below {lo}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True)
    p.add_argument("--layout", required=True, choices=["imagefolder", "synset-tars", "imagenet-val"])
    p.add_argument("--labels", default=None, help="in1k | in21k-fall11 | in22k-ms | in21k-winter21 | FILE")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-bytes", type=_int_at_least(1), default=1 << 30)
    p.add_argument("--workers", type=_int_at_least(1), default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-per-class", type=_int_at_least(0), default=0)
    p.add_argument("--val-labels", default=None, help="imagenet-val label file (file,synset CSV or devkit ground truth)")
    p.add_argument("--devkit-synsets", default=None, help="synsets in ILSVRC2012_ID order (for devkit ground truth)")
    p.add_argument("--split", default=None, help="split name when --val-per-class is 0 (default train; val for imagenet-val)")
    p.add_argument("--no-synset", dest="synset", action="store_false", help="do not store {key}.synset")
    p.add_argument("--allow-partial", action="store_true",
                   help="synset-tars: convert the readable members of damaged source tars instead of stopping; "
                        "manifest.json['damaged_sources'] lists what was lost")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        convert(args)
    except (ConvertError, UnknownSynsetError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
