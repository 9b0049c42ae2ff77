"""One definition of "which sample goes where" for both input pipelines.

Order
  For epoch ``e`` the N good samples (the validated sample table, shards in order) are permuted by a
  permutation drawn from ``(seed, e)``. Global batch ``k`` is positions ``[k*G, (k+1)*G)`` of that
  permutation with ``G = micro_batch * grad_accum * world_size``; the last partial global batch is
  dropped. Inside a global batch, micro-step ``m`` of rank ``r`` takes positions
  ``k*G + (m*W + r)*B ... + B`` (micro-step major), so after ``j`` micro-steps on every rank exactly the
  positions ``[0, j*B*W)`` have been consumed: the training position is one number, "global samples
  consumed in epoch e", and the sequence of global batches does not depend on the world size for a
  given ``G``. A loader that is not told ``grad_accum`` (default 1) yields the same micro-batches in the
  same order; only the dropped tail differs (``N mod B*W`` instead of ``N mod G``).

Per-sample augmentation parameters
  Crop window, flip and random-erasing draws come from a generator seeded by
  ``(seed, e, sample index)`` alone, so a sample gets the same crop, flip and erasing in either
  pipeline, on any world size and after any resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

# Stream tags: independent generators for the order and for each kind of per-sample draw.
_ORDER, _CROP, _FLIP, _ERASE, _RANDAUG = 0x0D, 0xC7, 0xF1, 0xE7, 0x7A


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of ``range(n)`` from ``(seed, epoch)``."""
    return np.random.default_rng([_ORDER, int(seed), int(epoch)]).permutation(int(n))


def sample_rng(tag: int, seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator of one sample's draws of kind ``tag``, a function of (seed, epoch, sample index)."""
    return np.random.default_rng([int(tag), int(seed), int(epoch), int(index)])


def sample_seed32(seed: int, epoch: int, index: int, tag: int = _RANDAUG) -> int:
    """A 31-bit seed for libraries that draw from a global RNG (timm's RandAugment), per sample."""
    return int(sample_rng(tag, seed, epoch, index).integers(0, 2 ** 31 - 1))


def rrc_window(seed: int, epoch: int, index: int, width: int, height: int,
               scale: Tuple[float, float] = (0.08, 1.0),
               ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """Random-resized-crop window ``(x, y, w, h)`` in pixels of a ``width`` x ``height`` image.

    Same algorithm as torchvision's ``RandomResizedCrop.get_params`` (10 tries of area/log-ratio,
    then a centre crop clamped to ``ratio``); written here because that function draws from the
    global torch RNG and cannot take a per-sample generator, and DALI needs the window before it
    decodes (fused decode + crop)."""
    rng = sample_rng(_CROP, seed, epoch, index)
    area = width * height
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    u = rng.random((10, 4))
    for a_u, r_u, x_u, y_u in u:
        target = area * (scale[0] + (scale[1] - scale[0]) * a_u)
        ar = math.exp(lr[0] + (lr[1] - lr[0]) * r_u)
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            return int(x_u * (width - w + 1)), int(y_u * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_position(seed: int, epoch: int, index: int) -> Tuple[float, float]:
    """Relative (x, y) in [0, 1) of the random crop of ``train_crop=resize_crop`` (DALI's crop_pos)."""
    x, y = sample_rng(_CROP, seed, epoch, index).random(2)
    return float(x), float(y)


def flip(seed: int, epoch: int, index: int, prob: float) -> bool:
    return prob > 0 and bool(sample_rng(_FLIP, seed, epoch, index).random() < prob)


def erase_generator(seed: int, epoch: int, index: int):
    """torch generator for random erasing of one sample (applied in torch by both pipelines)."""
    import torch
    return torch.Generator().manual_seed(sample_seed32(seed, epoch, index, _ERASE))


@dataclass(frozen=True)
class GlobalOrder:
    """The global sample order of a training run (see the module docstring).

    ``num_samples`` N, ``micro_batch`` B, ``world_size`` W, ``grad_accum`` A, ``seed``."""
    num_samples: int
    micro_batch: int
    world_size: int = 1
    grad_accum: int = 1
    seed: int = 0

    def __post_init__(self):
        for k in ("num_samples", "micro_batch", "world_size", "grad_accum"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"GlobalOrder: {k}={getattr(self, k)} must be >= 1")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (global batches) per epoch; the partial last one is dropped."""
        return self.num_samples // self.global_batch

    @property
    def micro_steps_per_epoch(self) -> int:
        """Micro-batches per rank per epoch."""
        return self.steps_per_epoch * self.grad_accum

    @property
    def samples_per_epoch(self) -> int:
        return self.steps_per_epoch * self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.seed, epoch, self.num_samples)

    def micro_slice(self, rank: int, micro_index: int) -> Tuple[int, int]:
        """Positions ``[a, b)`` of the epoch permutation read by ``rank`` at its ``micro_index``-th
        micro-batch of the epoch (micro-step major within a global batch)."""
        a = (micro_index * self.world_size + rank) * self.micro_batch
        return a, a + self.micro_batch

    def rank_indices(self, epoch: int, rank: int, perm: Optional[np.ndarray] = None) -> np.ndarray:
        """Sample indices of ``rank``'s micro-batches of ``epoch``, shape (micro steps, B)."""
        perm = self.permutation(epoch) if perm is None else perm
        B, W, J = self.micro_batch, self.world_size, self.micro_steps_per_epoch
        used = perm[: J * B * W].reshape(J, W, B)
        return used[:, rank, :]

    def consumed(self, micro_batches: int) -> int:
        """Global samples consumed in the epoch once every rank has taken ``micro_batches``."""
        return int(micro_batches) * self.micro_batch * self.world_size

    def micro_batches_at(self, samples: int) -> int:
        """Inverse of :meth:`consumed`; refuses a position that is not a micro-step boundary."""
        per = self.micro_batch * self.world_size
        if samples % per:
            raise ValueError(f"position {samples} (global samples consumed) is not a multiple of "
                             f"micro_batch*world_size = {per}: cannot resume there")
        return samples // per
