"""data.convert --layout synset-tars on real source tars that are damaged on purpose: corrupt headers
mid-archive, tars cut short, unreadable tars. Each must be reported with the number of members that
could not be read; the conversion stops (exit 2, nothing written) unless --allow-partial."""
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from data.convert import ConvertError, scan_source_tar
from test_data_utils import ROOT, convert, make_synset_tars, read_shards

SYN = ["n01440764", "n01443537", "n01484850"]


def _members(path):
    with tarfile.open(path) as tf:
        return list(tf)


def _overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _garbage(n, seed=0):
    return np.random.default_rng(seed).bytes(n)


def _one_tar(tmp_path, per=6):
    make_synset_tars(tmp_path, SYN[:1], per=per, size=40)
    p = tmp_path / f"{SYN[0]}.tar"
    return p, _members(p), p.read_bytes()


def test_plain_tarfile_stops_silently_at_a_corrupt_header(tmp_path):
    """Why data.convert reads tars with its own damage scan: plain tarfile ends the member list at a corrupt
    header mid-archive without any error, as if the tar ended there."""
    p, ms, _ = _one_tar(tmp_path)
    _overwrite(p, ms[2].offset, _garbage(512))
    with tarfile.open(p) as tf:
        assert [m.name for m in tf] == [ms[0].name, ms[1].name]  # no exception, 4 members gone
    got, rep = scan_source_tar(str(p))
    assert [m.name for m in got] == [m.name for m in ms if m is not ms[2]]  # read past the damage
    assert (rep["members_read"], rep["members_lost"], rep["cut_short"]) == (5, 1, False)
    assert f"unreadable header at byte {ms[2].offset}, next valid header at byte {ms[3].offset}" in rep["problems"][0]


def _cut(at):
    return lambda p, ms, raw: p.write_bytes(raw[:at(ms)])


def _write(members, fill, rel=0):
    """Overwrite, at each member's header (+ rel bytes), with fill(ms, i)."""
    def apply(p, ms, raw):
        for i in members:
            _overwrite(p, ms[i].offset + rel, fill(ms, i))
    return apply


_GARBAGE = lambda ms, i: _garbage(512, i)  # noqa: E731

# damage -> (members_read, members_lost, cut_short, lost member names that can be known)
CASES = {
    "garbage header mid-archive": (_write([2], _GARBAGE), 5, 1, False, []),
    "two garbage headers in a row": (_write([2, 3], _GARBAGE), 4, 2, False, []),
    # checksum field (bytes 148..155) broken, ustar magic and name intact: the name is recovered
    "bad checksum": (_write([2], lambda ms, i: b"777777", rel=148), 5, 1, False, ["n01440764_2.JPEG"]),
    "member zero-filled": (_write([2], lambda ms, i: bytes(ms[3].offset - ms[2].offset)), 5, 1, False, []),
    "garbage last header": (_write([5], _GARBAGE), 5, 1, False, []),
    "garbage first header": (_write([0], _GARBAGE), 5, 1, False, []),
    "cut inside member data": (_cut(lambda ms: ms[3].offset_data + 100), 3, 1, True, ["n01440764_3.JPEG"]),
    "cut inside a header": (_cut(lambda ms: ms[3].offset + 200), 3, 1, True, []),
    "cut at a member boundary": (_cut(lambda ms: ms[3].offset), 3, 0, True, []),
    "empty file": (_cut(lambda ms: 0), 0, 0, True, []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scan_counts_what_was_lost(tmp_path, case):
    damage, read, lost, cut, names = CASES[case]
    p, ms, raw = _one_tar(tmp_path)
    damage(p, ms, raw)
    got, rep = scan_source_tar(str(p))
    assert rep is not None and rep["problems"], case
    assert (rep["members_read"], rep["members_lost"], rep["cut_short"], rep["lost_names"]) == (read, lost, cut, names)
    assert len(got) - (1 if case == "cut inside member data" else 0) == read


@pytest.mark.parametrize("case", ["intact", "data after the end marker", "cut inside the end marker"])
def test_scan_intact_tars(tmp_path, case):
    p, ms, raw = _one_tar(tmp_path)
    end = ms[-1].offset_data + -(-ms[-1].size // 512) * 512  # first block after the last member
    if case == "data after the end marker":  # not part of the archive (tar stops at two zero blocks too)
        p.write_bytes(raw + _garbage(600))
    elif case == "cut inside the end marker":  # nothing lost
        p.write_bytes(raw[:end + 300])
    got, rep = scan_source_tar(str(p))
    assert rep is None and [m.name for m in got] == [m.name for m in ms]


def _damaged_source(tmp_path):
    """Three synset tars of 4 images: intact, a header overwritten mid-archive, cut short mid-member."""
    src = tmp_path / "src"
    make_synset_tars(src, SYN, per=4, size=40)
    ms1 = _members(src / f"{SYN[1]}.tar")
    _overwrite(src / f"{SYN[1]}.tar", ms1[1].offset, _garbage(512))
    ms2 = _members(src / f"{SYN[2]}.tar")
    with open(src / f"{SYN[2]}.tar", "r+b") as f:
        f.truncate(ms2[2].offset_data + 50)
    return src, ms1, ms2


def test_damaged_tars_refused_by_the_cli(tmp_path):
    src, ms1, ms2 = _damaged_source(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "data.convert", "--src", str(src), "--layout", "synset-tars",
                        "--labels", "in1k", "--out", str(out), "--workers", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    # one line per damaged tar, then the error
    assert len(lines) == 3, r.stderr
    assert lines[0].startswith(f"ERROR data.convert: {SYN[1]}.tar: unreadable header at byte {ms1[1].offset}")
    assert lines[0].endswith("-> 1 member(s) unreadable, 3 read")
    assert lines[1].startswith(f"ERROR data.convert: {SYN[2]}.tar: cut short at byte {ms2[2].offset_data + 50} "
                               f"inside member {SYN[2]}_2.JPEG -> 1 member(s) unreadable")
    assert lines[2] == ("error: 2 of the 3 source tar(s) are damaged or cut short: 2 member(s) unreadable; nothing "
                        "written. Rerun with --allow-partial to convert the readable members (manifest.json then "
                        "lists what was lost)")
    assert not out.exists()


def test_allow_partial_converts_the_readable_members(tmp_path):
    src, ms1, ms2 = _damaged_source(tmp_path)
    out = tmp_path / "out"
    man = convert("--src", str(src), "--layout", "synset-tars", "--labels", "in1k", "--out", str(out),
                  "--workers", "1", "--allow-partial")
    _, samples = read_shards(out)
    names = sorted(k.split("_", 1)[1] for k, *_ in samples)
    # the members after the corrupt header are recovered (plain tarfile would have stopped before them)
    assert names == sorted([f"{SYN[0]}_{i}" for i in range(4)] + [f"{SYN[1]}_{i}" for i in (0, 2, 3)]
                           + [f"{SYN[2]}_{i}" for i in (0, 1)])
    assert man["splits"]["train"]["num_samples"] == 9
    dm = {d["tar"]: d for d in man["damaged_sources"]}
    assert sorted(dm) == [f"{SYN[1]}.tar", f"{SYN[2]}.tar"]
    assert (dm[f"{SYN[1]}.tar"]["members_read"], dm[f"{SYN[1]}.tar"]["members_lost"]) == (3, 1)
    assert (dm[f"{SYN[2]}.tar"]["members_read"], dm[f"{SYN[2]}.tar"]["members_lost"]) == (2, 1)
    assert dm[f"{SYN[2]}.tar"]["cut_short"] and dm[f"{SYN[2]}.tar"]["lost_names"] == [f"{SYN[2]}_2.JPEG"]
    assert [s["file"] for s in man["skipped"]] == [f"{SYN[2]}.tar/{SYN[2]}_2.JPEG"]  # the cut member itself
    assert man["classes_without_samples"] == []


def test_unreadable_tar(tmp_path):
    src = tmp_path / "src"
    make_synset_tars(src, SYN[:2], per=3)
    (src / f"{SYN[2]}.tar").mkdir()  # cannot be read at all
    (src / "n01491361.tar").write_bytes(_garbage(3000))  # not a tar
    args = ["--src", str(src), "--layout", "synset-tars", "--labels", "in1k", "--out", str(tmp_path / "o"),
            "--workers", "1"]
    with pytest.raises(ConvertError, match=r"2 of the 4 source tar\(s\).*: 1 \(and an unknown number\) member"):
        convert(*args)
    assert not (tmp_path / "o").exists()
    man = convert(*args, "--allow-partial")
    dm = {d["tar"]: d for d in man["damaged_sources"]}
    assert dm[f"{SYN[2]}.tar"]["members_lost"] is None and "cannot be read" in dm[f"{SYN[2]}.tar"]["problems"][0]
    assert (dm["n01491361.tar"]["members_read"], dm["n01491361.tar"]["members_lost"]) == (0, 1)
    assert man["splits"]["train"]["num_samples"] == 6
    assert man["classes_without_samples"] == sorted([SYN[2], "n01491361"])


def test_nothing_readable_or_no_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{SYN[0]}.tar").write_bytes(b"")
    with pytest.raises(ConvertError, match="no tar has a readable image member; nothing written"):
        convert("--src", str(src), "--layout", "synset-tars", "--labels", "in1k", "--out", str(tmp_path / "o"),
                "--allow-partial")
    assert not (tmp_path / "o").exists()
    # an intact tar without a single image member is refused (a class no sample would carry)
    with tarfile.open(src / f"{SYN[0]}.tar", "w") as tf:
        tf.add(__file__, arcname="readme.txt")
    with pytest.raises(ConvertError, match=rf"1 of the 1 tar\(s\) hold no image member .*: {SYN[0]}.tar"):
        convert("--src", str(src), "--layout", "synset-tars", "--labels", "in1k", "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
