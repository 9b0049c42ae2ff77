import io
import tarfile
import os
import time

import numpy as np
import pytest
from PIL import Image

from data.convert import ConvertError
from data.labels import UnknownSynsetError, load_label_space
from data.shards import read_index, scan_tar, sha256_file
from test_data_utils import convert, jpeg_bytes, make_imagefolder, make_synset_tars, rand_img, read_shards


def _special_files(root):
    rng = np.random.default_rng(5)
    d = os.path.join(root, "cat")
    with open(os.path.join(d, "cmyk.JPEG"), "wb") as f:
        f.write(jpeg_bytes(rand_img(rng), mode="CMYK"))
    with open(os.path.join(d, "gray.JPEG"), "wb") as f:
        f.write(jpeg_bytes(rand_img(rng), mode="L"))
    with open(os.path.join(d, "png_in_jpeg.JPEG"), "wb") as f:
        f.write(jpeg_bytes(rand_img(rng), fmt="PNG"))
    with open(os.path.join(d, "garbage.JPEG"), "wb") as f:
        f.write(b"\xff\xd8" + rng.bytes(300))
    good = jpeg_bytes(rand_img(rng, 64))
    with open(os.path.join(d, "truncated.JPEG"), "wb") as f:
        f.write(good[: len(good) // 3])


def test_imagefolder_roundtrip_and_special_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    names = make_imagefolder(src, per_class=8)
    _special_files(src)
    man = convert("--src", str(src), "--layout", "imagefolder", "--out", str(out), "--shard-bytes", "4000",
                  "--workers", "2", "--seed", "1")
    assert man["num_classes"] == 3 and man["label_space"]["synsets"] == ["cat", "dog", "eel"]
    skipped = sorted(os.path.basename(s["file"]) for s in man["skipped"])
    assert skipped == ["garbage.JPEG", "truncated.JPEG"]
    assert man["converted_to_rgb_jpeg"] == 3
    sp = man["splits"]["train"]
    assert len(sp["shards"]) > 2 and sp["num_samples"] == 24 + 3
    _, samples = read_shards(out)
    assert len(samples) == 27
    got = {}
    for key, jpg, cls, syn in samples:
        im = Image.open(io.BytesIO(jpg))
        assert im.format == "JPEG" and im.mode == "RGB"
        im.load()
        got[key.split("_", 1)[1]] = (cls, syn)
    for rel, c in names.items():
        stem = os.path.splitext(os.path.basename(rel))[0]
        assert got[stem] == (["cat", "dog", "eel"].index(c), c)
    for special in ("cmyk", "gray", "png_in_jpeg"):
        assert got[special][0] == 0
    # shuffled across shards, per-shard metadata right, DALI index matches the tar
    first = [int(k.split("_")[0]) for k, *_ in samples]
    assert sorted(first) == list(range(len(first))) or len(set(first)) == len(first)
    labels_in_order = [s[2] for s in samples]
    assert labels_in_order != sorted(labels_in_order)
    for s in sp["shards"]:
        p = out / s["file"]
        assert sha256_file(str(p)) == s["sha256"] and os.path.getsize(p) == s["bytes"]
        idx = read_index(str(out / s["index"]))
        assert len(idx) == s["count"] and idx == scan_tar(str(p))[0]


def test_val_split(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(src, per_class=10)
    man = convert("--src", str(src), "--layout", "imagefolder", "--out", str(out), "--val-per-class", "3",
                  "--workers", "1")
    assert man["splits"]["val"]["num_samples"] == 9 and man["splits"]["train"]["num_samples"] == 21
    _, tr = read_shards(out, "train")
    _, va = read_shards(out, "val")
    assert not {k.split("_", 1)[1] for k, *_ in tr} & {k.split("_", 1)[1] for k, *_ in va}


def test_synset_tars_in1k(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    syns = ["n01440764", "n01443537", "n15075141"]
    make_synset_tars(src, syns, per=4)
    man = convert("--src", str(src), "--layout", "synset-tars", "--labels", "in1k", "--out", str(out),
                  "--workers", "2", "--shard-bytes", "5000")
    assert man["num_classes"] == 1000 and man["label_space"]["name"] == "in1k"
    _, samples = read_shards(out)
    sp = load_label_space("in1k")
    assert len(samples) == 12
    for key, jpg, cls, syn in samples:
        assert sp.synsets[cls] == syn and key.split("_", 1)[1].startswith(syn)
    assert sorted({s[2] for s in samples}) == [0, 1, 999]


def test_synset_tars_unknown_synset(tmp_path):
    src = tmp_path / "src"
    make_synset_tars(src, ["n01440764", "n99999999", "n88888888"], per=1)
    with pytest.raises(UnknownSynsetError) as e:
        convert("--src", str(src), "--layout", "synset-tars", "--labels", "in1k", "--out", str(tmp_path / "o"))
    assert "n99999999" in str(e.value) and "n88888888" in str(e.value)


def test_21k_label_space_user_file(tmp_path):
    src = tmp_path / "src"
    make_synset_tars(src, ["n00004475", "n15102894"], per=2)
    man = convert("--src", str(src), "--layout", "synset-tars", "--labels", "in21k-fall11", "--out",
                  str(tmp_path / "o1"), "--workers", "1")
    assert man["num_classes"] == 21841
    assert sorted({s[2] for s in read_shards(tmp_path / "o1")[1]}) == [0, 21840]
    f = tmp_path / "w21full.txt"
    f.write_text("n15102894\nn00004475\nn00000001\n")
    man = convert("--src", str(src), "--layout", "synset-tars", "--labels", str(f), "--out", str(tmp_path / "o2"),
                  "--workers", "1")
    assert man["num_classes"] == 3 and man["label_space"]["name"] == "w21full"


@pytest.mark.parametrize("fmt", ["csv", "devkit"])
def test_imagenet_val_layout(tmp_path, fmt):
    src = tmp_path / "val"
    src.mkdir()
    rng = np.random.default_rng(0)
    one = load_label_space("in1k").synsets
    truth = {}
    for i in range(1, 7):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        (src / name).write_bytes(jpeg_bytes(rand_img(rng)))
        truth[name] = one[(i * 37) % 1000]
    if fmt == "csv":
        lab = tmp_path / "labels.csv"
        lab.write_text("file,synset\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
        extra = []
    else:
        # devkit: ILSVRC2012_IDs in a (here: reversed) devkit order given by --devkit-synsets
        dev_order = one[::-1]
        (tmp_path / "devkit_synsets.txt").write_text("\n".join(dev_order) + "\n")
        lab = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
        lab.write_text("".join(f"{dev_order.index(truth[k]) + 1}\n" for k in sorted(truth)))
        extra = ["--devkit-synsets", str(tmp_path / "devkit_synsets.txt")]
    out = tmp_path / "out"
    man = convert("--src", str(src), "--layout", "imagenet-val", "--labels", "in1k", "--val-labels", str(lab),
                  "--out", str(out), "--workers", "1", *extra)
    assert list(man["splits"]) == ["val"]
    _, samples = read_shards(out)
    assert len(samples) == 6
    for key, jpg, cls, syn in samples:
        name = key.split("_", 1)[1] + ".JPEG"
        assert one[cls] == truth[name] == syn


def test_resume_and_checksums(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(src, per_class=6)
    args = ["--src", str(src), "--layout", "imagefolder", "--out", str(out), "--shard-bytes", "3000", "--workers", "1"]
    man = convert(*args)
    shards = man["splits"]["train"]["shards"]
    assert len(shards) >= 3
    mt = {s["file"]: os.path.getmtime(out / s["file"]) for s in shards}
    time.sleep(0.05)
    os.remove(out / shards[0]["file"])  # interrupted / lost
    with open(out / shards[1]["file"], "r+b") as f:  # damaged: checksum differs
        f.seek(600)
        f.write(b"XXXX")
    man2 = convert(*args)
    assert man2["splits"] == man["splits"]
    for s in shards[2:]:
        assert os.path.getmtime(out / s["file"]) == mt[s["file"]]  # untouched
    assert os.path.getmtime(out / shards[1]["file"]) != mt[shards[1]["file"]]
    assert sha256_file(str(out / shards[1]["file"])) == shards[1]["sha256"]


def test_refuses_different_dataset(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    make_imagefolder(a, per_class=2)
    make_imagefolder(b, classes=("x", "y"), per_class=2)
    convert("--src", str(a), "--layout", "imagefolder", "--out", str(out), "--workers", "1")
    with pytest.raises(ConvertError, match="different dataset"):
        convert("--src", str(b), "--layout", "imagefolder", "--out", str(out), "--workers", "1")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert("--src", str(a), "--layout", "imagefolder", "--out", str(other), "--workers", "1")
    from data.convert import main
    assert main(["--src", str(b), "--layout", "imagefolder", "--out", str(out), "--quiet"]) == 2


def test_demo_generator(tmp_path):
    from data.demo import make_demo
    t = time.time()
    man = make_demo(str(tmp_path / "demo"), classes=4, per_class=20, size=32, seed=0, workers=1, quiet=True)
    assert time.time() - t < 30
    assert man["splits"]["train"]["num_samples"] == 72 and man["splits"]["val"]["num_samples"] == 8
    assert man["num_classes"] == 4


def test_synset_tars_truncated_source(tmp_path):
    src = tmp_path / "src"
    make_synset_tars(src, ["n01440764", "n01443537"], per=4, size=48)
    p = src / "n01443537.tar"
    with tarfile.open(p) as tf:
        ms = list(tf)
    with open(p, "r+b") as f:
        f.truncate(ms[2].offset_data + ms[2].size // 2)  # third member cut in the middle
    # a cut source tar is refused before anything is written, unless --allow-partial
    with pytest.raises(ConvertError, match="1 of the 2 source tar.*damaged or cut short.*--allow-partial"):
        convert("--src", str(src), "--layout", "synset-tars", "--labels", "in1k", "--out", str(tmp_path / "o"),
                "--workers", "1")
    assert not (tmp_path / "o").exists()
    man = convert("--src", str(src), "--layout", "synset-tars", "--labels", "in1k", "--out", str(tmp_path / "o"),
                  "--workers", "1", "--allow-partial")
    assert man["splits"]["train"]["num_samples"] == 6
    assert [s["file"] for s in man["skipped"]] == ["n01443537.tar/n01443537_2.JPEG"]
    [dmg] = man["damaged_sources"]
    assert (dmg["tar"], dmg["members_read"], dmg["members_lost"], dmg["cut_short"]) == ("n01443537.tar", 2, 1, True)
    assert dmg["lost_names"] == ["n01443537_2.JPEG"]


def test_class_without_readable_image_is_listed(tmp_path):
    """A class whose every image fails to decode still converts (the others are fine) but is named in the
    manifest and the log, not left as a label no sample carries without a word."""
    src, out = tmp_path / "src", tmp_path / "out"
    make_imagefolder(src, classes=("cat", "eel"), per_class=2)
    (src / "dog").mkdir()
    (src / "dog" / "d0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    man = convert("--src", str(src), "--layout", "imagefolder", "--out", str(out), "--workers", "1")
    assert man["num_classes"] == 3 and man["splits"]["train"]["num_samples"] == 4
    assert man["classes_without_samples"] == ["dog"]
    assert [s["file"] for s in man["skipped"]] == [os.path.join("dog", "d0.jpg")]
    assert man["damaged_sources"] == []
