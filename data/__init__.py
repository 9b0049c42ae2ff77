"""Data package: shard conversion (``python -m data.convert``), label spaces, DALI / torch input
pipelines (:func:`build_loader`), demo data (``python -m data.demo``), benchmark (``python -m data.bench``)."""
from .labels import LabelSpace, UnknownSynsetError, load_label_space, map_21k_to_1k  # noqa: F401
from .shards import DatasetNotFoundError  # noqa: F401


def build_loader(*args, **kwargs):
    """See :func:`data.loader.build_loader` (imported lazily: torch/DALI are heavy)."""
    from .loader import build_loader as _b
    return _b(*args, **kwargs)


__all__ = ["build_loader", "LabelSpace", "UnknownSynsetError", "load_label_space", "map_21k_to_1k",
           "DatasetNotFoundError"]
