"""The benchmark script runs (figures are printed, not asserted)."""
from models import bench


def test_bench_model_runs(capsys):
    bench.main(["--model", "vil_tiny_rpb_224", "--size", "64", "--batch", "1", "--reps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "forward" in out and "fwd+bwd" in out and "img/s" in out and "MACs" in out


def test_bench_vil_attention_runs(capsys):
    bench.main(["--vil-attention", "--tokens", "14", "--batch", "1", "--reps", "1"])
    out = capsys.readouterr().out
    assert "chunk" in out and "release-style" in out and "dense" in out and "peak mem" in out
