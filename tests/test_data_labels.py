import pytest

from data.labels import LabelSpace, LabelSpaceError, UnknownSynsetError, load_label_space, map_21k_to_1k


def test_builtin_sizes():
    assert len(load_label_space("in1k")) == 1000
    assert len(load_label_space("in21k-fall11")) == 21841
    assert len(load_label_space("in21k-winter21")) == 10450
    ms = load_label_space("in22k-ms")
    assert ms.synsets[:1000] == load_label_space("in1k").synsets  # 1K-first order
    fall = load_label_space("in21k-fall11")
    assert fall.synsets == sorted(fall.synsets)
    assert load_label_space("in1k").synsets[0] == "n01440764"


def test_21k_to_1k_map():
    assert map_21k_to_1k("in22k-ms") == list(range(1000))
    # fall11 lacks the 1K synset n04399382 (teddy bear): an error naming it
    with pytest.raises(UnknownSynsetError, match="n04399382"):
        map_21k_to_1k("in21k-fall11")
    with pytest.raises(UnknownSynsetError, match="9 synset"):
        map_21k_to_1k("in21k-winter21")


def test_map_with_user_space(tmp_path):
    one = load_label_space("in1k").synsets
    p = tmp_path / "my21k.txt"
    p.write_text("\n".join(["n00000001"] + one[::-1]) + "\n")
    sp = load_label_space(str(p))
    idx = map_21k_to_1k(sp, "in1k")
    assert [sp.synsets[i] for i in idx] == one


def test_unknown_synsets_listed():
    sp = load_label_space("in1k")
    with pytest.raises(UnknownSynsetError) as e:
        sp.check(["n01440764", "n99999999", "bogus"])
    assert "n99999999" in str(e.value) and "bogus" in str(e.value) and "n01440764" not in str(e.value)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown label space"):
        load_label_space("no-such-space")
    with pytest.raises(ValueError, match="duplicate"):
        LabelSpace("x", ["a", "b", "a"])


def test_label_space_errors_say_what_to_do(tmp_path):
    with pytest.raises(LabelSpaceError, match=r"unknown label space 'in22k-m' \(did you mean 'in22k-ms'\?\): use one of"):
        load_label_space("in22k-m")
    with pytest.raises(LabelSpaceError, match=r"unknown label space 'zzz': use one of in1k, in21k-fall11"):
        load_label_space("zzz")  # nothing close: no suggestion
    with pytest.raises(LabelSpaceError, match="label space file 'lists/mine.txt' does not exist"):
        load_label_space("lists/mine.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(LabelSpaceError, match="holds no synsets"):
        load_label_space(str(empty))
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x80\x02\x8a\nlj\xfc\x9cF\xf9 j\xa8")
    with pytest.raises(LabelSpaceError, match="is not a text file"):
        load_label_space(str(binary))
    for e in (LabelSpaceError, UnknownSynsetError):
        assert issubclass(e, ValueError)
