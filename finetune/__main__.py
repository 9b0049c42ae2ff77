"""``python -m finetune --config finetune/configs/X.yaml init=<checkpoint> [section.key=value ...] [--print-config]``

``init=`` is short for ``finetune.init=``: a run directory, a DeepSpeed checkpoint or tag folder, an fp32 /
safetensors file or a released checkpoint (see :mod:`pretrain.weights`). The trainer (``pretrain.trainer.train``)
builds the model for the recipe, calls :func:`pretrain.surgery.load_init_weights` when the run starts fresh
(never when it resumes its own checkpoints) and trains. Under several processes start it like pretraining:
``torchrun --standalone --nproc_per_node=N -m finetune ...`` (or the Slurm / submitit launchers).
"""
from __future__ import annotations

from pretrain.config import ConfigError, load_config

ALIASES = {"init": "finetune.init"}


def build_config(recipe, overrides):
    """The resolved finetune config; refuses a run without ``init`` or with an unreadable checkpoint."""
    cfg = load_config(recipe, overrides, aliases=ALIASES)
    if not cfg.finetune.init:
        raise ConfigError("finetune needs a checkpoint: add init=<run dir | checkpoint dir | weights file> "
                          "(or finetune.init=...)")
    from pretrain.weights import SourceError, resolve_source
    try:
        resolve_source(cfg.finetune.init)
    except SourceError as e:
        raise ConfigError(f"config key 'finetune.init': {e}") from None
    return cfg


def main(argv=None) -> int:
    from pretrain.__main__ import run_cli

    return run_cli(argv, build_config, __doc__)


if __name__ == "__main__":
    from launch.distributed import exit_process

    exit_process(main())
