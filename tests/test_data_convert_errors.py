"""What a newcomer's mistakes give from `python -m data.convert`: one `error:` line on stderr, exit code 2,
and nothing written (no --out created, an existing --out left byte for byte as it was). Each case runs
the real command in a subprocess, because the one-line contract is about what the terminal shows."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from data.labels import load_label_space
from test_data_utils import ROOT, jpeg_bytes, make_imagefolder, rand_img

# runs the module as `python -m data.convert` does, with the modules named in argv[1] made unimportable
# (sys.modules[name] = None is Python's own way to mark a module as absent)
_RUN = ("import runpy, sys\n"
        "for m in filter(None, sys.argv.pop(1).split(',')): sys.modules[m] = None\n"
        "runpy.run_module('data.convert', run_name='__main__', alter_sys=True)\n")


def cli(*args, absent=""):
    r = subprocess.run([sys.executable, "-c", _RUN, absent, *map(str, args)], cwd=ROOT, capture_output=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    # decoded by hand: text mode would turn the progress bar's carriage returns into newlines
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    return r


def snapshot(root):
    """Every path under root with size, mtime and sha256 (None if root does not exist)."""
    if not os.path.exists(root):
        return None
    out = {}
    for d, _, files in os.walk(root):
        out[os.path.relpath(d, root)] = os.stat(d).st_mtime_ns
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (os.path.getsize(p), os.stat(p).st_mtime_ns,
                                                 hashlib.sha256(fh.read()).hexdigest())
    return out


def visible_lines(text):
    """The lines a terminal shows: a carriage return (how progress bars redraw and erase themselves)
    returns to the start of the line, whose later text overwrites the earlier."""
    shown = []
    for line in text.split("\n"):
        cells = []
        for part in line.split("\r"):
            cells[:len(part)] = part
        if "".join(cells).strip():
            shown.append("".join(cells).rstrip())
    return shown


def refused(r, *fragments):
    """Exit code 2 and exactly one visible line, `error: ...`, holding every fragment."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = visible_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


def _val_dir(tmp_path, n=4):
    src = tmp_path / "val"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        (src / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg_bytes(rand_img(rng)))
    return src


def _devkit(tmp_path, ids, synsets=True):
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{i}\n" for i in ids))
    syn = tmp_path / "devkit_synsets.txt"
    if synsets:
        syn.write_text("\n".join(load_label_space("in1k").synsets) + "\n")
    return gt, syn


def test_missing_val_labels_file(tmp_path):
    src, out = _val_dir(tmp_path), tmp_path / "out"
    r = cli("--src", src, "--layout", "imagenet-val", "--labels", "in1k", "--val-labels", tmp_path / "nope.csv",
            "--out", out)
    refused(r, f"--val-labels {tmp_path / 'nope.csv'}: no such file")
    assert snapshot(out) is None


def test_missing_devkit_synsets_file(tmp_path):
    src, out = _val_dir(tmp_path), tmp_path / "out"
    gt, syn = _devkit(tmp_path, [1, 2, 3, 4], synsets=False)
    r = cli("--src", src, "--layout", "imagenet-val", "--labels", "in1k", "--val-labels", gt,
            "--devkit-synsets", syn, "--out", out)
    refused(r, f"--devkit-synsets {syn}: no such file")
    assert snapshot(out) is None


@pytest.mark.parametrize("bad", [1001, 0])
def test_devkit_id_out_of_range(tmp_path, bad):
    src, out = _val_dir(tmp_path), tmp_path / "out"
    gt, syn = _devkit(tmp_path, [5, 7, bad, 9])
    r = cli("--src", src, "--layout", "imagenet-val", "--labels", "in1k", "--val-labels", gt,
            "--devkit-synsets", syn, "--out", out)
    refused(r, f"{gt}: 1 ILSVRC2012_ID(s) outside 1..1000", f"first {bad} on line 3")
    assert snapshot(out) is None


def test_meta_mat_without_scipy(tmp_path):
    src, out = _val_dir(tmp_path), tmp_path / "out"
    gt, _ = _devkit(tmp_path, [1, 2, 3, 4], synsets=False)
    (tmp_path / "meta.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))  # never opened without scipy
    r = cli("--src", src, "--layout", "imagenet-val", "--labels", "in1k", "--val-labels", gt, "--out", out,
            absent="scipy,scipy.io")
    refused(r, f"reading {tmp_path / 'meta.mat'} needs scipy (pip install scipy); or pass --devkit-synsets FILE")
    assert snapshot(out) is None


@pytest.mark.parametrize("spec,says", [
    ("in21k-fal11", "unknown label space 'in21k-fal11' (did you mean 'in21k-fall11'?): use one of in1k, "),
    ("imagenet1k", "unknown label space 'imagenet1k' (did you mean 'in1k'?)"),
    ("synsets/my21k.txt", "label space file 'synsets/my21k.txt' does not exist"),
])
def test_misspelt_labels(tmp_path, spec, says):
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(src, per_class=1)
    r = cli("--src", src, "--layout", "imagefolder", "--labels", spec, "--out", out)
    refused(r, "--labels: " + says)
    assert snapshot(out) is None


@pytest.mark.parametrize("content", [b'{"format": "webdataset", "fingerprint": "ab', b"\x89PNG\x00\xff", b"[1, 2]"])
def test_corrupt_manifest_in_out(tmp_path, content):
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(src, per_class=2)
    out.mkdir()
    (out / "manifest.json").write_bytes(content)
    (out / "train-000000.tar").write_bytes(b"whatever was there")
    before = snapshot(out)
    r = cli("--src", src, "--layout", "imagefolder", "--out", out, "--workers", "1")
    refused(r, f"--out {out}: manifest.json is corrupt", "delete it (or the whole directory) or use another --out")
    assert snapshot(out) == before


def test_class_folders_without_image_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        (src / c / "notes.txt").write_text("not an image")
    r = cli("--src", src, "--layout", "imagefolder", "--out", out)
    refused(r, f"{src}: none of the 2 class folder(s) hold an image file (.jpg, .jpeg,", ": cat, dog")
    assert snapshot(out) is None
    make_imagefolder(src, classes=("cat", "eel"), per_class=2)  # dog stays without images
    r = cli("--src", src, "--layout", "imagefolder", "--out", out)
    refused(r, f"{src}: 1 of the 3 class folder(s) hold an image file", "): dog")
    assert snapshot(out) is None


@pytest.mark.parametrize("out_exists", [False, True])
def test_no_readable_image(tmp_path, out_exists):
    """Files named like images that none decodes: today's empty manifest (exit 0) is now a refusal that
    takes back the shards it wrote; an --out that existed (empty) is left as it was."""
    src, out = tmp_path / "src", tmp_path / "out"
    rng = np.random.default_rng(1)
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(2):
            (src / c / f"{c}{i}.jpg").write_bytes(b"\xff\xd8" + rng.bytes(200))
    if out_exists:
        out.mkdir()
    before = snapshot(out)
    r = cli("--src", src, "--layout", "imagefolder", "--out", out, "--workers", "1", "--shard-bytes", "300")
    refused(r, f"{src}: none of the 4 image file(s) could be read (e.g. ", "; nothing written")
    assert snapshot(out) == before
