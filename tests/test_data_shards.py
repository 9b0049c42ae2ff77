"""Training-time shard errors, the per-user index cache and the sample-table hash (data/shards.py)."""
import json
import os
import shutil

import pytest

from data import build_loader
from data.shards import ShardError, cache_dir, resolve, validate_shards
from test_data_utils import cfgs, convert, make_imagefolder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sh")
    make_imagefolder(d / "src", classes=("a", "b"), per_class=20, size=24)
    convert("--src", str(d / "src"), "--layout", "imagefolder", "--out", str(d / "out"), "--shard-bytes", "15000",
            "--workers", "1")
    return d / "out"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HVP_DATA_CACHE", str(tmp_path / "cache"))


def test_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HVP_DATA_CACHE", str(tmp_path / "a"))
    assert cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("HVP_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "hvp")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "hvp") and os.path.isdir(cache_dir())


def test_index_cache_written_atomically(data_dir, tmp_path):
    vs = validate_shards(resolve(str(data_dir), "train"))
    files = os.listdir(tmp_path / "cache")
    assert files and all(f.endswith((".idx", ".json")) for f in files)  # no temporary leftovers
    assert {os.path.dirname(p) for p in vs.index_paths} == {str(tmp_path / "cache")}


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_missing_or_unreadable_shard_is_an_error_naming_it(data_dir, tmp_path, pipeline, caplog):
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    man = json.load(open(d / "manifest.json"))
    shards = man["splits"]["train"]["shards"]
    assert len(shards) >= 3
    os.remove(d / shards[1]["file"])
    dc, ac = cfgs(str(d), pipeline)
    with pytest.raises(ShardError, match=shards[1]["file"]):
        build_loader("train", dc, ac, img_size=16, micro_batch=4)
    with caplog.at_level("WARNING"):
        L = build_loader("train", dc, ac, img_size=16, micro_batch=4, allow_missing_shards=True)
    assert L.skipped == shards[1]["count"]
    assert L.num_samples == man["splits"]["train"]["num_samples"] - shards[1]["count"]
    assert shards[1]["file"] in caplog.text and "1 shard(s) skipped" in caplog.text
    dc.allow_missing_shards = True  # the config field works as well as the argument
    assert build_loader("train", dc, ac, img_size=16, micro_batch=4).skipped == shards[1]["count"]
    # a shard that exists but cannot be indexed (not a tar)
    (d / shards[2]["file"]).write_bytes(b"this is not a tar archive" * 40)
    dc.allow_missing_shards = False
    with pytest.raises(ShardError, match=shards[2]["file"]):
        build_loader("train", dc, ac, img_size=16, micro_batch=4)


def test_unwritable_cache_is_an_error_not_a_skipped_shard(data_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("HVP_DATA_CACHE", str(blocker / "sub"))  # a path below a regular file
    with pytest.raises(Exception, match="HVP_DATA_CACHE"):
        validate_shards(resolve(str(data_dir), "train"))


def test_sample_table_hash(data_dir, tmp_path):
    dc, ac = cfgs(str(data_dir), "torch")
    a = build_loader("train", dc, ac, img_size=16, micro_batch=4)
    h = a.sample_table_hash()
    assert isinstance(h, int) and -2 ** 63 <= h < 2 ** 63
    assert build_loader("train", dc, ac, img_size=16, micro_batch=4, rank=1, world_size=2).sample_table_hash() == h
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    assert build_loader("train", *cfgs(str(d), "torch"), img_size=16, micro_batch=4).sample_table_hash() == h
    man = json.load(open(d / "manifest.json"))
    os.remove(d / man["splits"]["train"]["shards"][0]["file"])
    b = build_loader("train", *cfgs(str(d), "torch"), img_size=16, micro_batch=4, allow_missing_shards=True)
    assert b.sample_table_hash() != h
