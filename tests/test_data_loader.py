import json
import os
import tarfile

import pytest
import torch

from data import DatasetNotFoundError, build_loader
from test_data_utils import cfgs, convert, decode_ids, make_id_imagefolder, make_imagefolder, run_py

N_ID = 203  # uneven over 2 ranks: 101 / 102


pytestmark = pytest.mark.usefixtures("isolated_index_cache")


@pytest.fixture(scope="module")
def id_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("iddata")
    make_id_imagefolder(d / "src", N_ID)
    convert("--src", str(d / "src"), "--layout", "imagefolder", "--out", str(d / "out"), "--shard-bytes", "40000",
            "--workers", "1", "--no-synset")
    return str(d / "out")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    make_imagefolder(d / "src", classes=("a", "b", "c", "d"), per_class=24, size=40)
    convert("--src", str(d / "src"), "--layout", "imagefolder", "--out", str(d / "out"), "--shard-bytes", "50000",
            "--workers", "1")
    return str(d / "out")


RANK_SCRIPT = r"""
import json, sys
from data import build_loader
from test_data_utils import cfgs, decode_ids
path, pipeline, rank, world = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dc, ac = cfgs(path, pipeline, workers=1 if pipeline == "dali" else 0)
res = {}
for split in ("train", "eval"):
    L = build_loader(split, dc, ac, img_size=16, micro_batch=8, rank=rank, world_size=world, seed=0)
    if split == "train":
        L.set_epoch(1)
    batches = []
    for x, y in L:
        ids = decode_ids(x)
        batches.append([[i, int(l)] for i, l in zip(ids, y.tolist())])
    res[split] = {"len": len(L), "batches": batches}
print("RESULT" + json.dumps(res))
"""


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_two_processes_disjoint_equal_steps(id_data, pipeline):
    import subprocess
    import sys
    from test_data_utils import ROOT
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, id_data, pipeline, str(r), "2"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=240)
        assert p.returncode == 0, e[-4000:]
        outs.append(json.loads(o.split("RESULT", 1)[1]))
    # train: equal steps, full batches, disjoint, labels consistent with ids
    tr = [o["train"] for o in outs]
    assert tr[0]["len"] == tr[1]["len"] == len(tr[0]["batches"]) == len(tr[1]["batches"]) == (N_ID // 2) // 8
    seen = [set(), set()]
    for r in range(2):
        for b in tr[r]["batches"]:
            assert len(b) == 8
            for i, lab in b:
                assert 0 <= i < N_ID and lab == i % 5
                assert i not in seen[r]
                seen[r].add(i)
    assert not seen[0] & seen[1]
    # eval: equal steps, every sample exactly once, padding labelled -1
    ev = [o["eval"] for o in outs]
    assert ev[0]["len"] == ev[1]["len"] == len(ev[0]["batches"]) == len(ev[1]["batches"]) == 13
    real = [i for e in ev for b in e["batches"] for i, lab in b if lab >= 0]
    assert sorted(real) == list(range(N_ID))
    for e in ev:
        for b in e["batches"]:
            assert all(lab == i % 5 for i, lab in b if lab >= 0)
    assert sum(1 for e in ev for b in e["batches"] for _, lab in b if lab < 0) == 2 * 13 * 8 - N_ID


RESUME_SCRIPT = r"""
import sys, torch
from data import build_loader
from test_data_utils import cfgs
path, pipeline, mode, state_file, out_file = sys.argv[1:6]
dc, ac = cfgs(path, pipeline, randaug="rand-m9-mstd0.5-inc1", reprob=0.5, workers=2)
mk = lambda: build_loader("train", dc, ac, img_size=32, micro_batch=8, rank=1, world_size=2, seed=7)
N = 6
def take(L, n):
    out = []
    for i, b in enumerate(L):
        out.append(b)
        if len(out) == n:
            break
    return out
if mode == "first":
    L = mk(); L.set_epoch(2)
    straight = take(L, N)
    L = mk(); L.set_epoch(2)
    half = take(L, N // 2)
    torch.save(L.state_dict(), state_file)
    torch.save({"straight": straight, "half": half}, out_file)
else:
    L = mk()
    L.load_state_dict(torch.load(state_file, weights_only=False))
    torch.save({"rest": take(L, N // 2), "epoch": L.epoch}, out_file)
"""


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_exact_resume_new_process(small_data, pipeline, tmp_path):
    st, o1, o2 = tmp_path / "state.pt", tmp_path / "a.pt", tmp_path / "b.pt"
    run_py(RESUME_SCRIPT, small_data, pipeline, "first", st, o1)
    run_py(RESUME_SCRIPT, small_data, pipeline, "second", st, o2)
    a, b = torch.load(o1, weights_only=False), torch.load(o2, weights_only=False)
    assert b["epoch"] == 2
    resumed = a["half"] + b["rest"]
    assert len(resumed) == len(a["straight"]) == 6
    for (x1, y1), (x2, y2) in zip(a["straight"], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # augmentation is really on and differs between batches
    assert not torch.equal(a["straight"][0][0], a["straight"][1][0])


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_epochs_reshuffle_deterministically(id_data, pipeline):
    dc, ac = cfgs(id_data, pipeline)
    mk = lambda: build_loader("train", dc, ac, img_size=16, micro_batch=8, rank=0, world_size=1, seed=3)
    L = mk()
    torch.manual_seed(123)
    e0 = [decode_ids(x) for x, _ in L]
    e1 = [decode_ids(x) for x, _ in L]  # next iter() = next epoch
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(4)), "the loader must not draw from the global torch RNG"
    assert L.epoch == 1 and len(e0) == len(e1) == N_ID // 8
    assert e0 != e1
    L2 = mk()
    L2.set_epoch(1)
    assert [decode_ids(x) for x, _ in L2] == e1
    assert L.samples_per_epoch == (N_ID // 8) * 8 and L.num_classes == 5


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_shapes_and_crops(small_data, pipeline):
    dc, ac = cfgs(small_data, pipeline, train_crop="resize_crop", randaug="rand-m6-n1", reprob=0.3)
    L = build_loader("train", dc, ac, img_size=24, micro_batch=8, seed=0,
                     model_mean_std=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    x, y = next(iter(L))
    assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert L.num_classes == 4 and L.label_space["synsets"] == ["a", "b", "c", "d"]
    for crop in ("center", "squash"):
        dc, ac = cfgs(small_data, pipeline, eval_crop=crop)
        E = build_loader("eval", dc, ac, img_size=24, micro_batch=16, seed=0)
        batches = list(E)
        assert len(batches) == len(E) == 6 and batches[0][0].shape == (16, 3, 24, 24)
        assert sum(int((y >= 0).sum()) for _, y in batches) == 96


def test_center_crop_matches_between_pipelines(small_data):
    out = {}
    for p in ("torch", "dali"):
        dc, ac = cfgs(small_data, p)
        out[p] = next(iter(build_loader("eval", dc, ac, img_size=32, micro_batch=8, seed=0)))
    assert torch.equal(out["torch"][1], out["dali"][1])
    assert (out["torch"][0] - out["dali"][0]).abs().mean() < 0.15  # same crop, different resize kernels


def _corrupt_copy(src_dir, dst_dir):
    import shutil
    shutil.copytree(src_dir, dst_dir)
    man = json.load(open(os.path.join(dst_dir, "manifest.json")))
    shards = man["splits"]["train"]["shards"]
    assert len(shards) >= 4
    # 1) bad JPEG bytes in shard 0 (SOI marker destroyed), 2) bytes inside a JPEG of shard 0 replaced by
    # garbage but markers kept, 3) truncated tar shard 1, 4) missing shard file 2
    p0 = os.path.join(dst_dir, shards[0]["file"])
    with tarfile.open(p0) as tf:
        jpgs = [m for m in tf if m.name.endswith(".jpg")]
    with open(p0, "r+b") as f:
        f.seek(jpgs[0].offset_data)
        f.write(b"\x00\x00garbage")
        f.seek(jpgs[1].offset_data + 2)
        f.write(b"\x00" * (jpgs[1].size - 4))
    p1 = os.path.join(dst_dir, shards[1]["file"])
    with tarfile.open(p1) as tf:
        ms = [m for m in tf]
    cut = ms[len(ms) // 2].offset_data + 5
    with open(p1, "r+b") as f:
        f.truncate(cut)
    os.remove(os.path.join(dst_dir, shards[2]["file"]))
    return man


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_corrupt_data_at_read_time(small_data, tmp_path, pipeline, caplog):
    d = str(tmp_path / "bad")
    man = _corrupt_copy(small_data, d)
    total = man["splits"]["train"]["num_samples"]
    dc, ac = cfgs(d, pipeline)
    dc.allow_missing_shards = True  # a missing shard file is an error by default (test_data_shards.py)
    with caplog.at_level("WARNING"):
        L = build_loader("train", dc, ac, img_size=24, micro_batch=4, seed=0)
    assert L.skipped >= 1 + man["splits"]["train"]["shards"][2]["count"]
    assert "missing shard file" in caplog.text and "corrupt JPEG" in caplog.text and "truncated" in caplog.text
    assert L.num_samples < total
    # Both pipelines: the index checks removed every bad sample (including the JPEG whose body is
    # garbage between intact markers), so a whole epoch decodes to finite images with real labels.
    n = 0
    for x, y in L:
        n += 1
        assert torch.isfinite(x).all() and (y >= 0).all()
    assert n == len(L) > 0
    assert L.skipped > 0


def test_missing_dataset_errors(tmp_path):
    dc, ac = cfgs(str(tmp_path / "nope"), "torch")
    with pytest.raises(DatasetNotFoundError, match="nope"):
        build_loader("train", dc, ac, img_size=16, micro_batch=2)
    dc, ac = cfgs(str(tmp_path / "x-{000000..000003}.tar"), "dali")
    with pytest.raises(DatasetNotFoundError, match="x-"):
        build_loader("train", dc, ac, img_size=16, micro_batch=2)
    (tmp_path / "emptydir").mkdir()
    dc, ac = cfgs(str(tmp_path / "emptydir"), "torch")
    with pytest.raises(DatasetNotFoundError, match="manifest.json"):
        build_loader("eval", dc, ac, img_size=16, micro_batch=2)


def test_brace_pattern_and_manifest_path(small_data):
    man = json.load(open(os.path.join(small_data, "manifest.json")))
    pat = os.path.join(small_data, man["splits"]["train"]["pattern"])
    for spec in (pat, os.path.join(small_data, "manifest.json")):
        dc, ac = cfgs(spec, "torch")
        L = build_loader("eval", dc, ac, img_size=16, micro_batch=32)
        assert L.num_samples == 96 and L.num_classes == 4


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_one_shard_many_ranks_and_workers(tmp_path, pipeline):
    """Fewer shard files than ranks x workers: splitting is by sample, not by file."""
    make_id_imagefolder(tmp_path / "src", 40)
    man = convert("--src", str(tmp_path / "src"), "--layout", "imagefolder", "--out", str(tmp_path / "out"),
                  "--workers", "1")
    assert len(man["splits"]["train"]["shards"]) == 1
    dc, ac = cfgs(str(tmp_path / "out"), pipeline, workers=2)
    seen = []
    for r in range(3):
        L = build_loader("train", dc, ac, img_size=16, micro_batch=4, rank=r, world_size=3, seed=0)
        ids = [i for x, _ in L for i in decode_ids(x)]
        assert len(L) == 3 and len(ids) == 12
        seen.append(set(ids))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_bench_smoke(small_data, tmp_path, capsys):
    from data.bench import main, make_data
    man = make_data(str(tmp_path / "b"), num=4, workers=1)
    assert man["splits"]["train"]["num_samples"] == 4
    assert main(["--shards", small_data, "--workers", "1", "--batch", "8", "--size", "32", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "DALI CPU train" in out and "torch fallback train" in out and "decode-only" in out
    assert main(["--shards", str(tmp_path / "nope"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --shards: "), err
    from data.bench import compare
    res = compare(small_data, 1, 8, 32, repeats=1)
    assert res["num_samples"] == 96
    assert res["old reader", "warm"][0] > 0 and res["new source", "warm"][0] > 0
