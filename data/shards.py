"""Shard-level utilities: DALI index files, dataset resolution (pattern / dir / manifest) and the
read-time validation that lets both pipelines skip corrupt data instead of dying.

DALI index format (what ``wds2idx`` writes, version v1.2)::

    v1.2 <num_samples>
    <ext> <offset> <size> <name> [<ext> <offset> <size> <name> ...]     # one line per sample

``offset`` is the byte offset of the member's *data* (header offset + 512).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tarfile
import threading
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

log = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"


class DatasetNotFoundError(FileNotFoundError):
    pass


def sha256_file(path: str, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def split_name(name: str) -> Tuple[str, str]:
    """webdataset convention: key = up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return os.path.join(d, stem) if d else stem, ext


def scan_tar(path: str) -> Tuple[List[List[Tuple[str, int, int, str]]], bool]:
    """Read tar headers only. Returns (samples, truncated): samples = list of component lists
    ``(ext, data_offset, size, name)`` grouped by key, and whether the archive ended early (a
    truncated member is dropped, and so is its whole sample)."""
    samples: List[List[Tuple[str, int, int, str]]] = []
    truncated = False
    fsize = os.path.getsize(path)
    last_key = None
    try:
        with tarfile.open(path, "r:") as tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.ReadError, EOFError, OSError):
                    truncated = True
                    break
                if m is None:
                    break
                if not m.isreg():
                    continue
                if m.offset_data + m.size > fsize:
                    truncated = True
                    break
                key, ext = split_name(m.name)
                if not os.path.basename(key):
                    continue
                comp = (ext, m.offset_data, m.size, m.name)
                if key != last_key:
                    samples.append([comp])
                    last_key = key
                else:
                    samples[-1].append(comp)
    except (tarfile.ReadError, EOFError, OSError):
        truncated = True
    if truncated and samples:
        # the last sample may be incomplete
        last = samples[-1]
        if last[-1][1] + last[-1][2] > fsize or len(last) < 2:
            samples.pop()
    return samples, truncated


def write_index(samples, idx_path: str) -> None:
    tmp = idx_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{INDEX_VERSION} {len(samples)}\n")
        for comps in samples:
            f.write(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps))
            f.write("\n")
    os.replace(tmp, idx_path)


def write_dali_index(tar_path: str, idx_path: Optional[str] = None) -> str:
    idx_path = idx_path or os.path.splitext(tar_path)[0] + ".idx"
    samples, _ = scan_tar(tar_path)
    write_index(samples, idx_path)
    return idx_path


def read_index(idx_path: str) -> List[List[Tuple[str, int, int, str]]]:
    with open(idx_path) as f:
        head = f.readline().split()
        if not head or head[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a DALI {INDEX_VERSION} index")
        out = []
        for line in f:
            p = line.split()
            if not p:
                continue
            out.append([(p[i], int(p[i + 1]), int(p[i + 2]), p[i + 3]) for i in range(0, len(p), 4)])
    return out


def expand_braces(pattern: str) -> List[str]:
    """``a-{000..003}.tar`` -> 4 names (zero padding kept). Several groups allowed."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") or len(a) == len(b) else 0
    out = []
    for i in range(int(a), int(b) + 1):
        out.extend(expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


# ----------------------------------------------------------------------------------------------
# dataset resolution
# ----------------------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """What a loader reads: shard paths, their sample counts and the label space (if known)."""
    source: str
    shards: List[str]
    counts: List[int]
    label_space: Optional[dict] = None
    manifest: Optional[dict] = None
    split: Optional[str] = None
    missing: List[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def _pick_split(man: dict, split_hint: Optional[str], path: str) -> Tuple[str, dict]:
    splits = man.get("splits") or {}
    if not splits:
        raise DatasetNotFoundError(f"{path}: manifest has no splits")
    if split_hint and split_hint in splits:
        return split_hint, splits[split_hint]
    if len(splits) == 1:
        k = next(iter(splits))
        return k, splits[k]
    raise ValueError(f"{path}: manifest has splits {sorted(splits)}; select one with '{path}#<split>'")


def resolve(spec: str, split_hint: Optional[str] = None) -> ShardSet:
    """``spec``: brace pattern / glob of .tar files, a directory with manifest.json, or a path to a
    manifest.json; ``#split`` suffix selects a split of a multi-split manifest."""
    if not spec:
        raise DatasetNotFoundError("no dataset given (empty path)")
    spec = os.path.expanduser(str(spec))
    if "#" in spec:
        spec, split_hint = spec.rsplit("#", 1)
    man_path = None
    if os.path.isdir(spec):
        man_path = os.path.join(spec, "manifest.json")
        if not os.path.isfile(man_path):
            raise DatasetNotFoundError(f"dataset directory {spec} has no manifest.json")
    elif spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise DatasetNotFoundError(f"manifest {spec} does not exist")
        man_path = spec
    if man_path is not None:
        with open(man_path) as f:
            man = json.load(f)
        root = os.path.dirname(os.path.abspath(man_path))
        name, sp = _pick_split(man, split_hint, man_path)
        shards, counts, missing = [], [], []
        for s in sp["shards"]:
            p = os.path.join(root, s["file"])
            if not os.path.isfile(p):
                missing.append(p)
                continue
            shards.append(p)
            counts.append(int(s["count"]))
        if not shards:
            raise DatasetNotFoundError(f"{man_path}: none of the {len(sp['shards'])} shards of split {name!r} exist")
        return ShardSet(man_path, shards, counts, man.get("label_space"), man, name, missing)
    # pattern
    names = []
    for part in expand_braces(spec):
        if any(c in part for c in "*?["):
            names.extend(sorted(glob.glob(part)))
        else:
            names.append(part)
    existing = [p for p in names if os.path.isfile(p)]
    missing = [p for p in names if not os.path.isfile(p)]
    if not existing:
        raise DatasetNotFoundError(f"no shards match {spec!r}")
    label_space = None
    cand = os.path.join(os.path.dirname(existing[0]), "manifest.json")
    if os.path.isfile(cand):
        try:
            with open(cand) as f:
                label_space = json.load(f).get("label_space")
        except (OSError, ValueError):
            pass
    return ShardSet(spec, existing, [-1] * len(existing), label_space, None, split_hint, missing)


# ----------------------------------------------------------------------------------------------
# read-time validation
# ----------------------------------------------------------------------------------------------
class ShardError(DatasetNotFoundError):
    """A shard that cannot be read or indexed (the message names it)."""


def cache_dir() -> str:
    """Per-user index cache: ``$HVP_DATA_CACHE``, else ``$XDG_CACHE_HOME/hvp``, else ``~/.cache/hvp``."""
    d = os.environ.get("HVP_DATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hvp")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the data index cache {d} ({e}); set HVP_DATA_CACHE to a writable "
                      "directory") from e
    return d



def _jpeg_ok(f, off: int, size: int, level: str = "markers") -> bool:
    """'markers': SOI, a well-formed marker-segment chain up to SOS containing a SOF, and EOI at the
    end (header-only reads, catches the corruption that makes decoders throw). 'decode': full PIL
    decode on top."""
    if size < 4:
        return False
    f.seek(off)
    buf = f.read(min(size, 4096))
    f.seek(off + size - 2)
    if buf[:2] != b"\xff\xd8" or f.read(2) != b"\xff\xd9":
        return False
    pos, base, sof = 2, 0, False
    while True:
        if pos + 4 > base + len(buf):
            if pos + 4 > size:
                return False
            f.seek(off + pos)
            buf, base = f.read(min(size - pos, 4096)), pos
        b0, m = buf[pos - base], buf[pos - base + 1]
        if b0 != 0xFF:
            return False
        if m == 0xFF:  # fill byte
            pos += 1
            continue
        if m == 0xDA:
            if not sof:
                return False
            break
        if m in (0x01,) or 0xD0 <= m <= 0xD7:
            pos += 2
            continue
        if m in (0x00, 0xD8, 0xD9):
            return False
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            sof = True
        ln = (buf[pos - base + 2] << 8) | buf[pos - base + 3]
        if ln < 2:
            return False
        pos += 2 + ln
        if pos >= size:
            return False
    if level == "decode":
        import io
        from PIL import Image
        f.seek(off)
        try:
            with Image.open(io.BytesIO(f.read(size))) as im:
                im.load()
        except Exception:  # noqa: BLE001
            return False
    return True


def validated_index(tar_path: str, exts=("jpg", "cls"), deep="markers") -> Tuple[str, List[Tuple[int, int, int, int, str]], List[str]]:
    """Check one shard: tar headers (truncation), presence of every wanted component, JPEG marker
    structure (``deep='markers'``) or a full decode (``deep='decode'``). Returns (index_path, samples, problems) where the index only
    lists good samples (DALI reads exactly these) and ``samples`` = (jpg_off, jpg_size, cls_off,
    cls_size, key) for the torch path. The result is cached by (path, size, mtime)."""
    st = os.stat(tar_path)
    tag = hashlib.sha1(f"{os.path.abspath(tar_path)}|{st.st_size}|{st.st_mtime_ns}|{exts}|{deep}".encode()).hexdigest()[:20]
    try:
        cache = os.path.join(cache_dir(), tag)
    except OSError as e:
        raise _CacheWriteError(str(e)) from e
    if os.path.isfile(cache + ".json") and os.path.isfile(cache + ".idx"):
        try:
            with open(cache + ".json") as f:
                d = json.load(f)
            return cache + ".idx", [tuple(x) for x in d["samples"]], d["problems"]
        except (OSError, ValueError, KeyError):
            pass
    problems: List[str] = []
    own_idx = os.path.splitext(tar_path)[0] + ".idx"
    samples_raw = None
    if os.path.isfile(own_idx):
        try:
            samples_raw = read_index(own_idx)
            if any(o + s > st.st_size for c in samples_raw for _, o, s, _ in c):
                samples_raw = None  # index does not fit the file: rescan
        except (OSError, ValueError, IndexError):
            samples_raw = None
    if samples_raw is None:
        samples_raw, truncated = scan_tar(tar_path)
        if truncated:
            problems.append(f"{tar_path}: truncated tar (kept the {len(samples_raw)} complete samples)")
    good_raw, good = [], []
    with open(tar_path, "rb") as f:
        for comps in samples_raw:
            byext = {e: (o, s, n) for e, o, s, n in comps}
            key = split_name(comps[0][3])[0]
            if any(e not in byext for e in exts):
                problems.append(f"{tar_path}:{key}: missing component(s) {[e for e in exts if e not in byext]}")
                continue
            jo, js, _ = byext["jpg"]
            co, cs, _ = byext["cls"]
            if not deep:
                good_raw.append([c for c in comps if c[0] in exts])
                good.append((jo, js, co, cs, key))
                continue
            if not _jpeg_ok(f, jo, js, deep):
                problems.append(f"{tar_path}:{key}: corrupt JPEG bytes")
                continue
            f.seek(co)
            try:
                int(f.read(cs).decode("ascii").strip())
            except (ValueError, UnicodeDecodeError):
                problems.append(f"{tar_path}:{key}: bad .cls")
                continue
            good_raw.append([c for c in comps if c[0] in exts])
            good.append((jo, js, co, cs, key))
    # Every rank of every job on this machine may validate the same shard at once: write both files under
    # process-unique names and rename them into place (index first; readers need both), so no reader ever
    # sees a half-written file.
    tmp = f".{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        write_index(good_raw, cache + ".idx" + tmp)
        os.replace(cache + ".idx" + tmp, cache + ".idx")
        with open(cache + ".json" + tmp, "w") as f:
            json.dump({"samples": good, "problems": problems}, f)
        os.replace(cache + ".json" + tmp, cache + ".json")
    except OSError as e:
        raise _CacheWriteError(f"cannot write the index of {tar_path} to the cache {os.path.dirname(cache)} "
                               f"({e}); set HVP_DATA_CACHE to a writable directory") from e
    return cache + ".idx", good, problems


class _CacheWriteError(RuntimeError):
    """Not a shard problem: never turned into a skipped shard."""


@dataclass
class ValidatedShards:
    shards: List[str]
    index_paths: List[str]
    samples: List[List[Tuple[int, int, int, int, str]]]
    skipped: int
    problems: List[str]

    @property
    def counts(self) -> List[int]:
        return [len(s) for s in self.samples]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def table_hash(self) -> int:
        """Hash of the validated sample table (shard file names, and per sample its key, offsets and sizes),
        as a signed 64-bit integer so ranks can all-reduce it (min == max) to check they read the same data."""
        h = hashlib.blake2b(digest_size=8)
        for p, smp in zip(self.shards, self.samples):
            h.update(os.path.basename(p).encode() + b"\0")
            for jo, js, co, cs, key in smp:
                h.update(f"{key}\t{jo}\t{js}\t{co}\t{cs}\n".encode())
        return int.from_bytes(h.digest(), "little", signed=True)


def validate_shards(ss: ShardSet, deep="markers", allow_missing: bool = False) -> ValidatedShards:
    """``deep``: 'markers' (default; JPEG marker structure, header reads only), 'decode' (full PIL
    decode once, cached) or False/'index' (trusts the per-sample content of the shard index (tar structure, truncation and
    missing files are still checked): use it for very large datasets on slow file systems.

    A shard file that is missing or cannot be read or indexed raises :class:`ShardError` naming it;
    with ``allow_missing=True`` it is skipped instead, counted in ``skipped`` (when its count is known)
    and logged. Corrupt samples inside a readable shard (truncation, bad JPEG markers, missing
    components) are always dropped, counted and logged."""
    shards, idxs, samples, problems, lost = [], [], [], [], []
    for p in ss.missing:
        lost.append(f"{p}: missing shard file")
    skipped = 0
    for i, p in enumerate(ss.shards):
        try:
            idx, smp, probs = validated_index(p, deep=deep)
        except (OSError, ValueError) as e:
            lost.append(f"{p}: unreadable shard ({e})")
            if ss.counts[i] > 0:
                skipped += ss.counts[i]
            continue
        problems.extend(probs)
        if ss.counts[i] > 0:
            skipped += max(0, ss.counts[i] - len(smp))
        else:
            skipped += sum(1 for x in probs if ": missing shard" not in x and "truncated tar" not in x)
        if not smp:  # nothing could be indexed (not a tar, cut before its first sample)
            lost.append(f"{p}: no readable sample in the shard" + (f" ({probs[0]})" if probs else ""))
            continue
        shards.append(p)
        idxs.append(idx)
        samples.append(smp)
    if lost and not allow_missing:
        raise ShardError(f"{ss.source}: {len(lost)} shard(s) cannot be read: " + "; ".join(lost[:5])
                         + (" ..." if len(lost) > 5 else "") + " (data.allow_missing_shards=true skips them)")
    if ss.manifest is not None and ss.missing:
        sp = ss.manifest["splits"][ss.split]
        cnt = {os.path.join(os.path.dirname(os.path.abspath(ss.source)), s["file"]): s["count"] for s in sp["shards"]}
        skipped += sum(int(cnt.get(p, 0)) for p in ss.missing)
    problems = lost + problems
    for msg in problems:
        log.warning("data: skipping %s", msg)
    if lost:
        log.warning("data: %s: %d shard(s) skipped (allow_missing_shards)", ss.source, len(lost))
    if not shards:
        raise DatasetNotFoundError(f"{ss.source}: no readable samples in any shard")
    return ValidatedShards(shards, idxs, samples, skipped, problems)
