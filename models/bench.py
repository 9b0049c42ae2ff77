"""Model and attention benchmarks (scripts that print figures, not timed tests).

Whole model (any timm-registered model; ``import models`` registers the project's families)::

    python -m models.bench --model vil_small_rpb_224 [--batch 8 --size 224 --device cpu|cuda --dtype fp32|bf16]

prints forward (no_grad, eval) and forward+backward (train, ``logits.sum().backward()``) images/s, time per
batch (min / median over ``--reps``), peak memory, MACs (``models.measure.count_macs``) and, on CUDA, MFU
against ``--peak-tflops`` (default: H100 dense bf16 989 / tf32 495).

ViL attention micro-benchmark (stage-1 shape of ViL-Small: C=96, 3 heads, chunk 7, 1 global token)::

    python -m models.bench --vil-attention --tokens 56 112 224 [--batch 8 --threads 2]

compares the efficient sliding-chunk attention (default implementation), a re-implementation of the
release's sliding-chunk autograd algorithm (roll + einsum over the 9 neighbour chunks, for a side-by-side
reference on the same machine) and the dense masked reference (skipped where it would not fit), for
``--tokens`` x ``--tokens`` feature maps: forward+backward time and peak memory of the whole attention module
(projections included). Peak CPU memory is measured with the torch profiler's allocator events.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _PeakMem:
    """Peak tensor memory (bytes above the start) of a block: CUDA allocator stats or CPU profiler events."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                               profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.prof.__exit__(*exc)
            cur = peak = 0
            events = sorted(((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                             if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU))
            for _, nbytes in events:
                cur += nbytes
                peak = max(peak, cur)
            self.peak = peak
        return False


def _time(fn, reps, device, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


# ----------------------------------------------------------------------------------------- whole model

def bench_model(args) -> None:
    import timm

    import models  # noqa: F401  (registers every family)
    from models.measure import count_macs, count_params

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if args.model not in timm.list_models():
        sys.exit(f"unknown model {args.model!r}; registered: {', '.join(timm.list_models('*'))[:2000]}")
    kw = {"img_size": args.size} if args.size else {}
    model = timm.create_model(args.model, **kw).to(device)
    size = args.size or model.pretrained_cfg["input_size"][-1]
    params = count_params(model)
    macs = count_macs(model, size)
    x = torch.randn(args.batch, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def fwd():
        with torch.no_grad(), autocast:
            model(x)

    def fwd_bwd():
        with autocast:
            out = model(x)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)

    print(f"{args.model}: params {params / 1e6:.3f} M, MACs {macs / 1e9:.3f} G per image at {size}, "
          f"batch {args.batch}, {device.type}, {args.dtype}, threads {torch.get_num_threads()}")
    for name, fn, train in (("forward", fwd, False), ("fwd+bwd", fwd_bwd, True)):
        model.train(train)
        with _PeakMem(device) as pm:
            fn()
        tmin, tmed = _time(fn, args.reps, device)
        line = (f"  {name:8s} min {tmin:.3f} s  median {tmed:.3f} s  {args.batch / tmin:8.1f} img/s  "
                f"peak mem {pm.peak / 2**20:.0f} MiB")
        if device.type == "cuda":
            flops = 2 * macs * args.batch * (3 if train else 1)
            peak = args.peak_tflops or (989.0 if dtype == torch.bfloat16 else 495.0)
            line += f"  MFU {flops / tmin / (peak * 1e12) * 100:.1f} % (of {peak:.0f} TFLOP/s)"
        print(line, flush=True)


# ----------------------------------------------------------------------------------------- ViL attention

def _release_style_local(q, k, v, nx, ny, w, g, scale, rel_bias, l2g_bias, mode=0):
    """Release algorithm (SlidingChunk2D with autograd): 9 rolled einsums, cyclic rolls + zero-chunk mask."""
    from models.layers.longformer2d import CHUNK_OFFSETS, chunk_key_mask
    b, h, _, m = q.shape
    mx, my = -(-nx // w), -(-ny // w)

    def img(t):
        t = t.reshape(b * h, nx, ny, m).permute(0, 3, 1, 2)
        t = F.pad(t, (0, my * w - ny, 0, mx * w - nx))
        return t.reshape(b * h, m, mx, w, my, w).permute(0, 1, 2, 4, 3, 5).reshape(b * h, m, mx, my, w * w)

    qi, ki, vi = img(q * scale), img(k[:, :, g:]), img(v[:, :, g:])
    kg, vg = k[:, :, :g].reshape(b * h, g, m), v[:, :, :g].reshape(b * h, g, m)
    a11 = torch.cat([torch.einsum("bcmnl,bcmnt->bmnlt", qi, torch.roll(ki, (-dx, -dy), (2, 3)))
                     for dx, dy in CHUNK_OFFSETS], dim=-1)
    a11 = a11 + rel_bias.repeat(b, 1, 1)[:, None, None]
    mask = ~chunk_key_mask(nx, ny, w, device=q.device).view(1, mx, my, 1, -1)
    a11 = a11.masked_fill(mask, float("-inf"))
    a10 = torch.einsum("bcmnl,btc->bmnlt", qi, kg) + l2g_bias.repeat(b, 1)[:, None, None, None]
    a = torch.cat([a10, a11], -1)
    a = (a - a.max(-1, keepdim=True)[0]).softmax(-1)
    w2 = w * w
    out = torch.einsum("bmnlt,btc->bcmnl", a[..., :g], vg)
    for i, (dx, dy) in enumerate(CHUNK_OFFSETS):
        out = out + torch.einsum("bmnlt,bcmnt->bcmnl", a[..., g + i * w2:g + (i + 1) * w2],
                                 torch.roll(vi, (-dx, -dy), (2, 3)))
    out = out.reshape(b * h, m, mx, my, w, w).permute(0, 2, 4, 3, 5, 1).reshape(b, h, mx * w, my * w, m)
    return out[:, :, :nx, :ny].reshape(b, h, nx * ny, m)


def bench_vil_attention(args) -> None:
    from models.vil import LongformerAttention
    import models.layers.longformer2d as L

    torch.set_num_threads(args.threads)
    dim, heads, w, g = 96, 3, 7, 1
    print(f"ViL attention module (C={dim}, {heads} heads, chunk {w}, {g} global token), batch {args.batch}, "
          f"threads {torch.get_num_threads()}, fwd+bwd (and fwd no_grad), {args.dtype}; min/median of {args.reps}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    attn = LongformerAttention(dim, heads, w, g, rpb=True).to(dtype)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.05)
    orig = L.sliding_chunk_attention
    for n in args.tokens:
        x = torch.randn(args.batch, g + n * n, dim, dtype=dtype, requires_grad=True)
        impls = ["chunk"] + (["release-style"] if n <= args.release_max_side else [])
        if n * n <= args.dense_max_tokens:
            impls.append("dense")
        res = {}
        for impl in impls:
            attn.impl = "dense" if impl == "dense" else "chunk"
            if impl == "release-style":
                import models.vil as V
                V.sliding_chunk_attention = _release_style_local
            try:
                def fb():
                    attn(x, n, n).sum().backward()
                    x.grad = None
                    attn.zero_grad(set_to_none=True)

                def fw():
                    with torch.no_grad():
                        attn(x, n, n)
                with _PeakMem(torch.device("cpu")) as pm:
                    fb()
                tmin, tmed = _time(fb, args.reps, torch.device("cpu"))
                fmin, _ = _time(fw, args.reps, torch.device("cpu"))
            finally:
                import models.vil as V
                V.sliding_chunk_attention = orig
            res[impl] = tmin
            print(f"  {n:4d}x{n:<4d} {impl:14s} fwd+bwd min {tmin:7.3f} s  median {tmed:7.3f} s   fwd {fmin:7.3f} s"
                  f"   peak mem {pm.peak / 2**20:8.1f} MiB", flush=True)
        if "release-style" in res:
            print(f"  {n:4d}x{n:<4d} speed-up chunk vs release-style: {res['release-style'] / res['chunk']:.2f}x"
                  + (f", vs dense: {res['dense'] / res['chunk']:.2f}x" if "dense" in res else ""), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="timm model name (any registered model)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="input size (default: the model's default cfg)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    ap.add_argument("--vil-attention", action="store_true", help="ViL attention micro-benchmark")
    ap.add_argument("--tokens", type=int, nargs="+", default=[56, 112, 224], help="feature map side(s)")
    ap.add_argument("--release-max-side", type=int, default=112, help="skip the release-style run above this side")
    ap.add_argument("--dense-max-tokens", type=int, default=3136, help="skip the dense reference above this")
    args = ap.parse_args(argv)
    if args.vil_attention:
        bench_vil_attention(args)
    elif args.model:
        bench_model(args)
    else:
        ap.error("give --model NAME or --vil-attention")


if __name__ == "__main__":
    main()
