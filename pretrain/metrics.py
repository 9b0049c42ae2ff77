"""Training metrics: TensorBoard (rank 0), a JSON-lines step log, throughput and MFU, top-k accuracy."""
from __future__ import annotations

import json
import time

import torch

# Dense bf16 peak FLOP/s per device, for MFU (vendor datasheets).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Correct counts at each k over the entries with a real label (label -1 marks padding)."""
    valid = labels >= 0
    logits, labels = logits[valid], labels[valid]
    if labels.numel() == 0:
        return [0 for _ in ks]
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top.eq(labels[:, None])
    return [int(hit[:, :k].any(dim=1).sum()) for k in ks]


class StepTimer:
    """Wall time per optimizer step split into data-wait and compute."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.data = 0.0
        self.images = 0

    def add_data_wait(self, seconds: float):
        self.data += seconds

    def read(self) -> tuple[float, float, float]:
        """(images/s, data-wait fraction, elapsed) since the last reset."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return self.images / elapsed, self.data / elapsed, elapsed


class RunLogger:
    """Rank-0 sink for scalars (TensorBoard + train_log.jsonl); a no-op on other ranks."""

    def __init__(self, run, enabled: bool):
        """``run``: the :class:`pretrain.rundir.RunDir` whose ``tb/`` and ``train_log.jsonl`` receive the logs."""
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.tb_dir))
            self.jsonl = open(run.train_log, "a")

    def scalars(self, step: int, values: dict, jsonl: bool = False):
        if not self.enabled:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, v, step)
        if jsonl:
            self.jsonl.write(json.dumps({"step": step, **{k.split("/")[-1]: v for k, v in values.items()}}) + "\n")
            self.jsonl.flush()

    def text(self, tag: str, text: str):
        if self.enabled:
            self.writer.add_text(tag, text)

    def images(self, tag: str, batch: torch.Tensor, mean, std, step: int = 0):
        if not self.enabled:
            return
        from torchvision.utils import make_grid

        x = batch[:32].detach().float().cpu()
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        self.writer.add_image(tag, make_grid(x.clamp(0, 1), nrow=8), step)

    def flush(self):
        if self.enabled:
            self.writer.flush()

    def close(self):
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
