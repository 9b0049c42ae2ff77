"""What did step k see? Runs the real training input pipeline and writes the sample keys it produced.

    python -m data.order --data SPEC --world-size W --micro-batch B [--grad-accum A] --epochs E \\
        [--pipeline dali|torch] [--seed S] [--start-epoch 0] [--img-size 32] [--workers 2] --out FILE.jsonl

One JSON line per (epoch, step, rank, micro_step), in that order, with ``keys``: the ``__key__``
strings of the samples in batch order, as they came out of the pipeline with the pixels (not
recomputed from the permutation). ``step`` is the optimizer step within the epoch. The ranks are run
one after another in this process (the order depends only on seed, epoch, world size, micro-batch and
grad-accum, never on timing). Keys do not depend on the image size, so ``--img-size`` defaults to a
small one; use the run's ``seed`` and ``data.train``.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from typing import Dict, Iterator, List

from .shards import DatasetNotFoundError


def iter_order(data: str, world_size: int, micro_batch: int, grad_accum: int = 1, epochs: int = 1,
               pipeline: str = "dali", seed: int = 0, start_epoch: int = 0, img_size: int = 32,
               workers: int = 2, train_crop: str = "rrc") -> Iterator[Dict]:
    """Records ``{epoch, step, rank, micro_step, keys}`` rank by rank (sort them for the file order)."""
    from .loader import build_loader
    dc = types.SimpleNamespace(train=data, eval=None, pipeline=pipeline, workers=workers, crop_pct=0.875,
                               eval_crop="center", train_crop=train_crop, interpolation="bilinear")
    ac = types.SimpleNamespace(randaug="", reprob=0.0, hflip=0.5)
    for rank in range(world_size):
        L = build_loader("train", dc, ac, img_size=img_size, micro_batch=micro_batch, rank=rank,
                         world_size=world_size, seed=seed, grad_accum=grad_accum)
        for e in range(start_epoch, start_epoch + epochs):
            L.set_epoch(e)
            for j, (_, _, keys) in enumerate(L.iter_keyed()):
                yield {"epoch": e, "step": j // grad_accum, "rank": rank, "micro_step": j % grad_accum,
                       "keys": list(keys)}
        del L


def collect_order(*args, **kwargs) -> List[Dict]:
    """:func:`iter_order` sorted by (epoch, step, rank, micro_step)."""
    recs = list(iter_order(*args, **kwargs))
    recs.sort(key=lambda r: (r["epoch"], r["step"], r["rank"], r["micro_step"]))
    return recs


def global_batches(records: List[Dict]) -> Dict[tuple, List[str]]:
    """(epoch, step) -> the keys of that global batch in position order (micro-step major, then rank:
    position ``k*G + (m*W + r)*B``), whatever the world size."""
    out: Dict[tuple, List[tuple]] = {}
    for r in records:
        out.setdefault((r["epoch"], r["step"]), []).append(((r["micro_step"], r["rank"]), r["keys"]))
    return {k: [key for _, keys in sorted(v) for key in keys] for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.order", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data.train spec: brace pattern, dir with manifest.json, manifest")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--start-epoch", type=int, default=0)
    p.add_argument("--pipeline", choices=["dali", "torch"], default="dali")
    p.add_argument("--seed", type=int, default=0, help="the run's seed")
    p.add_argument("--img-size", type=int, default=32, help="decode size (keys do not depend on it)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True, help="output .jsonl")
    a = p.parse_args(argv)
    try:
        recs = collect_order(a.data, a.world_size, a.micro_batch, a.grad_accum, a.epochs, a.pipeline, a.seed,
                             a.start_epoch, a.img_size, a.workers)
    except DatasetNotFoundError as e:
        print(f"error: --data: {e}", file=sys.stderr)
        return 2
    with open(a.out, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    n = sum(len(r["keys"]) for r in recs)
    print(f"{len(recs)} micro-batches, {n} samples, epochs {a.start_epoch}..{a.start_epoch + a.epochs - 1}, "
          f"G={a.micro_batch * a.grad_accum * a.world_size} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
