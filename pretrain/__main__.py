"""``python -m pretrain --config pretrain/configs/X.yaml [section.key=value ...] [--print-config]``."""
from __future__ import annotations

import argparse
import sys

from pretrain.config import ConfigError, load_config


def parse_args(argv=None, description=__doc__):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML recipe")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (also seed=N, precision=...)")
    return p.parse_args(argv)


def run_cli(argv=None, build_config=load_config, description=__doc__) -> int:
    """Shared by ``python -m pretrain`` and ``python -m finetune``: config -> (print | train) -> exit code."""
    from launch.signals import STOP

    STOP.install()  # first thing: a Slurm signal during start-up must not kill the job
    args = parse_args(argv, description)
    try:
        cfg = build_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from pretrain.trainer import train

    return train(cfg)


def main(argv=None) -> int:
    return run_cli(argv)


if __name__ == "__main__":
    from launch.distributed import exit_process

    exit_process(main())
