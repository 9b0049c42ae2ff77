"""One global sample order for both pipelines (data/sampler.py), checked on what the real DALI CPU and
torch pipelines emit (keys travel through the pipelines with the pixels)."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from data.order import collect_order, global_batches
from test_data_utils import ROOT, cfgs, convert, decode_ids, make_id_imagefolder

N_BIG = 8_000   # 80 global batches: a fresh shuffle's correlation has sd ~0.011 (bound 0.05), its
SHARDS = 10     # near-share ~0.13 (bound 1.5x); a replayed order gives ~1 for both
B = 25  # G = 100 for both (W=1, A=4) and (W=4, A=1)


pytestmark = pytest.mark.usefixtures("isolated_index_cache")


@pytest.fixture(scope="module")
def tiny_big(tmp_path_factory):
    """8,000 8x8 JPEGs in 10 WebDataset tars (written directly: the converter is not under test)."""
    from PIL import Image
    d = tmp_path_factory.mktemp("tiny_big")
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    per = N_BIG // SHARDS
    for s in range(SHARDS):
        with tarfile.open(d / f"tiny-{s:06d}.tar", "w") as tf:
            for i in range(s * per, (s + 1) * per):
                for ext, data in (("jpg", blobs[i % 64]), ("cls", str(i % 7).encode())):
                    ti = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return str(d / f"tiny-{{000000..{SHARDS - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def orders(tiny_big):
    """(pipeline, W, A) -> records of 2 epochs from the real pipelines (``python -m data.order``'s code)."""
    out = {}
    for pipeline in ("dali", "torch"):
        for W, A in ((1, 4), (4, 1)):
            out[pipeline, W, A] = collect_order(tiny_big, W, B, A, epochs=2, pipeline=pipeline, seed=0, img_size=8,
                                                workers=1 if pipeline == "dali" else 0)
    return out


def _epoch_sequences(records):
    gb = global_batches(records)
    seqs = {}
    for (e, k) in sorted(gb):
        seqs.setdefault(e, []).extend(gb[e, k])
    return seqs


@pytest.mark.parametrize("pipeline", ["dali", "torch"])
@pytest.mark.parametrize("W, A", [(1, 4), (4, 1)])
def test_full_reshuffle_every_epoch(orders, pipeline, W, A):
    """Position correlation between consecutive epochs ~0 and the share of samples that stay within
    +-5 global batches of their previous position no more than 1.5x a fresh shuffle's."""
    seqs = _epoch_sequences(orders[pipeline, W, A])
    G = B * W * A
    p0 = {k: i for i, k in enumerate(seqs[0])}
    p1 = {k: i for i, k in enumerate(seqs[1])}
    common = sorted(set(p0) & set(p1))
    a = np.array([p0[k] for k in common], float)
    b = np.array([p1[k] for k in common], float)
    r = np.corrcoef(a, b)[0, 1]
    near = np.mean(np.abs(a // G - b // G) <= 5)
    nb = len(seqs[0]) // G
    expect = (nb + 2 * sum(nb - d for d in range(1, 6))) / nb ** 2  # |b0 - b1| <= 5, b0, b1 uniform
    assert abs(r) <= 0.05, r
    assert near <= 1.5 * expect, (near, expect)
    assert near > 0  # the statistic is computed on real positions


@pytest.mark.parametrize("W, A", [(1, 4), (4, 1)])
def test_both_pipelines_emit_the_same_keys(orders, W, A):
    assert orders["dali", W, A] == orders["torch", W, A]
    assert len(orders["dali", W, A]) == 2 * (N_BIG // (B * W * A)) * W * A


@pytest.mark.parametrize("pipeline", ["dali", "torch"])
def test_same_global_batches_on_any_world_size(orders, pipeline):
    one, four = global_batches(orders[pipeline, 1, 4]), global_batches(orders[pipeline, 4, 1])
    assert one == four and len(one) == 2 * (N_BIG // 100)


@pytest.mark.parametrize("pipeline", ["dali", "torch"])
def test_every_sample_once_per_epoch(orders, pipeline):
    seqs = _epoch_sequences(orders[pipeline, 4, 1])
    for e in (0, 1):
        assert len(seqs[e]) == len(set(seqs[e])) == (N_BIG // 100) * 100
        assert all(k.startswith("s") and 0 <= int(k[1:]) < N_BIG for k in seqs[e])
    assert seqs[0] != seqs[1]


# ---- small data (ids encoded in the pixels) ------------------------------------------------------
@pytest.fixture(scope="module")
def id_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ids")
    make_id_imagefolder(d / "src", 150)
    convert("--src", str(d / "src"), "--layout", "imagefolder", "--out", str(d / "out"), "--shard-bytes", "30000",
            "--workers", "1", "--no-synset")
    return str(d / "out")


@pytest.mark.parametrize("pipeline", ["dali", "torch"])
def test_keys_travel_with_the_pixels(id_data, pipeline):
    from data import build_loader
    dc, ac = cfgs(id_data, pipeline, workers=1)
    L = build_loader("train", dc, ac, img_size=16, micro_batch=8, rank=1, world_size=2, seed=5)
    n = 0
    for x, y, keys in L.iter_keyed():
        ids = decode_ids(x)
        assert [int(k.rsplit("id", 1)[1]) for k in keys] == ids
        assert y.tolist() == [i % 5 for i in ids]
        n += len(keys)
    assert n == (150 // 16) * 8


def _gradient_data(root):
    """Images whose pixels encode their coordinates: a wrong crop or flip changes the output a lot."""
    from PIL import Image
    os.makedirs(root / "src" / "c0", exist_ok=True)
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80), (120, 50)] * 4):
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([255 * xx / (w - 1), 255 * yy / (h - 1), 128 + 0 * xx], -1).astype(np.uint8)
        Image.fromarray(arr).save(root / "src" / "c0" / f"g{i:02d}.jpg", quality=98)
    convert("--src", str(root / "src"), "--layout", "imagefolder", "--out", str(root / "out"), "--workers", "1")
    return str(root / "out")


@pytest.mark.parametrize("train_crop", ["rrc", "resize_crop"])
def test_same_crop_and_flip_in_both_pipelines(tmp_path, train_crop):
    from data import build_loader
    data = _gradient_data(tmp_path)
    out = {}
    for p in ("dali", "torch"):
        dc, ac = cfgs(data, p, train_crop=train_crop, interpolation="bilinear", workers=1)
        L = build_loader("train", dc, ac, img_size=32, micro_batch=8, seed=11)
        L.set_epoch(3)
        out[p] = list(L.iter_keyed())
    assert [k for *_, k in out["dali"]] == [k for *_, k in out["torch"]]
    xd = torch.cat([x for x, *_ in out["dali"]])
    xt = torch.cat([x for x, *_ in out["torch"]])
    same = (xd - xt).abs().mean().item()
    other = (xd - xt.roll(1, 0)).abs().mean().item()  # another sample's crop: what a mismatch looks like
    flipped = (xd - xt.flip(-1)).abs().mean().item()
    assert same < 0.05 and other > 10 * same and flipped > 10 * same, (same, other, flipped)


def test_resume_on_another_world_size_continues_the_global_order(id_data):
    """State saved by rank 0 of W=2 (A=1) after 3 micro-steps, loaded by W=1 with A=2 (same G=16):
    the following global batches are those of the uninterrupted order."""
    from data import build_loader
    dc, ac = cfgs(id_data, "torch", workers=0)
    L2 = build_loader("train", dc, ac, img_size=16, micro_batch=8, rank=0, world_size=2, seed=1)
    it = L2.iter_keyed()
    for _ in range(3):
        next(it)
    sd = L2.state_dict()
    assert sd["samples"] == 3 * 16
    L1 = build_loader("train", dc, ac, img_size=16, micro_batch=8, world_size=1, grad_accum=2, seed=1)
    L1.load_state_dict(sd)
    rest = [k for *_, k in L1.iter_keyed()]
    straight = [k for *_, k in build_loader("train", dc, ac, img_size=16, micro_batch=8, grad_accum=2,
                                            seed=1).iter_keyed()]
    assert len(straight) == (150 // 16) * 2 and rest == straight[6:]


def test_order_cli_refuses_missing_data(tmp_path, capsys):
    from data.order import main

    out = tmp_path / "order.jsonl"
    assert main(["--data", str(tmp_path / "nope"), "--world-size", "1", "--micro-batch", "2", "--epochs", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --data: ") and not out.exists(), err


def test_order_cli(id_data, tmp_path):
    out = tmp_path / "order.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "data.order", "--data", id_data, "--world-size", "2", "--micro-batch",
                        "4", "--grad-accum", "2", "--epochs", "2", "--pipeline", "torch", "--workers", "0",
                        "--seed", "3", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    steps = 150 // 16
    assert len(recs) == 2 * steps * 2 * 2
    assert [(d["epoch"], d["step"], d["rank"], d["micro_step"]) for d in recs] == \
        [(e, k, rk, m) for e in (0, 1) for k in range(steps) for rk in (0, 1) for m in (0, 1)]
    assert all(len(d["keys"]) == 4 and all(isinstance(k, str) for k in d["keys"]) for d in recs)
    ep0 = [k for d in recs if d["epoch"] == 0 for k in d["keys"]]
    assert len(set(ep0)) == steps * 16
