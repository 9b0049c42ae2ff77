"""Input pipelines: DALI (default) and torch/PIL/timm (fallback), one entry point.

``build_loader(split, data_cfg, aug_cfg, *, img_size, micro_batch, rank, world_size, seed, device,
model_mean_std=None, grad_accum=1)`` -> :class:`TrainLoader` or :class:`EvalLoader`.

Sample table (both pipelines)
  The shards are validated once (tar headers, JPEG SOI/EOI markers, .cls present; cached per user in
  ``$HVP_DATA_CACHE``, else ``$XDG_CACHE_HOME/hvp``, else ``~/.cache/hvp``, written atomically) and their
  good samples, shards in order, form one global table of N samples; each entry is (shard, offset,
  size) of the .jpg and .cls bytes and the ``__key__``. ``loader.sample_table_hash()`` is a 64-bit
  hash of that table: ranks all-reduce it to check that they read the same data.

Training order (both pipelines; ``data/sampler.py``)
  Epoch ``e`` reads the table in a permutation drawn from ``(seed, e)`` -- a full reshuffle every epoch.
  Global batch ``k`` is positions ``[k*G, (k+1)*G)``, ``G = micro_batch * grad_accum * world_size``;
  micro-step ``m`` of rank ``r`` takes positions ``k*G + (m*W + r)*B`` .. ``+B``; the last partial global
  batch is dropped. Every rank yields exactly ``(N // G) * grad_accum`` micro-batches per epoch.
  Crop window, flip and random erasing of a sample are drawn from ``(seed, e, sample index)``, so a
  sample gets the same crop in either pipeline and on any world size. The DALI path reads the bytes
  of each sample from the table itself (``fn.external_source``) and DALI decodes them (fused
  decode + crop with ``fn.decoders.image_slice``, ``mixed`` on GPU), resizes, flips, runs RandAugment
  and normalises. Sample keys travel through both pipelines with the pixels (:meth:`TrainLoader.iter_keyed`,
  ``python -m data.order``).
  Eval: rank ``r`` of ``W`` reads the contiguous range ``[N*r//W, N*(r+1)//W)`` in table order; every
  sample exactly once across ranks, batches padded with label -1 so every rank has
  ``ceil(ceil(N / W) / micro_batch)`` steps.

Exact resume
  The position is "global samples consumed in epoch e" (``state_dict()['samples']``). torch path:
  everything random is a function of (seed, epoch, sample index), so resuming = starting at that
  position. DALI path: RandAugment draws inside DALI from a pipeline seeded by (seed, epoch, rank);
  its state is DALI's own pipeline checkpoint (``enable_checkpointing=True``, ``pipe.checkpoint()``),
  restored with ``Pipeline(checkpoint=...)`` on the same world size. On another world size (same
  ``G``) the position carries over and only the RandAugment stream is new.

Corrupt data at read time
  A shard file that is missing or cannot be read or indexed is an error naming it, unless
  ``allow_missing_shards`` (constructor argument, else ``data_cfg.allow_missing_shards``) is true: then
  it is skipped, counted in ``loader.skipped`` and logged (on every rank: each builds its own table).
  Truncated tars, samples missing .jpg/.cls, and JPEGs whose marker structure
  is broken (no SOI/EOI, bad segment chain before SOS -- what makes decoders throw) are dropped when
  the shard is indexed (``data.verify_samples``: 'markers' default, 'decode' = full PIL decode once,
  'none' = trust the index), counted in ``loader.skipped`` and logged with ``logging``. Corruption
  inside the entropy-coded data passes that check: DALI decodes it to garbage pixels with a libjpeg
  warning; the torch path skips the image (its slot is refilled with another sample of the same
  batch, re-augmented) and counts it. Should DALI still fail on an image, the error says so and
  names the data (use ``verify_samples=decode`` or ``pipeline=torch``).

DALI RandAugment vs timm
  Same op family (identity, auto-contrast, equalize, rotate, solarize, color, posterize, contrast,
  brightness, sharpness, shear x/y, translate x/y), ``n`` ops per image and the same magnitude scale
  (``m`` out of 10: ``num_magnitude_bins=11``, translate up to 0.45 x size). Differences: DALI has no
  magnitude noise (``mstd``), applies the ops with probability 1 (timm: 0.5 each), has no
  ``SolarizeAdd``/``Invert`` ops, fills with 128 rather than timm's mean colour, and its
  interpolation / random streams differ, so images are not bit-identical. DALI flips after
  RandAugment (fused into the normalisation), the torch path before it: the flip and RandAugment's
  random signs make the two orders equally likely outcomes.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import sampler
from .shards import DatasetNotFoundError, ValidatedShards, resolve, validate_shards

log = logging.getLogger("data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _get(cfg, name, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _seed32(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def _verify_level(v):
    if v in (False, None, "none", "index", "false", 0):
        return False
    return "decode" if v == "decode" else "markers"


def parse_randaug(spec: str) -> Optional[Dict[str, Any]]:
    """timm style 'rand-m9-n2-mstd0.5-inc1' -> dict(m=9, n=2, mstd=0.5, inc=1)."""
    if not spec:
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"aug.randaug={spec!r}: only timm 'rand-...' RandAugment strings are supported")
    out = {"m": 9, "n": 2, "mstd": 0.0, "inc": 0}
    for p in parts[1:]:
        m = re.match(r"([a-z]+)([\d.]+)", p)
        if not m:
            continue
        k, v = m.groups()
        if k in out:
            out[k] = float(v) if k == "mstd" else int(float(v))
    return out


class _SampleTable:
    """Random access to the validated samples by global index: raw bytes, label, key. Shared by the
    torch dataset and the DALI external source (picklable: file handles are opened lazily)."""

    def __init__(self, shards: List[str], samples, offsets):
        self.shards, self.samples, self.offsets = shards, samples, offsets
        self._fh: Dict[int, Any] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fh"] = {}
        return d

    def locate(self, g: int) -> Tuple[int, tuple]:
        s = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return s, self.samples[s][g - self.offsets[s]]

    def key(self, g: int) -> str:
        return self.locate(g)[1][4]

    def read(self, g: int) -> Tuple[bytes, int, str]:
        s, (jo, js, co, cs, key) = self.locate(g)
        fh = self._fh.get(s)
        if fh is None:
            fh = self._fh[s] = open(self.shards[s], "rb")
        jpg = os.pread(fh.fileno(), js, jo)
        if len(jpg) != js:
            raise OSError(f"{self.shards[s]}:{key}: short read ({len(jpg)} of {js} bytes)")
        cls = int(os.pread(fh.fileno(), cs, co).decode("ascii").strip())
        return jpg, cls, key

    def close(self):
        for fh in self._fh.values():
            fh.close()
        self._fh = {}

    def __len__(self):
        return int(self.offsets[-1])


# ----------------------------------------------------------------------------------------------
# common base
# ----------------------------------------------------------------------------------------------
class _LoaderBase:
    is_train: bool = False

    def __init__(self, split, data_cfg, aug_cfg, *, img_size, micro_batch, rank=0, world_size=1, seed=0,
                 device="cpu", model_mean_std=None, grad_accum=1, allow_missing_shards=None):
        self.split = split
        self.data_cfg, self.aug_cfg = data_cfg, aug_cfg
        self.img_size = int(img_size if not isinstance(img_size, (tuple, list)) else img_size[-1])
        self.micro_batch = int(micro_batch)
        self.grad_accum = int(grad_accum)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError(f"micro_batch={micro_batch} and grad_accum={grad_accum} must be >= 1")
        self.seed = int(seed)
        self.device = torch.device(device)
        mean, std = model_mean_std if model_mean_std is not None else (IMAGENET_MEAN, IMAGENET_STD)
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        self.pipeline = str(_get(data_cfg, "pipeline", "dali")).lower()
        self.workers = int(_get(data_cfg, "workers", 2) or 0)
        self.crop_pct = float(_get(data_cfg, "crop_pct", 0.875) or 0.875)
        self.eval_crop = str(_get(data_cfg, "eval_crop", "center"))
        self.train_crop = str(_get(data_cfg, "train_crop", "rrc"))
        self.interpolation = str(_get(data_cfg, "interpolation", "bicubic"))
        self.randaug = str(_get(aug_cfg, "randaug", "") or "")
        self.reprob = float(_get(aug_cfg, "reprob", 0.0) or 0.0)
        self.hflip = float(_get(aug_cfg, "hflip", 0.5) if _get(aug_cfg, "hflip", None) is not None else 0.5)
        spec = _get(data_cfg, "train" if self.is_train else "eval")
        if not spec:
            raise DatasetNotFoundError(f"data.{'train' if self.is_train else 'eval'} is not set")
        self.source = str(spec)
        ss = resolve(self.source, "train" if self.is_train else "val")
        self.shardset = ss
        if allow_missing_shards is None:
            allow_missing_shards = _get(data_cfg, "allow_missing_shards", False)
        if isinstance(allow_missing_shards, str):
            allow_missing_shards = allow_missing_shards.lower() in ("1", "true", "yes")
        self.vs: ValidatedShards = validate_shards(ss, deep=_verify_level(_get(data_cfg, "verify_samples", "markers")),
                                                   allow_missing=bool(allow_missing_shards))
        self.skipped = self.vs.skipped
        self._read_skipped = 0
        ls = ss.label_space or {}
        self.label_space = {"name": ls.get("name", "unknown"), "synsets": ls.get("synsets")}
        self.num_classes = int(ls.get("num_classes") or (len(ls["synsets"]) if ls.get("synsets") else 0)) or None
        self.num_samples = self.vs.num_samples
        # global sample table: shard s holds global indices [offsets[s], offsets[s+1])
        self._offsets = np.cumsum([0] + self.vs.counts)
        self.table = _SampleTable(self.vs.shards, self.vs.samples, self._offsets)
        if self.num_samples < self.world_size:
            raise ValueError(f"{self.source}: {self.num_samples} samples cannot be split over {self.world_size} ranks")
        self.epoch = 0
        self._consumed = 0
        if self.skipped:
            log.warning("data: %s: %d sample(s) skipped at indexing (see warnings above)", self.source, self.skipped)

    def sample_table_hash(self) -> int:
        """Signed 64-bit hash of the validated sample table (all-reduce min/max across ranks: equal = same data)."""
        return self.vs.table_hash()

    def _init_pipeline(self) -> None:
        """Build the configured pipeline once a subclass has set its per-rank sizes."""
        if self.pipeline == "dali":
            self._dali_init()
        elif self.pipeline == "torch":
            self._torch_init()
        else:
            raise ValueError(f"data.pipeline={self.pipeline!r}: use 'dali' or 'torch'")

    def _range(self, shard_id: int) -> Tuple[int, int]:
        n, w = self.num_samples, self.world_size
        return n * shard_id // w, n * (shard_id + 1) // w

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self._consumed = 0
            self._restore = None
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    # state ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "batches": self._consumed, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "num_samples": self.num_samples, "pipeline": self.pipeline,
                "skipped": self.skipped}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.epoch = int(sd["epoch"])
        self._consumed = int(sd["batches"])
        self.skipped = int(sd.get("skipped", self.skipped))

    def _count_read_skips(self, n: int, what: str) -> None:
        if n:
            self.skipped += n
            log.warning("data: skipped %d undecodable sample(s) in %s (total skipped %d)", n, what, self.skipped)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True) if x.device != self.device else x


# ----------------------------------------------------------------------------------------------
# torch / PIL / timm pipeline
# ----------------------------------------------------------------------------------------------
def _pil_interp(name: str):
    from PIL import Image
    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[name]


def _random_erase_(x: torch.Tensor, prob: float, gen: torch.Generator) -> None:
    """timm RandomErasing(mode='pixel', max_count=1) on one normalised CHW image, drawing from ``gen``
    (timm's draws from the global RNG; here the generator is per sample: (seed, epoch, index))."""
    if prob <= 0:
        return
    c, h, w = x.shape
    area = h * w
    if torch.rand((), generator=gen).item() > prob:
        return
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(0.02, 1 / 3, generator=gen))
        ar = math.exp(float(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3), generator=gen)))
        eh, ew = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if eh < h and ew < w:
            top = int(torch.randint(0, h - eh + 1, (), generator=gen))
            left = int(torch.randint(0, w - ew + 1, (), generator=gen))
            noise = torch.empty((c, eh, ew)).normal_(generator=gen)
            x[:, top:top + eh, left:left + ew] = noise.to(x.device, x.dtype)
            break


def build_torch_transform(is_train: bool, img_size: int, crop_pct: float, train_crop: str, eval_crop: str,
                          interpolation: str, randaug: str, reprob: float, hflip: float, mean, std, seed: int = 0):
    """Eval: timm/torchvision transforms with the semantics of the DALI pipeline. Train: a
    :class:`_TorchTrainAug` whose crop, flip and erasing come from (seed, epoch, sample index)."""
    from torchvision import transforms as T
    if is_train:
        return _TorchTrainAug(img_size, crop_pct, train_crop, interpolation, randaug, reprob, hflip, mean, std, seed)
    scale = int(math.floor(img_size / crop_pct))
    if eval_crop == "squash":
        return T.Compose([T.Resize((img_size, img_size), interpolation=T.InterpolationMode(interpolation)),
                          T.ToTensor(), T.Normalize(mean, std)])
    return T.Compose([T.Resize(scale, interpolation=T.InterpolationMode(interpolation)), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(mean, std)])


class _TransformError(RuntimeError):
    pass


class _TorchTrainAug:
    """PIL image -> augmented normalised CHW tensor for sample ``index`` of ``epoch``: the crop
    window / crop position and the flip from ``data.sampler`` (the DALI path feeds the same numbers
    to DALI), timm's RandAugment seeded per sample, random erasing with a per-sample generator."""

    def __init__(self, img_size, crop_pct, train_crop, interpolation, randaug, reprob, hflip, mean, std, seed):
        from timm.data.auto_augment import rand_augment_transform
        from torchvision import transforms as T
        self.size, self.train_crop, self.seed = img_size, train_crop, seed
        self.scale = int(math.floor(img_size / crop_pct))
        self.interp = _pil_interp(interpolation)
        self.reprob, self.hflip = reprob, hflip
        self.ra = rand_augment_transform(randaug, dict(translate_const=int(img_size * 0.45),
                                                       img_mean=tuple(min(255, round(255 * x)) for x in mean),
                                                       interpolation=self.interp)) if randaug else None
        self.post = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def geometry(self, im, epoch: int, index: int, seed: int):
        from PIL import Image
        S = self.size
        if self.train_crop == "rrc":
            x, y, w, h = sampler.rrc_window(seed, epoch, index, *im.size)
            im = im.resize((S, S), self.interp, box=(x, y, x + w, y + h))
        else:  # resize_crop (finetune): shorter side -> img/crop_pct, then a random SxS crop
            W, H = im.size
            W2, H2 = (self.scale, int(self.scale * H / W)) if W <= H else (int(self.scale * W / H), self.scale)
            im = im.resize((W2, H2), self.interp)
            px, py = sampler.crop_position(seed, epoch, index)
            x0, y0 = int(round(px * (W2 - S))), int(round(py * (H2 - S)))
            im = im.crop((x0, y0, x0 + S, y0 + S))
        if sampler.flip(seed, epoch, index, self.hflip):
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return im

    def __call__(self, im, epoch: int, index: int, salt: int = 0) -> torch.Tensor:
        import random
        seed = self.seed + 1_000_003 * salt  # salt != 0: a refill of a corrupt sample's slot
        im = self.geometry(im, epoch, index, seed)
        if self.ra is not None:
            # timm's RandAugment draws from the global `random` (magnitudes) and `np.random` (op choice)
            st = random.getstate(), np.random.get_state()
            try:
                for attempt in range(4):
                    s = sampler.sample_seed32(seed, epoch, index) + attempt
                    random.seed(s)
                    np.random.seed(s)
                    try:
                        out = self.ra(im)
                        break
                    except ValueError as e:  # e.g. timm posterize(bits=0) with recent Pillow: redraw
                        if attempt == 3:
                            raise _TransformError(str(e)) from e
            finally:
                random.setstate(st[0])
                np.random.set_state(st[1])
            im = out
        x = self.post(im)
        if self.reprob > 0:
            _random_erase_(x, self.reprob, sampler.erase_generator(seed, epoch, index))
        return x


class _TarSamples(torch.utils.data.Dataset):
    """Batches of samples by (global index, epoch or None for eval, is_pad)."""

    def __init__(self, table: _SampleTable, transform, img_size: int, is_train: bool):
        self.table, self.transform, self.img_size, self.is_train = table, transform, img_size, is_train

    def load(self, g: int, epoch, salt: int = 0):
        from PIL import Image
        jpg, cls, key = self.table.read(g)
        with Image.open(io.BytesIO(jpg)) as im:
            im = im.convert("RGB")
        x = self.transform(im, epoch, g, salt) if self.is_train else self.transform(im)
        return x, cls, key

    def __getitem__(self, item):
        xs, ys, keys, bad = [], [], [], 0
        todo = list(item)
        for j, (g, epoch, pad) in enumerate(todo):
            try:
                x, y, k = self.load(g, epoch)
            except _TransformError:
                raise
            except Exception as e:  # noqa: BLE001
                log.warning("data: undecodable sample %d (%s)", g, e)
                bad += 1
                x, y, k = None, None, self.table.key(g)
            xs.append(x)
            ys.append(-1 if pad else y)
            keys.append(k)
        good = [j for j, x in enumerate(xs) if x is not None]
        for j, x in enumerate(xs):
            if x is None:
                if not good:
                    xs[j] = torch.zeros(3, self.img_size, self.img_size)
                    ys[j] = -1
                else:  # refill with another sample of the batch, freshly augmented
                    k = good[j % len(good)]
                    g, epoch, pad = todo[k]
                    xs[j], y, keys[j] = self.load(g, epoch, salt=1)
                    ys[j] = -1 if pad else y
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), bad, keys

    def __len__(self):
        return len(self.table)


def _worker_init(_):
    torch.set_num_threads(1)


class _TorchMixin:
    def _torch_init(self):
        self._ds = _TarSamples(self.table,
                               build_torch_transform(self.is_train, self.img_size, self.crop_pct, self.train_crop,
                                                     self.eval_crop, self.interpolation, self.randaug, self.reprob,
                                                     self.hflip, self.mean, self.std, self.seed),
                               self.img_size, self.is_train)

    def _torch_batches(self, batches: List[List[Tuple[int, Any, bool]]]):
        if not batches:
            return
        if self.workers > 0:
            it = _MappedDL(self._ds, batches, self.workers)
        else:
            it = (self._ds[b] for b in batches)
        for x, y, bad, keys in it:
            self._count_read_skips(bad, self.source)
            yield self._to_device(x), self._to_device(y), keys


class _MappedDL:
    """DataLoader over batch descriptors (map-style, in order)."""

    def __init__(self, ds, batches, workers):
        self.dl = torch.utils.data.DataLoader(_BatchDS(ds, batches), batch_size=None, shuffle=False,
                                              num_workers=min(workers, len(batches)), worker_init_fn=_worker_init,
                                              prefetch_factor=2,
                                              # own generator: do not draw from the global torch RNG (the
                                              # engine's stream must not depend on loader restarts)
                                              generator=torch.Generator().manual_seed(0))

    def __iter__(self):
        return iter(self.dl)


class _BatchDS(torch.utils.data.Dataset):
    def __init__(self, ds, batches):
        self.ds, self.batches = ds, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.ds[self.batches[i]]


# ----------------------------------------------------------------------------------------------
# DALI pipeline
# ----------------------------------------------------------------------------------------------
def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def _jpeg_size(jpg: bytes) -> Tuple[int, int]:
    """(width, height) from the JPEG header (PIL parses the header only; no decode)."""
    from PIL import Image
    with Image.open(io.BytesIO(jpg)) as im:
        return im.size


class _IndexedSource:
    """``fn.external_source`` callback of the training pipeline: micro-batch ``j`` of this rank's epoch
    as (jpeg bytes, label, key bytes, sample index, crop anchor, crop shape, flip) for
    ``train_crop=rrc``, (..., sample index, crop position x, crop position y, flip) for ``resize_crop``.

    DALI calls it with ``BatchInfo.iteration`` (restored from a pipeline checkpoint, so a restored
    pipeline continues where it stopped; ``base`` shifts a fresh pipeline to a resume position).
    The bytes of the next batches are read ahead by a small thread pool: random access into the
    shards is then off the critical path (the reads are functions of the index only: deterministic)."""

    def __init__(self, loader: "TrainLoader", epoch: int, base: int, read_ahead: int = 2):
        self.table = _SampleTable(loader.table.shards, loader.table.samples, loader.table.offsets)
        self.idx = loader.order.rank_indices(epoch, loader.rank)
        self.epoch, self.base, self.seed = epoch, base, loader.seed
        self.rrc, self.hflip = loader.train_crop == "rrc", loader.hflip
        self.read_ahead = read_ahead
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(4, read_ahead)), thread_name_prefix="hvp-read")
        self.pending: Dict[int, Any] = {}

    def _batch(self, j: int):
        jpgs, labels, keys, index, geo0, geo1, flips = [], [], [], [], [], [], []
        e, s = self.epoch, self.seed
        for g in self.idx[j]:
            g = int(g)
            jpg, cls, key = self.table.read(g)
            jpgs.append(np.frombuffer(jpg, np.uint8))
            labels.append(np.array([cls], np.int64))
            keys.append(np.frombuffer(key.encode(), np.uint8))
            index.append(np.array([g], np.int64))
            if self.rrc:
                x, y, w, h = sampler.rrc_window(s, e, g, *_jpeg_size(jpg))
                geo0.append(np.array([x, y], np.int32))
                geo1.append(np.array([w, h], np.int32))
            else:
                px, py = sampler.crop_position(s, e, g)
                geo0.append(np.array(px, np.float32))
                geo1.append(np.array(py, np.float32))
            flips.append(np.array(int(sampler.flip(s, e, g, self.hflip)), np.int32))
        return jpgs, labels, keys, index, geo0, geo1, flips

    def __call__(self, info):
        j = self.base + int(info.iteration)
        if j >= len(self.idx):
            raise StopIteration
        for a in range(j, min(len(self.idx), j + 1 + self.read_ahead)):
            if a not in self.pending:
                self.pending[a] = self.pool.submit(self._batch, a)
        for a in [a for a in self.pending if a < j]:
            del self.pending[a]
        return self.pending.pop(j).result()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending = {}
        self.table.close()


def _silent_dali_build(pipe_fn, kw):
    # DALI's own auto_aug still calls fn.experimental.* ops and forces their deprecation warning
    # on (simplefilter("default")): silence it for the build only.
    import nvidia.dali.ops as dali_ops
    orig = getattr(dali_ops, "_handle_op_deprecation", None)
    if orig is not None:
        dali_ops._handle_op_deprecation = lambda *a, **k: None
    try:
        p = pipe_fn(**kw)
        p.build()
    finally:
        if orig is not None:
            dali_ops._handle_op_deprecation = orig
    return p


class _DaliMixin:
    def _dali_init(self):
        if not _dali_available():
            raise ImportError("data.pipeline=dali but NVIDIA DALI is not installed (pip install '.[dali]'), "
                              "or set data.pipeline=torch")
        self._gpu = self.device.type == "cuda" and torch.cuda.is_available()
        self._pipe = None
        self._pipe_epoch = None
        self._source = None

    def _dali_kw(self, pipe_seed: int) -> dict:
        return dict(batch_size=self.micro_batch, num_threads=max(1, self.workers or 1),
                    device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device())
                    if self._gpu else None, seed=pipe_seed, prefetch_queue_depth=2, exec_dynamic=True)

    def _build_train_pipe(self, source: _IndexedSource, pipe_seed: int, checkpoint=None):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        gpu = self._gpu
        dec_dev = "mixed" if gpu else "cpu"
        op_dev = "gpu" if gpu else "cpu"
        interp = types.INTERP_CUBIC if self.interpolation == "bicubic" else types.INTERP_LINEAR
        img = self.img_size
        ra = parse_randaug(self.randaug)
        mean = [255 * m for m in self.mean]
        std = [255 * s for s in self.std]
        scale = int(math.floor(img / self.crop_pct))

        @pipeline_def(enable_conditionals=ra is not None)
        def pipe():
            geo_t = types.INT32 if self.train_crop == "rrc" else types.FLOAT
            jpg, label, key, index, geo0, geo1, flips = fn.external_source(
                source=source, num_outputs=7, batch=True, batch_info=True,
                dtype=[types.UINT8, types.INT64, types.UINT8, types.INT64, geo_t, geo_t, types.INT32])
            if self.train_crop == "rrc":
                # fused decode + crop: only the window's part of the JPEG is decoded
                images = fn.decoders.image_slice(jpg, geo0, geo1, axis_names="WH", device=dec_dev,
                                                 output_type=types.RGB, adjust_orientation=False)
                images = fn.resize(images, device=op_dev, resize_x=img, resize_y=img, interp_type=interp,
                                   antialias=True)
            else:  # resize_crop (finetune)
                images = fn.decoders.image(jpg, device=dec_dev, output_type=types.RGB, adjust_orientation=False)
                images = fn.resize(images, device=op_dev, resize_shorter=scale, interp_type=interp, antialias=True)
                images = fn.crop(images, device=op_dev, crop=(img, img), crop_pos_x=geo0, crop_pos_y=geo1)
            if ra is not None:
                from nvidia.dali.auto_aug import rand_augment
                images = rand_augment.rand_augment(images, n=ra["n"], m=min(ra["m"], 10), num_magnitude_bins=11,
                                                   shape=(img, img), max_translate_rel=0.45,
                                                   monotonic_mag=bool(ra["inc"]))
            images = fn.crop_mirror_normalize(images, device=op_dev, dtype=types.FLOAT, output_layout="CHW",
                                              mean=mean, std=std, mirror=flips)
            return images, label, key, index

        kw = dict(self._dali_kw(pipe_seed), enable_checkpointing=True)
        if checkpoint is not None:
            kw["checkpoint"] = checkpoint
        return _silent_dali_build(pipe, kw)

    def _build_eval_pipe(self, shard_id: int, pipe_seed: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        gpu = self._gpu
        dec_dev = "mixed" if gpu else "cpu"
        op_dev = "gpu" if gpu else "cpu"
        interp = types.INTERP_CUBIC if self.interpolation == "bicubic" else types.INTERP_LINEAR
        img = self.img_size
        mean = [255 * m for m in self.mean]
        std = [255 * s for s in self.std]
        scale = int(math.floor(img / self.crop_pct))
        n_range = self._range(shard_id)[1] - self._range(shard_id)[0]

        @pipeline_def
        def pipe():
            jpg, cls = fn.readers.webdataset(
                paths=self.vs.shards, index_paths=self.vs.index_paths, ext=["jpg", "cls"],
                shard_id=shard_id, num_shards=self.world_size, random_shuffle=False,
                initial_fill=max(1, min(1024, n_range)), pad_last_batch=True,
                stick_to_shard=True, name="reader", dtypes=[types.UINT8, types.UINT8])
            images = fn.decoders.image(jpg, device=dec_dev, output_type=types.RGB)
            if self.eval_crop == "squash":
                images = fn.resize(images, device=op_dev, resize_x=img, resize_y=img, interp_type=interp,
                                   antialias=True)
            else:
                images = fn.resize(images, device=op_dev, resize_shorter=scale, interp_type=interp, antialias=True)
                images = fn.crop(images, device=op_dev, crop=(img, img))
            images = fn.crop_mirror_normalize(images, device=op_dev, dtype=types.FLOAT, output_layout="CHW",
                                              mean=mean, std=std)
            return images, fn.pad(cls, fill_value=32)

        return _silent_dali_build(pipe, self._dali_kw(pipe_seed))

    def _dali_images(self, imgs) -> torch.Tensor:
        if self._gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray
            t = imgs.as_tensor()
            x = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device))
            return x
        return torch.from_numpy(np.array(imgs.as_tensor()))

    def _dali_run(self, pipe):
        try:
            return pipe.run()
        except RuntimeError as e:
            raise RuntimeError(f"DALI failed reading {self.source}: {e}\n(an image that passed the index checks "
                               "could not be decoded; set data.verify_samples=decode to drop such samples "
                               "when indexing, or data.pipeline=torch, which skips them)") from e

    def _dali_train_outputs(self, pipe):
        imgs, label, key, index = self._dali_run(pipe)
        labels = torch.from_numpy(np.array(label.as_tensor()).reshape(-1).astype(np.int64))
        keys = [bytes(np.array(t)).decode() for t in key]
        idx = np.array(index.as_tensor()).reshape(-1)
        return self._dali_images(imgs), labels, keys, idx

    def _dali_eval_outputs(self, pipe):
        imgs, cls = self._dali_run(pipe)
        c = np.array(cls.as_tensor())
        labels = torch.from_numpy(np.array([int(bytes(r).decode("ascii").strip() or -1) for r in c], np.int64))
        return self._dali_images(imgs), labels


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
_ORDER_VERSION = "global-v1"  # state_dict()['order']: the definition in data/sampler.py


class TrainLoader(_LoaderBase, _TorchMixin, _DaliMixin):
    """One epoch per ``iter()``; exactly ``len(self)`` micro-batches on every rank, in the global order
    of ``data/sampler.py`` (:attr:`order`)."""
    is_train = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.order = sampler.GlobalOrder(self.num_samples, self.micro_batch, self.world_size, self.grad_accum,
                                         self.seed)
        self.steps_per_epoch = self.order.micro_steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.source}: {self.num_samples} samples give no full global batch of "
                             f"micro_batch*grad_accum*world_size = {self.order.global_batch}; lower "
                             f"train.micro_batch or use more data")
        self.samples_per_rank = self.steps_per_epoch * self.micro_batch
        self.samples_per_epoch = self.order.samples_per_epoch
        self._restore = None
        self._init_pipeline()

    # state ---------------------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd.update(order=_ORDER_VERSION, samples=self.order.consumed(self._consumed), micro_batch=self.micro_batch,
                  grad_accum=self.grad_accum, global_batch=self.order.global_batch)
        if self.pipeline == "dali":
            if self._pipe is not None and self._pipe_epoch == self.epoch and self._consumed > 0:
                sd["dali_checkpoint"] = self._pipe.checkpoint()
            elif self._restore is not None:
                sd["dali_checkpoint"] = self._restore
        return sd

    def load_state_dict(self, sd):
        """Resume at "global samples consumed in epoch e". Same world size and micro-batch: exact
        (with DALI's checkpoint). Another world size / micro-batch: the same position when it is a
        micro-step boundary (same ``G``: the same global batches follow); else the epoch restarts."""
        self._close_dali()
        self._restore = None
        self.skipped = int(sd.get("skipped", self.skipped))
        self.epoch = int(sd["epoch"])
        if int(sd.get("num_samples", self.num_samples)) != self.num_samples:
            log.warning("data: loader state for %s samples applied to %s: restarting epoch %d",
                        sd.get("num_samples"), self.num_samples, self.epoch)
            self._consumed = 0
            return
        if sd.get("order") != _ORDER_VERSION:
            # written before the global order: per-rank ranges, and a DALI checkpoint of another graph
            log.warning("data: loader state from an older sample order: continuing at micro-batch %s of epoch %d "
                        "in the global order", sd["batches"], self.epoch)
            self._consumed = min(int(sd["batches"]), self.steps_per_epoch)
            return
        same = (int(sd.get("world_size", self.world_size)) == self.world_size
                and int(sd.get("micro_batch", self.micro_batch)) == self.micro_batch)
        if same:
            self._consumed = int(sd["batches"])
            self._restore = sd.get("dali_checkpoint") if self._consumed > 0 else None
            return
        pos = int(sd.get("samples", int(sd["batches"]) * int(sd.get("micro_batch", self.micro_batch))
                         * int(sd.get("world_size", self.world_size))))
        try:
            self._consumed = self.order.micro_batches_at(pos)
        except ValueError as e:
            log.warning("data: %s; restarting epoch %d", e, self.epoch)
            self._consumed = 0
            return
        if int(sd.get("global_batch", self.order.global_batch)) != self.order.global_batch:
            log.warning("data: global batch changed from %s to %d: the following global batches differ from "
                        "the original run's", sd.get("global_batch"), self.order.global_batch)
        if self.pipeline == "dali" and self.randaug:
            log.warning("data: resuming on another world size: DALI's RandAugment stream restarts (sample order, "
                        "crops and flips continue exactly)")

    # iteration -----------------------------------------------------------------------------------
    def __iter__(self):
        for x, y, _ in self.iter_keyed():
            yield x, y

    def iter_keyed(self):
        """Like ``iter(self)`` but yields ``(images, labels, keys)``: the samples' ``__key__`` strings,
        carried through the pipeline with the pixels."""
        if self._consumed >= self.steps_per_epoch:
            self.epoch += 1
            self._consumed = 0
            self._restore = None
        epoch, start = self.epoch, self._consumed
        gen_fn = self._iter_dali if self.pipeline == "dali" else self._iter_torch
        for x, y, keys in gen_fn(epoch, start):
            self._consumed += 1
            yield x, y, keys
        # epoch finished: next iter() starts the next epoch
        self._close_dali()

    def _iter_torch(self, epoch, start):
        idx = self.order.rank_indices(epoch, self.rank)
        batches = [[(int(g), epoch, False) for g in idx[k]] for k in range(start, self.steps_per_epoch)]
        yield from self._torch_batches(batches)

    def _close_dali(self):
        if getattr(self, "_source", None) is not None:
            self._source.close()
            self._source = None
        self._pipe = None

    def _iter_dali(self, epoch, start):
        ckpt = self._restore if start > 0 else None
        if not (start > 0 and ckpt is None and self._pipe is not None and self._pipe_epoch == epoch):
            # a fresh pipeline (or one restored from a checkpoint; otherwise the previous iterator of
            # this epoch was abandoned and its live pipeline continues)
            self._close_dali()
            if start > 0 and ckpt is None:
                log.warning("data: no DALI checkpoint in the loader state: resuming at micro-batch %d of epoch %d "
                            "with a fresh RandAugment stream", start, epoch)
            self._source = _IndexedSource(self, epoch, base=0 if ckpt is not None else start,
                                          read_ahead=max(2, self.workers))
            self._pipe = self._build_train_pipe(self._source, _seed32(self.seed, epoch, self.rank, "dali"),
                                                checkpoint=ckpt)
            self._pipe_epoch = epoch
            self._restore = None
        for _ in range(start, self.steps_per_epoch):
            x, y, keys, idx = self._dali_train_outputs(self._pipe)
            if self.reprob > 0:
                for i, g in enumerate(idx):
                    _random_erase_(x[i], self.reprob, sampler.erase_generator(self.seed, epoch, int(g)))
            yield self._to_device(x), self._to_device(y), keys


class EvalLoader(_LoaderBase, _TorchMixin, _DaliMixin):
    """Each sample exactly once across ranks; padded entries carry label -1."""
    is_train = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        B = self.micro_batch
        self.samples_per_rank = self._range(self.rank)[1] - self._range(self.rank)[0]
        max_rank = max(self._range(r)[1] - self._range(r)[0] for r in range(self.world_size))
        self.steps_per_epoch = -(-max_rank // B)
        self.samples_per_epoch = self.num_samples
        self._init_pipeline()

    def __iter__(self):
        a, b = self._range(self.rank)
        B = self.micro_batch
        n_real = -(-(b - a) // B)
        self._consumed = 0
        if self.pipeline == "torch":
            batches = []
            for k in range(n_real):
                idx = list(range(a + k * B, min(b, a + (k + 1) * B)))
                pad = B - len(idx)
                batches.append([(g, None, False) for g in idx] + [(idx[-1], None, True)] * pad)
            it = ((x, y) for x, y, _ in self._torch_batches(batches))
        else:
            it = self._iter_dali_eval(n_real, b - a)
        for x, y in it:
            self._consumed += 1
            yield x, y
        for _ in range(self.steps_per_epoch - n_real):
            self._consumed += 1
            yield (torch.zeros(B, 3, self.img_size, self.img_size, device=self.device),
                   torch.full((B,), -1, dtype=torch.int64, device=self.device))

    def _iter_dali_eval(self, n_real, n):
        pipe = self._build_eval_pipe(self.rank, _seed32(self.seed, "eval"))
        B = self.micro_batch
        for k in range(n_real):
            x, y = self._dali_eval_outputs(pipe)
            valid = n - k * B
            if valid < B:
                y[valid:] = -1
            yield self._to_device(x), self._to_device(y)
        del pipe


def build_loader(split: str, data_cfg, aug_cfg=None, *, img_size, micro_batch, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device="cpu", model_mean_std=None, grad_accum: int = 1,
                 allow_missing_shards: Optional[bool] = None):
    """``split``: 'train' (TrainLoader, augmentation, reshuffled per epoch) or 'eval'/'val'/'test'
    (EvalLoader). ``data_cfg``/``aug_cfg``: any objects (dataclass, namespace, dict) with the fields
    documented in the module doc. ``model_mean_std``: ``(mean, std)`` in 0..1 units (default ImageNet).
    ``grad_accum``: micro-batches per optimizer step; with it the epoch holds whole global batches
    ``G = micro_batch * grad_accum * world_size`` (default 1: whole ``micro_batch * world_size``).
    ``allow_missing_shards``: skip (count, log) unreadable shard files instead of failing; None = take
    ``data_cfg.allow_missing_shards`` (default false)."""
    kw = dict(img_size=img_size, micro_batch=micro_batch, rank=rank, world_size=world_size, seed=seed,
              device=device, model_mean_std=model_mean_std, grad_accum=grad_accum,
              allow_missing_shards=allow_missing_shards)
    if split == "train":
        return TrainLoader(split, data_cfg, aug_cfg, **kw)
    if split in ("eval", "val", "validation", "test"):
        return EvalLoader(split, data_cfg, aug_cfg, **kw)
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
