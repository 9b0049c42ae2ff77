"""Golden tests: rebuild a released-format state dict and input that the released code was run on.

Each ``fixtures/golden/<name>/`` holds what the *released* implementation computed (float64, eval mode,
drop-path 0, loaded strictly) for a pseudo-random state dict in the released checkpoint format:
``logits.pt`` (``[2, classes]``), ``features.pt`` (stage outputs of batch element 0, channels ``::C//16``,
and ``head_input``) and ``meta.json`` (listing, seed, input, the release's constructor call, a checksum).
No weights are shipped; the procedure ("golden-v1") regenerates them from the key listing
``fixtures/official_state_dicts/<listing>.tsv`` (the release's ``state_dict()`` in its order):

* one ``torch.Generator().manual_seed(seed)``; rows in file order; integer rows (index buffers,
  ``num_batches_tracked``) and ``alias_of`` rows (tied tensors) draw nothing;
* every other row draws once, ``u = torch.rand(shape, float64)``: ``.running_var`` -> ``0.5 + u``; a 1-D
  ``.weight`` (the Layer/BatchNorm scales) -> ``1 + 0.1 (2u - 1)``; anything else -> ``0.1 (2u - 1)``;
* alias rows get their target's tensor; the input is ``rand((batch, 3, size, size), seed + 1) * 2 - 1``
  (seed 0, batch 2 in every fixture).

A model that loads that dict through its ``checkpoint_filter_fn`` and reproduces ``logits.pt`` computes
the release's function, and its conversion consumes every tensor in the right role.
Also the released-checkpoint checks every family's tests share (meta-device models, strict loading).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
LISTINGS = FIXTURES / "official_state_dicts"
GOLDEN = FIXTURES / "golden"
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


def read_listing(path):
    """-> list of (key, shape, dtype, alias_of) in file order."""
    rows = []
    with open(path) as f:
        next(f)
        for line in f:
            key, shape, _kind, dtype, *rest = line.rstrip("\n").split("\t")
            alias = rest[0][len("alias_of="):] if rest else None
            rows.append((key, tuple(int(s) for s in shape.split("x")) if shape else (), dtype, alias))
    return rows


def make_state_dict(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape, dtype, alias in rows:
        if dtype not in FLOAT_DTYPES or alias:
            continue
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        if key.endswith(".running_var"):
            sd[key] = 0.5 + u
        elif len(shape) == 1 and key.endswith(".weight"):
            sd[key] = 1.0 + 0.1 * (2.0 * u - 1.0)
        else:
            sd[key] = 0.1 * (2.0 * u - 1.0)
    for key, shape, dtype, alias in rows:
        if alias:
            sd[key] = sd[alias]
    return sd


def make_input(seed=0, batch=2, size=224):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand((batch, 3, size, size), generator=g, dtype=torch.float64) * 2.0 - 1.0


def listing_state_dict(name: str, seed: int = 0) -> dict:
    """Released-format state dict synthesised from ``fixtures/official_state_dicts/<name>.tsv``."""
    return make_state_dict(read_listing(LISTINGS / f"{name}.tsv"), seed)


@functools.lru_cache(maxsize=None)
def _cached_listing(name: str) -> tuple:
    return tuple(listing_state_dict(name).items())


def cached_listing_state_dict(name: str) -> dict:
    """:func:`listing_state_dict` generated once per listing (the tensors are shared), a fresh dict each call."""
    return dict(_cached_listing(name))


def meta_model(name: str, **kwargs):
    """A registered model built on the meta device: shapes and counts without allocating weights."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def assert_loads_strictly(filter_fn, state_dict: dict, model) -> dict:
    """``filter_fn(state_dict, model)`` gives exactly the model's keys with its shapes and loads strictly."""
    out = filter_fn(state_dict, model)
    target = model.state_dict()
    assert set(out) == set(target)
    for k, v in out.items():
        assert tuple(v.shape) == tuple(target[k].shape), k
    model.load_state_dict(out, strict=True, assign=True)
    return out


def golden_fixtures(prefix: str = "") -> list[Path]:
    """Fixture directories (discovered, not listed by hand) whose name starts with ``prefix``."""
    return sorted(p for p in GOLDEN.iterdir() if p.is_dir() and p.name.startswith(prefix))


def load_meta(fixture: Path) -> dict:
    return json.loads((fixture / "meta.json").read_text())


def load_logits(fixture: Path) -> torch.Tensor:
    return torch.load(fixture / "logits.pt", weights_only=True)


def assert_reproduces_release(model_name: str, fixture: Path, **create_kwargs) -> None:
    """The golden check: our model, float64 *before* loading, loads the generated released-format dict
    strictly through its family's checkpoint_filter_fn and reproduces the release's logits at 1e-8."""
    import timm

    from models.family import family_of

    meta = load_meta(fixture)
    model = timm.create_model(model_name, drop_path_rate=0.0, **create_kwargs).double().eval()
    filter_fn = family_of(model).filter_fn
    sd = make_state_dict(read_listing(LISTINGS / meta["listing"]), meta["seed"])
    model.load_state_dict(filter_fn(sd, model), strict=True)
    with torch.no_grad():
        out = model(make_input(**meta["input"]))
    torch.testing.assert_close(out, load_logits(fixture), atol=1e-8, rtol=1e-8)
