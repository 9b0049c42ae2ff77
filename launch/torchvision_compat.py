"""Make ``import timm`` / ``import deepspeed`` work on a CPU-only machine, and do nothing elsewhere.

Why this exists: the only torchvision on PyPI for torch 2.13 is a CUDA build. Next to a CPU torch its
``_C.so`` cannot load (it links libc10_cuda.so), and torchvision's meta registrations then fail with
``RuntimeError: operator torchvision::nms does not exist``. timm imports ``torchvision.ops`` at top
level, so timm cannot be imported at all. No well-kept library fixes this, hence this module.

The fix: before torchvision is imported for the first time, try to load its compiled extension. If that
works (a GPU cluster, or a CPU torchvision build) nothing is changed. If it cannot be loaded, define the
schemas of the two operators torchvision registers Python kernels for (``nms``, ``qnms``) with
``torch.library`` so torchvision imports; calling those ops then raises a clear error, and everything
timm needs works.

DeepSpeed picks its accelerator at import; with no GPU it must be told ``DS_ACCELERATOR=cpu`` (else it
probes for accelerators it cannot use). The same hook sets that, only when the variable is unset and
CUDA is unavailable.

Installed by ``scripts/setup_env.sh`` as a ``.pth`` line in the virtual environment, so it applies to
every interpreter of that environment (``python -c "import timm"`` included). The hook is a
``sys.meta_path`` finder that imports nothing until torchvision or deepspeed is imported.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_TV_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library_handles = []  # keep torch.library.Library objects alive (their defs vanish when collected)


def torchvision_extension_loads() -> bool:
    """True when torchvision's compiled extension can be loaded next to the installed torch."""
    import ctypes
    import torch  # noqa: F401  (the extension needs libtorch's symbols loaded first)

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix
    libdir = list(spec.submodule_search_locations)[0]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(libdir, "_C" + suffix)
        if os.path.exists(path):
            try:
                ctypes.CDLL(path)
                return True
            except OSError:
                return False
    return True  # no extension shipped: torchvision takes its pure-python path


def define_missing_torchvision_ops() -> list[str]:
    """Define the torchvision op schemas torchvision's Python side needs; returns those defined."""
    import torch

    defined = []
    lib = None
    for name, schema in _TV_OPS.items():
        if hasattr(torch.ops, "torchvision") and torch._C._dispatch_has_kernel(f"torchvision::{name}"):
            continue
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
            continue  # schema already there
        except RuntimeError:
            pass
        if lib is None:
            lib = torch.library.Library("torchvision", "FRAGMENT")
            _library_handles.append(lib)
        lib.define(schema)
        defined.append(name)
    return defined


def apply_torchvision_fix() -> bool:
    """Apply the fix if (and only if) torchvision's extension cannot load. Returns whether it applied."""
    if "torchvision" in sys.modules:
        return False
    if torchvision_extension_loads():
        return False
    define_missing_torchvision_ops()
    os.environ.setdefault("HVP_TORCHVISION_CPU_SHIM", "1")  # lets tests and logs see it applied
    return True


def set_deepspeed_accelerator() -> None:
    """DS_ACCELERATOR=cpu when unset and there is no CUDA device (DeepSpeed reads it at import)."""
    if os.environ.get("DS_ACCELERATOR"):
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


class _FirstImportHook(importlib.abc.MetaPathFinder):
    """Runs the fixes right before the first import of torchvision / deepspeed, then steps aside."""

    def __init__(self):
        self._busy = False
        self._done = set()

    def find_spec(self, fullname, path=None, target=None):
        if self._busy or fullname not in ("torchvision", "deepspeed") or fullname in self._done:
            return None
        self._busy = True
        try:
            self._done.add(fullname)
            if fullname == "torchvision":
                apply_torchvision_fix()
            else:
                set_deepspeed_accelerator()
        finally:
            self._busy = False
        return None  # let the normal finders import the module


def install() -> None:
    if not any(isinstance(f, _FirstImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _FirstImportHook())


if os.environ.get("HVP_DISABLE_COMPAT") != "1":
    install()
