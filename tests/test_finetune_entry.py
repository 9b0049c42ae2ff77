"""python -m finetune: recipes validate, init= alias, the engine hook load_init_weights."""
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.__main__ import build_config, main
from pretrain.surgery import SurgeryError, load_init_weights
from finetune_testlib import DS_KWARGS, DS_MODEL, make_ds_runs, tiny

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "finetune" / "configs").glob("*.yaml"))


@pytest.fixture
def weights(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(p))
    return p


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"vil_base_in1k_384", "vil_medium_in1k_384", "vil_base_in1k_384_adamw", "restv2_base_in1k_384",
            "msg_transformer_base_in1k_384", "scalable_vit_base_in1k_384", "ms_mlp_base_in1k_384",
            "demo_finetune"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(recipe, weights):
    import timm
    import models  # noqa: F401
    cfg = build_config(recipe, [f"init={weights}"])
    assert cfg.finetune.init == str(weights)
    assert timm.is_model(cfg.model.name), cfg.model.name
    if recipe.stem.startswith("vil_") and "adamw" not in recipe.stem:  # the release's recipe
        o = cfg.optim
        assert (o.name, o.lr, o.momentum, o.nu, o.weight_decay) == ("qhm", 0.01, 0.9, 1.0, 0.0)
        assert cfg.train.epochs == 10 and cfg.sched.warmup_epochs == 0.25
        assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.randaug, cfg.aug.label_smoothing) == (0, 0, "", 0.1)
        assert (cfg.data.train_crop, cfg.data.crop_pct) == ("resize_crop", 0.922)
        assert int(384 / cfg.data.crop_pct) == 416
    if recipe.stem.startswith("restv2"):
        assert (cfg.optim.lr, cfg.optim.lr_scaling_base, cfg.optim.weight_decay, cfg.train.epochs) == \
            (1.5e-5, 256, 1e-8, 30)
        assert cfg.sched.warmup_steps == 0 and cfg.data.eval_crop == "squash"


def test_cli_print_config_and_errors(weights, capsys, monkeypatch):
    recipe = str(ROOT / "finetune" / "configs" / "demo_finetune.yaml")
    assert main(["--config", recipe, f"init={weights}", "finetune.head=reinit", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"init: {weights}" in out and "head: reinit" in out
    assert main(["--config", recipe, "init="]) == 2  # the demo recipe names runs/demo; clear it
    assert "needs a checkpoint" in capsys.readouterr().err
    assert main(["--config", recipe, "init=/does/not/exist"]) == 2
    # the entry hands the resolved config to the trainer
    seen = {}
    fake = types.ModuleType("pretrain.trainer")
    fake.train = lambda cfg: seen.setdefault("cfg", cfg) and 0
    monkeypatch.setitem(sys.modules, "pretrain.trainer", fake)
    assert main(["--config", recipe, f"init={weights}"]) == 0
    assert seen["cfg"].finetune.init == str(weights) and seen["cfg"].model.img_size == 128


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    return make_ds_runs(tmp_path_factory) / "run_s1"


def test_load_init_weights_from_a_zero_run(ds_run):
    """The engine's hook: a ZeRO-1 bf16 run at 64 px -> the same model at 96 px (full-attention tables
    resized), head kept; then a new 5-class label space with head=reinit."""
    cfg = build_config(ROOT / "finetune" / "configs" / "demo_finetune.yaml", [f"init={ds_run}"])
    model = tiny(DS_MODEL, **{**DS_KWARGS, "img_size": 96})
    rep = load_init_weights(model, cfg, label_space=None)
    assert rep["strict"] and rep["source_kind"] == "run" and rep["source_model"] == DS_MODEL
    assert rep["resized"] and all("stages.2" in k or "stages.3" in k for k in rep["resized"])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)

    cfg5 = build_config(ROOT / "finetune" / "configs" / "demo_finetune.yaml", [f"init={ds_run}"])
    m5 = tiny(DS_MODEL, **{**DS_KWARGS, "num_classes": 5})
    with pytest.raises(SurgeryError, match="head=reinit"):
        load_init_weights(m5, cfg5)
    cfg5.finetune.head = "reinit"
    head_before = m5.head.weight.detach().clone()
    assert load_init_weights(m5, cfg5)["head"] == "reinit"
    assert torch.equal(m5.head.weight, head_before)


def test_keep_refuses_a_different_label_space(ds_run, tmp_path):
    from pretrain.surgery import adapt_state_dict
    from pretrain.weights import load_state_dict
    sd = load_state_dict(ds_run)
    model = tiny(DS_MODEL, **DS_KWARGS)
    a = [f"n{i:08d}" for i in range(10)]
    adapt_state_dict(sd, model, src_label_space=a, dst_label_space=list(a))  # same space: fine
    with pytest.raises(SurgeryError, match="label space differs"):
        adapt_state_dict(sd, model, src_label_space=a, dst_label_space=a[::-1])
