"""Input pipelines: DALI (default) and torch/PIL/timm (fallback), one entry point.

``build_loader(split, data_cfg, aug_cfg, *, img_size, micro_batch, rank, world_size, seed, device,
model_mean_std=None)`` -> :class:`TrainLoader` or :class:`EvalLoader`.

Sample layout (both pipelines)
  The shards are validated once (tar headers, JPEG SOI/EOI markers, .cls present; cached in
  ``$HVP_DATA_CACHE`` or the temp dir) and their good samples form one global list of N samples.
  Rank ``r`` of ``W`` reads the range ``[N*s//W, N*(s+1)//W)`` with ``s = (r + epoch) % W`` for
  training (ranks rotate ranges between epochs) and ``s = r`` for evaluation -- the same split
  DALI's ``fn.readers.webdataset(shard_id, num_shards)`` uses, so it does not depend on the number
  of shard files (fewer shards than ranks x workers is fine).
  Train: every rank yields exactly ``(N // W) // micro_batch`` batches per epoch (drop-last).
  Eval: every sample exactly once across ranks; batches are padded with label -1 so every rank has
  ``ceil(ceil(N / W) / micro_batch)`` steps.

Randomness and exact resume
  torch path: the order is a permutation drawn from (seed, epoch, range) and every sample's
  augmentation is seeded from (seed, epoch, sample index); resuming = starting at batch k.
  DALI path: one pipeline per epoch seeded from (seed, epoch, rank); the state holds DALI's own
  pipeline checkpoint (``enable_checkpointing=True``, ``pipe.checkpoint()``), restored with
  ``Pipeline(checkpoint=...)``. Random erasing of the DALI path runs in torch on the output batch
  with a generator seeded from (seed, epoch, rank, step).

Corrupt data at read time
  Missing shard files, truncated tars, samples missing .jpg/.cls, and JPEGs whose marker structure
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
  interpolation / random streams differ, so images are not bit-identical.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

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


# ----------------------------------------------------------------------------------------------
# common base
# ----------------------------------------------------------------------------------------------
class _LoaderBase:
    is_train: bool = False

    def __init__(self, split, data_cfg, aug_cfg, *, img_size, micro_batch, rank=0, world_size=1, seed=0,
                 device="cpu", model_mean_std=None):
        self.split = split
        self.data_cfg, self.aug_cfg = data_cfg, aug_cfg
        self.img_size = int(img_size if not isinstance(img_size, (tuple, list)) else img_size[-1])
        self.micro_batch = int(micro_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
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
        self.vs: ValidatedShards = validate_shards(ss, deep=_verify_level(_get(data_cfg, "verify_samples", "markers")))
        self.skipped = self.vs.skipped
        self._read_skipped = 0
        ls = ss.label_space or {}
        self.label_space = {"name": ls.get("name", "unknown"), "synsets": ls.get("synsets")}
        self.num_classes = int(ls.get("num_classes") or (len(ls["synsets"]) if ls.get("synsets") else 0)) or None
        self.num_samples = self.vs.num_samples
        # global sample table: (shard idx, jpg_off, jpg_size, cls_off, cls_size)
        self._offsets = np.cumsum([0] + self.vs.counts)
        if self.num_samples < self.world_size:
            raise ValueError(f"{self.source}: {self.num_samples} samples cannot be split over {self.world_size} ranks")
        self.epoch = 0
        self._consumed = 0
        if self.skipped:
            log.warning("data: %s: %d sample(s) skipped at indexing (see warnings above)", self.source, self.skipped)

    # rank ranges ---------------------------------------------------------------------------------
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
        if int(sd.get("world_size", self.world_size)) != self.world_size or int(sd.get("num_samples", self.num_samples)) != self.num_samples:
            log.warning("data: loader state from world_size=%s/num_samples=%s applied to %s/%s: restarting the epoch",
                        sd.get("world_size"), sd.get("num_samples"), self.world_size, self.num_samples)
            self.epoch, self._consumed = int(sd["epoch"]), 0
            return
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


def build_torch_transform(is_train: bool, img_size: int, crop_pct: float, train_crop: str, eval_crop: str,
                          interpolation: str, randaug: str, reprob: float, hflip: float, mean, std):
    """timm transforms with the semantics of the DALI pipeline."""
    from timm.data import create_transform
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T
    if is_train and train_crop == "rrc":
        return create_transform(img_size, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=hflip,
                                vflip=0.0, color_jitter=None, auto_augment=randaug or None,
                                interpolation=interpolation, mean=mean, std=std, re_prob=reprob, re_mode="pixel",
                                re_count=1)
    scale = int(math.floor(img_size / crop_pct))
    if is_train:  # resize_crop (finetune): Resize(img/crop_pct) -> RandomCrop(img) -> flip
        t = [T.Resize(scale, interpolation=T.InterpolationMode(interpolation)), T.RandomCrop(img_size)]
        if hflip > 0:
            t.append(T.RandomHorizontalFlip(hflip))
        if randaug:
            t.append(rand_augment_transform(randaug, dict(translate_const=int(img_size * 0.45),
                                                          img_mean=tuple(round(255 * x) for x in mean),
                                                          interpolation=_pil_interp(interpolation))))
        t += [T.ToTensor(), T.Normalize(mean, std)]
        if reprob > 0:
            t.append(RandomErasing(reprob, mode="pixel", max_count=1, device="cpu"))
        return T.Compose(t)
    if eval_crop == "squash":
        return T.Compose([T.Resize((img_size, img_size), interpolation=T.InterpolationMode(interpolation)),
                          T.ToTensor(), T.Normalize(mean, std)])
    return T.Compose([T.Resize(scale, interpolation=T.InterpolationMode(interpolation)), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(mean, std)])


class _TransformError(RuntimeError):
    pass


class _TarSamples(torch.utils.data.Dataset):
    """Random access to the validated samples by (global index, augmentation seed)."""

    def __init__(self, shards: List[str], samples, offsets, transform, img_size: int):
        self.shards, self.samples, self.offsets = shards, samples, offsets
        self.transform, self.img_size = transform, img_size
        self._fh: Dict[int, Any] = {}

    def _read(self, g: int) -> Tuple[bytes, int]:
        s = int(np.searchsorted(self.offsets, g, side="right") - 1)
        jo, js, co, cs, _ = self.samples[s][g - self.offsets[s]]
        fh = self._fh.get(s)
        if fh is None:
            fh = self._fh[s] = open(self.shards[s], "rb")
        jpg = os.pread(fh.fileno(), js, jo)
        cls = int(os.pread(fh.fileno(), cs, co).decode("ascii").strip())
        if len(jpg) != js:
            raise OSError("short read")
        return jpg, cls

    def load(self, g: int, aug_seed: int):
        import io
        import random
        from PIL import Image
        jpg, cls = self._read(g)
        with Image.open(io.BytesIO(jpg)) as im:
            im = im.convert("RGB")
        st = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            for attempt in range(4):
                s = aug_seed if attempt == 0 else _seed32(aug_seed, attempt)
                random.seed(s)
                np.random.seed(s & 0xFFFFFFFF)
                torch.manual_seed(s)
                try:
                    x = self.transform(im)
                    break
                except ValueError as e:  # e.g. timm posterize(bits=0) with recent Pillow: redraw
                    if attempt == 3:
                        raise _TransformError(str(e)) from e
        finally:
            random.setstate(st[0]); np.random.set_state(st[1]); torch.set_rng_state(st[2])
        return x, cls

    def __getitem__(self, item):
        # item: list of (global index, aug seed, is_pad) for one batch
        xs, ys, bad = [], [], 0
        todo = list(item)
        for j, (g, s, pad) in enumerate(todo):
            try:
                x, y = self.load(g, s)
            except _TransformError:
                raise
            except Exception as e:  # noqa: BLE001
                log.warning("data: undecodable sample %d (%s)", g, e)
                bad += 1
                x, y = None, None
            xs.append(x)
            ys.append(-1 if pad else y)
        good = [j for j, x in enumerate(xs) if x is not None]
        for j, x in enumerate(xs):
            if x is None:
                if not good:
                    xs[j] = torch.zeros(3, self.img_size, self.img_size)
                    ys[j] = -1
                else:  # refill with another sample of the batch, freshly augmented
                    k = good[j % len(good)]
                    g, s, pad = todo[k]
                    xs[j], y = self.load(g, s ^ 0x5BD1E995)
                    ys[j] = -1 if pad else y
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), bad

    def __len__(self):
        return int(self.offsets[-1])


def _worker_init(_):
    torch.set_num_threads(1)


def _identity(x):
    return x[0]


class _TorchMixin:
    def _torch_init(self):
        self._ds = _TarSamples(self.vs.shards, self.vs.samples, self._offsets,
                               build_torch_transform(self.is_train, self.img_size, self.crop_pct, self.train_crop,
                                                     self.eval_crop, self.interpolation, self.randaug, self.reprob,
                                                     self.hflip, self.mean, self.std), self.img_size)

    def _torch_batches(self, batches: List[List[Tuple[int, int, bool]]]):
        if not batches:
            return
        if self.workers > 0:
            it = _MappedDL(self._ds, batches, self.workers)
        else:
            it = (self._ds[b] for b in batches)
        for x, y, bad in it:
            self._count_read_skips(bad, self.source)
            yield self._to_device(x), self._to_device(y)


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


class _DaliMixin:
    def _dali_init(self):
        if not _dali_available():
            raise ImportError("data.pipeline=dali but NVIDIA DALI is not installed (pip install '.[dali]'), "
                              "or set data.pipeline=torch")
        self._gpu = self.device.type == "cuda" and torch.cuda.is_available()
        self._pipe = None
        self._pipe_epoch = None

    def _build_pipe(self, shard_id: int, pipe_seed: int, checkpoint=None):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        gpu = self._gpu
        dec_dev = "mixed" if gpu else "cpu"
        op_dev = "gpu" if gpu else "cpu"
        interp = types.INTERP_CUBIC if self.interpolation == "bicubic" else types.INTERP_LINEAR
        img = self.img_size
        is_train = self.is_train
        ra = parse_randaug(self.randaug) if is_train else None
        mean = [255 * m for m in self.mean]
        std = [255 * s for s in self.std]
        scale = int(math.floor(img / self.crop_pct))
        n_range = self._range(shard_id)[1] - self._range(shard_id)[0]

        @pipeline_def(enable_conditionals=ra is not None)
        def pipe():
            jpg, cls = fn.readers.webdataset(
                paths=self.vs.shards, index_paths=self.vs.index_paths, ext=["jpg", "cls"],
                shard_id=shard_id, num_shards=self.world_size, random_shuffle=is_train,
                initial_fill=max(1, min(1024, n_range)), pad_last_batch=not is_train,
                stick_to_shard=True, name="reader", dtypes=[types.UINT8, types.UINT8])
            if is_train and self.train_crop == "rrc":
                images = fn.decoders.image_random_crop(jpg, device=dec_dev, output_type=types.RGB,
                                                       random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                       num_attempts=10)
                images = fn.resize(images, device=op_dev, resize_x=img, resize_y=img, interp_type=interp,
                                   antialias=True)
            else:
                images = fn.decoders.image(jpg, device=dec_dev, output_type=types.RGB)
                if not is_train and self.eval_crop == "squash":
                    images = fn.resize(images, device=op_dev, resize_x=img, resize_y=img, interp_type=interp,
                                       antialias=True)
                else:
                    images = fn.resize(images, device=op_dev, resize_shorter=scale, interp_type=interp,
                                       antialias=True)
                    if is_train:  # resize_crop: random crop position
                        images = fn.crop(images, device=op_dev, crop=(img, img),
                                         crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                                         crop_pos_y=fn.random.uniform(range=(0.0, 1.0)))
                    else:
                        images = fn.crop(images, device=op_dev, crop=(img, img))
            if is_train and self.hflip > 0:
                images = fn.flip(images, device=op_dev, horizontal=fn.random.coin_flip(probability=self.hflip))
            if ra is not None:
                from nvidia.dali.auto_aug import rand_augment
                images = rand_augment.rand_augment(images, n=ra["n"], m=min(ra["m"], 10), num_magnitude_bins=11,
                                                   shape=(img, img), max_translate_rel=0.45,
                                                   monotonic_mag=bool(ra["inc"]))
            images = fn.crop_mirror_normalize(images, device=op_dev, dtype=types.FLOAT, output_layout="CHW",
                                              mean=mean, std=std)
            cls = fn.pad(cls, fill_value=32)
            return images, cls

        kw = dict(batch_size=self.micro_batch, num_threads=max(1, self.workers or 1),
                  device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None, seed=pipe_seed,
                  prefetch_queue_depth=2, enable_checkpointing=True, exec_dynamic=True)
        if checkpoint is not None:
            kw["checkpoint"] = checkpoint
        # DALI's own auto_aug still calls fn.experimental.* ops and forces their deprecation warning
        # on (simplefilter("default")): silence it for the build only.
        import nvidia.dali.ops as dali_ops
        orig = getattr(dali_ops, "_handle_op_deprecation", None)
        if orig is not None:
            dali_ops._handle_op_deprecation = lambda *a, **k: None
        try:
            p = pipe(**kw)
            p.build()
        finally:
            if orig is not None:
                dali_ops._handle_op_deprecation = orig
        return p

    def _dali_outputs(self, pipe) -> Tuple[torch.Tensor, torch.Tensor]:
        try:
            imgs, cls = pipe.run()
        except RuntimeError as e:
            raise RuntimeError(f"DALI failed reading {self.source}: {e}\n(an image that passed the index checks "
                               "could not be decoded; set data.verify_samples=decode to drop such samples "
                               "when indexing, or data.pipeline=torch, which skips them)") from e
        c = np.array(cls.as_tensor()) if hasattr(cls, "as_tensor") else np.stack([np.array(t) for t in cls])
        labels = torch.from_numpy(np.array([int(bytes(r).decode("ascii").strip() or -1) for r in c], np.int64))
        if self._gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray
            t = imgs.as_tensor()
            x = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            x = torch.from_numpy(np.array(imgs.as_tensor()))
        return x, labels


def _random_erase_(x: torch.Tensor, prob: float, gen: torch.Generator) -> None:
    """timm RandomErasing(mode='pixel', max_count=1) on a normalised NCHW batch, seeded generator."""
    if prob <= 0:
        return
    n, c, h, w = x.shape
    area = h * w
    for i in range(n):
        if torch.rand((), generator=gen).item() > prob:
            continue
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(0.02, 1 / 3, generator=gen))
            ar = math.exp(float(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3), generator=gen)))
            eh, ew = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if eh < h and ew < w:
                top = int(torch.randint(0, h - eh + 1, (), generator=gen))
                left = int(torch.randint(0, w - ew + 1, (), generator=gen))
                noise = torch.empty((c, eh, ew)).normal_(generator=gen)
                x[i, :, top:top + eh, left:left + ew] = noise.to(x.device, x.dtype)
                break


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
class TrainLoader(_LoaderBase, _TorchMixin, _DaliMixin):
    """One epoch per ``iter()``; exactly ``len(self)`` batches on every rank."""
    is_train = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.samples_per_rank = self.num_samples // self.world_size
        self.steps_per_epoch = self.samples_per_rank // self.micro_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.source}: {self.num_samples} samples over {self.world_size} rank(s) give no full "
                             f"batch of {self.micro_batch}; lower train.micro_batch or use more data")
        self.samples_per_epoch = self.steps_per_epoch * self.micro_batch * self.world_size
        self._restore = None
        self._init_pipeline()

    def _shard_id(self, epoch: int) -> int:
        return (self.rank + epoch) % self.world_size

    def _order(self, epoch: int) -> np.ndarray:
        a, b = self._range(self._shard_id(epoch))
        rng = np.random.default_rng([self.seed, epoch, self._shard_id(epoch), 7])
        return a + rng.permutation(b - a)

    def state_dict(self):
        sd = super().state_dict()
        if self.pipeline == "dali":
            if self._pipe is not None and self._pipe_epoch == self.epoch and self._consumed > 0:
                sd["dali_checkpoint"] = self._pipe.checkpoint()
            elif self._restore is not None:
                sd["dali_checkpoint"] = self._restore
        return sd

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self._restore = sd.get("dali_checkpoint") if self._consumed > 0 else None
        self._pipe = None

    def __iter__(self):
        if self._consumed >= self.steps_per_epoch:
            self.epoch += 1
            self._consumed = 0
            self._restore = None
        epoch, start = self.epoch, self._consumed
        gen_fn = self._iter_dali if self.pipeline == "dali" else self._iter_torch
        for x, y in gen_fn(epoch, start):
            step = self._consumed
            if self.reprob > 0 and self.pipeline == "dali":
                g = torch.Generator().manual_seed(_seed32(self.seed, epoch, self.rank, step, "erase"))
                _random_erase_(x, self.reprob, g)
            self._consumed += 1
            yield x, y
        # epoch finished: next iter() starts the next epoch
        self._pipe = None

    def _iter_torch(self, epoch, start):
        order = self._order(epoch)
        B = self.micro_batch
        batches = []
        for k in range(start, self.steps_per_epoch):
            idx = order[k * B:(k + 1) * B]
            batches.append([(int(g), _seed32(self.seed, epoch, int(g)), False) for g in idx])
        yield from self._torch_batches(batches)

    def _iter_dali(self, epoch, start):
        ckpt = self._restore if start > 0 else None
        if start > 0 and ckpt is None and self._pipe is not None and self._pipe_epoch == epoch:
            # the previous iterator of this epoch was abandoned: continue with its live pipeline
            pipe = self._pipe
            for _ in range(start, self.steps_per_epoch):
                x, y = self._dali_outputs(pipe)
                yield self._to_device(x), self._to_device(y)
            return
        if start > 0 and ckpt is None:
            log.warning("data: no DALI checkpoint in the loader state: fast-forwarding %d batches", start)
        self._pipe = self._build_pipe(self._shard_id(epoch), _seed32(self.seed, epoch, self.rank, "dali"),
                                      checkpoint=ckpt)
        self._pipe_epoch = epoch
        self._restore = None
        if start > 0 and ckpt is None:
            for _ in range(start):
                self._pipe.run()
        for _ in range(start, self.steps_per_epoch):
            x, y = self._dali_outputs(self._pipe)
            yield self._to_device(x), self._to_device(y)


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
                batches.append([(g, 0, False) for g in idx] + [(idx[-1], 0, True)] * pad)
            it = self._torch_batches(batches)
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
        pipe = self._build_pipe(self.rank, _seed32(self.seed, "eval"))
        B = self.micro_batch
        for k in range(n_real):
            x, y = self._dali_outputs(pipe)
            valid = n - k * B
            if valid < B:
                y[valid:] = -1
            yield self._to_device(x), self._to_device(y)
        del pipe


def build_loader(split: str, data_cfg, aug_cfg=None, *, img_size, micro_batch, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device="cpu", model_mean_std=None):
    """``split``: 'train' (TrainLoader, augmentation, reshuffled per epoch) or 'eval'/'val'/'test'
    (EvalLoader). ``data_cfg``/``aug_cfg``: any objects (dataclass, namespace, dict) with the fields
    documented in the module doc. ``model_mean_std``: ``(mean, std)`` in 0..1 units (default ImageNet)."""
    kw = dict(img_size=img_size, micro_batch=micro_batch, rank=rank, world_size=world_size, seed=seed,
              device=device, model_mean_std=model_mean_std)
    if split == "train":
        return TrainLoader(split, data_cfg, aug_cfg, **kw)
    if split in ("eval", "val", "validation", "test"):
        return EvalLoader(split, data_cfg, aug_cfg, **kw)
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
