"""``python -m pretrain.evaluate``: top-1/top-5 of a checkpoint or weights file on eval shards.

    python -m pretrain.evaluate --ckpt runs/vil_base_in21k --data /shards/in1k_val --label-map 21k-to-1k
    python -m pretrain.evaluate --model vil_small_rpb_224 --weights vil_small.pth --data /shards/in1k_val

Runs single-process or under torchrun/srun (each sample counted once across ranks). ``--ckpt`` takes a
run directory (model name and input size from its config.yaml) or any checkpoint :mod:`pretrain.weights`
reads; ``--label-map 21k-to-1k`` evaluates a 21K-class model on 1K data through the synset map.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="run directory or checkpoint")
    src.add_argument("--weights", help="weights file (.safetensors/.pt/.pth, official releases too)")
    p.add_argument("--model", help="registered model name (required with --weights)")
    p.add_argument("--data", required=True, help="eval shards: brace pattern, directory or manifest[#split]")
    p.add_argument("--label-map", default="", choices=["", "21k-to-1k"])
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pipeline", default="dali", choices=["dali", "torch"])
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a checkpoint")
    p.add_argument("--model-labels", default=None,
                   help="label space of the model's head for --label-map (a builtin name such as in22k-ms, or a "
                        "synset file); default: the run's training-data manifest")
    p.add_argument("overrides", nargs="*", help="extra section.key=value config overrides")
    args = p.parse_args(argv)

    from launch.distributed import init_distributed
    from models.family import family_of
    from pretrain.config import ConfigError, load_config
    from pretrain.engine import (build_model, classifier_module, config_from_checkpoint, eval_class_index, evaluate,
                                 local_device, model_data_cfg)
    from pretrain.rundir import RunDir
    from pretrain.weights import load_state_dict

    import dataclasses

    import data as data_pkg

    overrides = [f"data.eval={args.data}", f"data.pipeline={args.pipeline}", f"train.micro_batch={args.batch}",
                 "train.max_steps=1", f"eval.label_map={args.label_map}", *args.overrides]
    try:
        run = RunDir(args.ckpt) if args.ckpt else None
        if run is not None and run.config_file.is_file():
            base = config_from_checkpoint(Path(args.ckpt)).to_dict()
            overrides = [f"model.name={base['model']['name']}", f"model.num_classes={base['model']['num_classes']}"
                         if base["model"]["num_classes"] else "model.num_classes=null",
                         f"model.img_size={base['model']['img_size']}" if base["model"]["img_size"] else
                         "model.img_size=null", *overrides]
        elif not args.model:
            p.error("--model is required unless --ckpt is a run directory")
        if args.model:
            overrides.insert(0, f"model.name={args.model}")
        if args.img_size:
            overrides.append(f"model.img_size={args.img_size}")
        cfg = load_config(None, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    env = init_distributed(cfg.launch.backend)
    device = local_device()
    pcfg = model_data_cfg(cfg)
    loader = data_pkg.build_loader("eval", dataclasses.replace(cfg.data, crop_pct=pcfg["crop_pct"]), cfg.aug,
                                   img_size=pcfg["img_size"], micro_batch=cfg.train.micro_batch, rank=env.rank,
                                   world_size=env.world_size, seed=cfg.seed, device=device,
                                   model_mean_std=(pcfg["mean"], pcfg["std"]))
    state = load_state_dict(args.ckpt or args.weights, ema=args.ema)
    head = state.get(f"{classifier_module(cfg.model.name)}.weight")
    num_classes = cfg.model.num_classes or (head.shape[0] if head is not None else loader.num_classes)
    model = build_model(cfg, num_classes).to(device)
    fam = family_of(model)
    if fam is not None:
        state = fam.filter_fn(state, model)
    model.load_state_dict(state, strict=True)
    train_space = None
    if args.label_map:
        train_space = args.model_labels
        if train_space is None and run is not None and run.config_file.is_file():
            from data.shards import resolve

            train_space = resolve(config_from_checkpoint(Path(args.ckpt)).data.train, "train").label_space
        if train_space is None:
            p.error("--label-map needs --model-labels (the label space of the model's head)")
    class_index = eval_class_index(cfg, train_space, loader.label_space)
    res = evaluate(model, loader, device, torch.float32, class_index)
    if env.rank == 0:
        print(json.dumps({"model": cfg.model.name, "source": args.ckpt or args.weights, **res}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
