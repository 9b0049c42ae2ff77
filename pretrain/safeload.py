"""Loading torch pickles without running code from them.

A ``.pt`` file is a pickle: unpickled with arbitrary classes it can run any code (a downloaded
"checkpoint" can create files, open sockets, ...). Every load path of the pipeline (``finetune.init=``,
``run.resume=``, the run's own resume, ``pretrain.evaluate``, ``finetune.export``, DeepSpeed's
consolidation) reads with ``weights_only=True``: tensors, plain containers and numbers, plus the three
record classes DeepSpeed's own checkpoints carry. DeepSpeed calls ``torch.load(..., weights_only=False)``
internally; :func:`weights_only_loads` forces those calls through the same safe unpickler with torch's
documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch. A file that needs anything else is refused with one
line naming the class it asked for.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
from pathlib import Path

import torch

# The non-tensor objects in DeepSpeed 0.19's ZeRO optimizer-state files (listed with
# torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints of every stage, bf16 and fp32).
DEEPSPEED_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                     ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                     ("deepspeed.utils.tensor_fragment", "fragment_address"))


class UnsafeCheckpointError(RuntimeError):
    """A pickle that asks for a class outside the allow-list (it was not unpickled)."""


def _allowed_globals() -> list:
    out = []
    for module, name in DEEPSPEED_GLOBALS:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # DeepSpeed not installed: its files cannot be read anyway
            pass
    return out


def refusal(path, err: Exception) -> UnsafeCheckpointError:
    msg = str(err)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg) or re.search(r"GLOBAL ([\w.]+)", msg)
    what = f"it asks for {m.group(1)!r}" if m else msg.splitlines()[0][:200]
    return UnsafeCheckpointError(
        f"{path}: refused by the weights-only load: {what}, which could run code. Only tensors, plain "
        "containers and DeepSpeed's checkpoint records are loaded; convert the file to a plain state dict or "
        ".safetensors")


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside runs with ``weights_only=True`` and DeepSpeed's record classes allowed."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    except pickle.UnpicklingError as e:
        raise refusal("checkpoint", e) from None
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def load(path: str | os.PathLike, map_location="cpu"):
    """``torch.load`` of one file, weights only; an unsafe pickle raises :class:`UnsafeCheckpointError`."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(Path(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None
