"""``precision: auto``: bf16 where the hardware computes it natively, fp32 where it would be emulated.

On a CPU without AVX512-BF16 or AMX, PyTorch emulates bf16 matmuls and convolutions: a ViL-Tiny step at
128 px measured 8.5x slower than fp32 on a 2-core AVX2-only EPYC. CUDA devices report bf16 support
themselves (Ampere and newer). All ranks must train in one precision, so the choice is agreed over the
process group: if any rank lacks native bf16, everyone runs fp32 (``auto``), and an explicit ``bf16`` on
such a machine runs as asked with one warning.
"""
from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger("pretrain")

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo(key: str) -> str | None:
    """The first ``key : value`` of ``/proc/cpuinfo`` (None where it or the key does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` does not exist)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name, for logs and timings that must name their machine."""
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why (for the log)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return True, f"CUDA device {name} supports bf16"
        return False, f"CUDA device {name} has no bf16 support"
    # PyTorch's own view first: AVX512 kernels are what use AVX512-BF16 / AMX instructions.
    capability = torch.backends.cpu.get_cpu_capability()
    have = sorted(f for f in _CPU_BF16_FLAGS if f in cpu_flags())
    if have and capability.startswith("AVX512"):
        return True, f"CPU has {', '.join(have)} (PyTorch kernels: {capability})"
    why = f"CPU without {' or '.join(_CPU_BF16_FLAGS)}" if not have else \
        f"PyTorch runs {capability} kernels on this CPU"
    return False, f"{why}: bf16 would be emulated (several times slower than fp32)"


def resolve_precision(requested: str, device: torch.device, agree=None) -> tuple[str, str]:
    """(``bf16`` | ``fp32``, reason). ``agree(bool) -> bool`` makes the native-bf16 answer collective
    (True only if every rank has it); single process: identity."""
    native, why = native_bf16(device)
    if agree is not None:
        all_native = agree(native)
        if native and not all_native:
            native, why = False, "another rank of this job has no native bf16"
    if requested == "auto":
        return ("bf16", why) if native else ("fp32", why)
    if requested == "bf16" and not native:
        log.warning("precision=bf16 as asked, but %s: expect a much slower run (precision=auto picks fp32)", why)
    return requested, "set explicitly" + ("" if native or requested == "fp32" else f"; {why}")


def agree_all(flag: bool) -> bool:
    """True when ``flag`` is True on every rank (one all-reduce; identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0.0 if flag else 1.0])
    dist.all_reduce(t)
    return t.item() == 0
