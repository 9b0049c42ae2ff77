"""``models.bench --compile`` and ``--suite`` run and report what they promise (figures are not asserted).

The default test uses the ``eager`` compile backend (Dynamo capture, no code generation) to stay cheap;
the slow ones run AOTAutograd and inductor, and the ViL flex comparison (it compiles the CPU kernel).
"""
import json

import pytest
import torch

from models import bench

_TINY = ["--size", "64", "--batch", "1", "--reps", "1", "--device", "cpu"]


def test_bench_suite_json(tmp_path, capsys):
    path = tmp_path / "suite.json"
    rows = bench.main(["--suite", "--models", "vil_tiny_rpb_224", *_TINY, "--backend", "eager", "--no-flex",
                       "--json", str(path)])
    out = capsys.readouterr().out
    assert "compiled/eager" in out and "CPU" in out and "flex" not in out
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(rows))
    (row,) = saved
    assert row["model"] == "vil_tiny_rpb_224" and row["eager_img_s"] > 0 and row["compiled_img_s"] > 0
    assert row["eager_peak_mib"] > 0 and row["compiled_over_eager"] > 0
    assert "ceiling" in out and 0.05 < row["eager_library_kernel_share"] <= 1
    assert row["compile_ceiling"] == pytest.approx(1 / row["eager_library_kernel_share"])


def test_library_kernel_share_counts_gemms_not_pointwise():
    """The ceiling's share: a step of GEMMs is nearly all library time, a pointwise step none of it."""
    a, b = torch.randn(384, 384), torch.randn(384, 384, requires_grad=True)
    cpu = torch.device("cpu")
    assert bench.library_kernel_share(lambda: (a @ b).sum().backward(), cpu) > 0.4
    assert bench.library_kernel_share(lambda: (a.exp() * 2 + 1).tanh().sum(), cpu) == 0


@pytest.mark.slow
def test_bench_suite_vil_flex(capsys):
    (row,) = bench.main(["--suite", "--models", "vil_tiny_rpb_224", *_TINY, "--backend", "aot_eager"])
    assert "flex/chunk" in capsys.readouterr().out
    assert row["flex_over_chunk"] > 0 and "forward" in row["flex_measure"] and row["flex_fwd_peak_mib"] > 0


@pytest.mark.slow
def test_bench_model_compile_side_by_side(capsys):
    bench.main(["--model", "restv2_tiny_224", *_TINY, "--compile", "--backend", "aot_eager"])
    out = capsys.readouterr().out
    assert out.count("compiled/eager speed") == 2 and "compiled  min" in out and "eager     min" in out


@pytest.mark.slow
def test_bench_suite_inductor_every_family(capsys):
    # 128 px, not _TINY's 64: MSG-T takes multiples of 32 with at least 4x4 first-stage windows for its shuffle
    # size 4 (32x32 tokens: 5x5 padded 7x7 windows); at 64 px it refuses the input (3x3 windows).
    args = [a if a != "64" else "128" for a in _TINY]
    rows = bench.main(["--suite", *args, "--no-flex", "--models", "vil_tiny_rpb_224", "msg_transformer_tiny_224",
                       "scalable_vit_small_224", "restv2_tiny_224", "ms_mlp_tiny_224"])
    assert len(rows) == 5 and all(r["compiled_img_s"] > 0 for r in rows)
