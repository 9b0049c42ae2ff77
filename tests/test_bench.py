"""The benchmark script runs (figures are printed, not asserted)."""
import pytest

from models import bench


def test_bench_model_runs(capsys):
    bench.main(["--model", "vil_tiny_rpb_224", "--size", "64", "--batch", "1", "--reps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "forward" in out and "fwd+bwd" in out and "img/s" in out and "MACs" in out


def test_bench_vil_attention_runs(capsys):
    bench.main(["--vil-attention", "--tokens", "14", "--batch", "1", "--reps", "1"])
    out = capsys.readouterr().out
    assert "chunk" in out and "release-style" in out and "dense" in out and "peak mem" in out


def test_unusable_models_and_sizes_are_refused_before_measuring(capsys):
    """One line, exit 2, nothing timed: a size one family refuses (MSG-T's 3x3 first-stage windows at 64 px
    are fewer than its shuffle size 4) and a misspelt name."""
    with pytest.raises(SystemExit) as e:
        bench.main(["--suite", "--models", "vil_tiny_rpb_224", "msg_transformer_tiny_224", "--size", "64",
                    "--batch", "1", "--reps", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "suite on" not in out and len(err.strip().splitlines()) == 1, (out, err)
    assert "nothing measured: msg_transformer_tiny_224 at 64 px: the first stage has 3x3 windows" in err, err
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", "vil_tiny_rpb_22", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "unknown model 'vil_tiny_rpb_22' (close: vil_tiny_rpb_224" in err and not out, err
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", "vil_tiny_rpb_224", "--attn-impl", "nope", "--device", "cpu"])
    assert e.value.code == 2 and "vil_tiny_rpb_224: unknown ViL attn_impl 'nope'" in capsys.readouterr().err
