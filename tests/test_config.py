"""Typed config: recipes, overrides, and refusal of bad input with one message naming the key."""
from pathlib import Path

import pytest

from pretrain.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "pretrain" / "configs").glob("*.yaml")) + sorted((ROOT / "finetune" / "configs").glob("*.yaml"))


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_need_a_length():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config()


def test_overrides_are_typed(tmp_path):
    cfg = load_config(overrides=["train.max_steps=10", "optim.lr=3e-4", "deepspeed.zero_stage=3",
                                 "precision=fp32", "seed=7", "model.img_size=384", "model.grad_ckpt=true",
                                 "data.train=/d/train-{000000..000003}.tar", "optim.betas=[0.9,0.95]"])
    assert cfg.train.max_steps == 10 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.deepspeed.zero_stage == 3
    assert cfg.precision == "fp32" and cfg.seed == 7 and cfg.model.img_size == 384
    assert cfg.model.grad_ckpt is True and cfg.optim.betas == [0.9, 0.95]
    assert cfg.data.train == "/d/train-{000000..000003}.tar"


@pytest.mark.parametrize("override, key", [
    ("train.max_step=10", "train.max_step"),                # unknown key
    ("nosuch.key=1", "nosuch"),                             # unknown section
    ("train.micro_batch=abc", "train.micro_batch"),         # wrong type
    ("train.micro_batch=1.5", "train.micro_batch"),         # not an integer
    ("optim.lr=-1", "optim.lr"),                            # impossible value
    ("precision=fp16", "precision"),                        # refused choice (fp16 not supported on CPU/ours)
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("model.img_size=200", "model.img_size"),               # not a multiple of the stride
    ("train.global_batch=102", "train.global_batch"),       # not a multiple of micro_batch*accum
    ("model.grad_ckpt=maybe", "model.grad_ckpt"),
    ("train.micro_batch", "train.micro_batch"),             # not key=value
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.max_steps=5", "train.micro_batch=4", override])
    assert key in str(e.value)


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(overrides=["train.max_steps=5", "deepspeed.offload=param", "deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match="warmup"):
        load_config(overrides=["train.max_steps=5", "sched.warmup_steps=5", "sched.warmup_epochs=1"])
    with pytest.raises(ConfigError, match="finetune.init"):
        load_config(overrides=["train.max_steps=5", "finetune.head=map21k"])


def test_recipe_inheritance_and_override_order(tmp_path):
    write(tmp_path, "train: {max_steps: 100, micro_batch: 8}\noptim: {lr: 0.1}\n", "base.yaml")
    child = write(tmp_path, "base: base.yaml\noptim: {weight_decay: 0.0}\n", "child.yaml")
    cfg = load_config(child, ["optim.lr=0.5"])
    assert cfg.train.max_steps == 100 and cfg.train.micro_batch == 8
    assert cfg.optim.lr == 0.5 and cfg.optim.weight_decay == 0.0


def test_bad_recipes(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown config key 'train.bogus'"):
        load_config(write(tmp_path, "train: {max_steps: 1, bogus: 2}\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match="loops"):
        load_config(write(tmp_path, "base: r.yaml\n"))


def test_roundtrip_through_dict():
    cfg = load_config(overrides=["train.max_steps=3", "model.kwargs={global_tokens: [1,1,0,0]}"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again, Config)


def test_aliases():
    cfg = load_config(overrides=["train.max_steps=3", "init=/x/ckpt"], aliases={"init": "finetune.init"})
    assert cfg.finetune.init == "/x/ckpt"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_shipped_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.train.max_steps > 0 or cfg.train.epochs > 0
