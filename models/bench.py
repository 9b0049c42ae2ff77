"""Model and attention benchmarks (scripts that print figures, not timed tests).

Whole model (any timm-registered model; ``import models`` registers the project's families)::

    python -m models.bench --model vil_small_rpb_224 [--batch 8 --size 224 --device cpu|cuda --dtype fp32|bf16]
                           [--compile] [--attn-impl chunk|dense|flex]

prints forward (no_grad, eval) and forward+backward (train, ``logits.sum().backward()``) images/s, time per
batch (min / median over ``--reps``), peak memory, MACs (``models.measure.count_macs``) and, on CUDA, MFU
against ``--peak-tflops`` (default: H100 dense bf16 989 / tf32 495). ``--compile`` adds the same module
under ``torch.compile`` (inductor), timed alternately with the eager one in the same process.

Suite (one variant per family, ViL-S and ViL-B included)::

    python -m models.bench --suite [--batch 8 --size 224 --reps 3 --models ... --json out.json]

prints per model eager vs compiled fwd+bwd images/s side by side (alternating rounds), peak memory of
each, the compiled/eager ratio, the share of the eager step spent in GEMM / convolution / attention library
kernels with the ceiling it puts on that ratio (``library_kernel_share``), the graphs and graph breaks Dynamo
captures (``torch._dynamo.explain``) and, on CUDA, MFU; for ViL also FlexAttention vs the default sliding-chunk
attention (CUDA: compiled fwd+bwd; CPU: forward only, torch 2.13 has no FlexAttention backward on CPU).

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
import difflib
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


# aten ops that call a library kernel (BLAS GEMM, oneDNN / cuDNN convolution, fused attention): torch.compile
# keeps calling these ("extern" kernels in inductor's output) and can only shorten the rest of the step.
_LIBRARY_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
                "aten::mkldnn_convolution", "aten::convolution_backward", "aten::cudnn_convolution",
                "aten::_conv_depthwise2d", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"}
_LIBRARY_PREFIXES = ("aten::_scaled_dot_product_", "aten::_flash_attention", "aten::_efficient_attention")


def library_kernel_share(fn, device, steps: int = 2) -> float:
    """Fraction of ``fn``'s wall time spent in library kernels (:data:`_LIBRARY_OPS`), from the torch profiler.

    ``1 / share`` bounds what a compiler that keeps those kernels can gain over eager (Amdahl): with 80 % of
    the step in GEMMs and convolutions no fusion of the other 20 % gives more than 1.25x. Self time of each
    op (CPU: the calling thread's wall time, as the intra-op pool works inside it; CUDA: device time);
    profiler overhead lengthens the step, so the share errs low and the bound high.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        wall_us = (time.perf_counter() - t) * 1e6
    lib_us = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in prof.key_averages()
                 if e.key in _LIBRARY_OPS or e.key.startswith(_LIBRARY_PREFIXES))
    return min(lib_us / wall_us, 1.0)


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

# one variant per family (ViL-S and ViL-B both: ViL's cost shifts to full attention as it grows)
SUITE = ("vil_small_rpb_224", "vil_base_rpb_224", "msg_transformer_tiny_224", "scalable_vit_small_224",
         "restv2_tiny_224", "ms_mlp_tiny_224")


def _side_by_side(fns: dict, reps: int, device) -> dict:
    """Time the callables alternately, round by round (so load changes hit all alike), after one warm-up
    call each (compilation happens there; its time is reported) and one call under :class:`_PeakMem`."""
    res = {}
    for name, fn in fns.items():
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        res[name] = {"first_call_s": time.perf_counter() - t}
        with _PeakMem(device) as pm:
            fn()
        res[name]["peak_mib"] = pm.peak / 2**20
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    for name in fns:
        res[name].update(min_s=min(times[name]), median_s=statistics.median(times[name]))
    return res


def _setup(args):
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return device, dtype


def _model_fns(model, x, dtype, train: bool):
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def fwd():
        with torch.no_grad(), autocast:
            model(x)

    def fwd_bwd():
        with autocast:
            out = model(x)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)

    return fwd_bwd if train else fwd


def _mfu(macs: int, batch: int, seconds: float, train: bool, dtype, args) -> float:
    peak = args.peak_tflops or (989.0 if dtype == torch.bfloat16 else 495.0)
    return 2 * macs * batch * (3 if train else 1) / seconds / (peak * 1e12) * 100


def _refuse_unusable(names, size, attn_impl=None) -> None:
    """Exit 2 with one line, before anything is measured, for an unregistered model or one whose own input
    checks refuse ``size`` or ``attn_impl`` (MSG-Transformer needs multiples of 32 and enough first-stage
    windows, for example): a suite must not fail on its fifth model after minutes of timing the first four.
    The check is a batch-1 forward on CPU, only when ``--size`` or ``--attn-impl`` overrides the defaults."""
    import timm

    import models  # noqa: F401  (registers every family)
    from models.measure import forward_zeros

    known = set(timm.list_models())

    def close(n):  # names it begins, else the most similar ones
        return sorted(k for k in known if k.startswith(n))[:4] or difflib.get_close_matches(n, known, 3)

    problems = [f"unknown model {n!r} (close: {', '.join(close(n)) or 'none'})" for n in names if n not in known]
    if (size or attn_impl) and not problems:
        kw = {**({"img_size": size} if size else {}), **({"attn_impl": attn_impl} if attn_impl else {})}
        for name in names:
            try:
                forward_zeros(timm.create_model(name, **kw), size)
            except ValueError as e:
                problems.append(f"{name}{f' at {size} px' if size else ''}: {e}")
    if problems:
        print(f"models.bench: nothing measured: {'; '.join(problems)}", file=sys.stderr)
        raise SystemExit(2)


def bench_model(args) -> None:
    """One model: forward and fwd+bwd; with ``--compile`` eager and compiled side by side."""
    import timm

    import models  # noqa: F401  (registers every family)
    from models.measure import count_macs, count_params

    _refuse_unusable([args.model], args.size, args.attn_impl)
    device, dtype = _setup(args)
    kw = {"img_size": args.size} if args.size else {}
    if args.attn_impl:
        kw["attn_impl"] = args.attn_impl
    model = timm.create_model(args.model, **kw).to(device)
    size = args.size or model.pretrained_cfg["input_size"][-1]
    params = count_params(model)
    macs = count_macs(model, size)
    x = torch.randn(args.batch, 3, size, size, device=device)
    print(f"{args.model}: params {params / 1e6:.3f} M, MACs {macs / 1e9:.3f} G per image at {size}, "
          f"batch {args.batch}, {device.type}, {args.dtype}, threads {torch.get_num_threads()}"
          + (f", attn_impl {args.attn_impl}" if args.attn_impl else ""))
    variants = {"eager": model}
    if args.compile:
        variants["compiled"] = torch.compile(model, backend=args.backend)
    for label, train in (("forward", False), ("fwd+bwd", True)):
        model.train(train)
        res = _side_by_side({k: _model_fns(m, x, dtype, train) for k, m in variants.items()}, args.reps, device)
        for name, r in res.items():
            line = (f"  {label:8s} {name:9s} min {r['min_s']:.3f} s  median {r['median_s']:.3f} s  "
                    f"{args.batch / r['min_s']:8.1f} img/s  peak mem {r['peak_mib']:.0f} MiB")
            if name == "compiled":
                line += f"  (first call {r['first_call_s']:.1f} s)"
            if device.type == "cuda":
                line += f"  MFU {_mfu(macs, args.batch, r['min_s'], train, dtype, args):.1f} %"
            print(line, flush=True)
        if args.compile:
            print(f"  {label:8s} compiled/eager speed {res['eager']['min_s'] / res['compiled']['min_s']:.2f}x",
                  flush=True)


def dynamo_graphs(model, x) -> dict:
    """What ``torch.compile`` captures of ``model(x)``: graph count, graph breaks and their reasons.

    ``torch._dynamo.explain`` traces without generating code (seconds, not inductor's minutes). One graph
    and no break is what each family's forward must give: a break splits the step into graphs that
    inductor cannot fuse across and runs Python in between.
    """
    import warnings

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
            "break_reasons": [b.reason for b in ex.break_reasons],
            "dynamo_warnings": sorted({str(w.message).split(". ")[0] for w in caught if "Dynamo" in str(w.message)}),
            "ops": ex.op_count, "graph_modules": ex.graphs}


def bench_suite(args) -> list:
    """Per family (``--models``, default :data:`SUITE`): eager vs compiled fwd+bwd, and for ViL flex vs chunk.

    Every variant of a model shares its weights (the compiled one is the same module; the flex one gets
    the state dict). FlexAttention has no backward on CPU in torch 2.13, so on CPU the flex/chunk ratio
    is the forward (no_grad) one; on CUDA it is fwd+bwd of the compiled models.
    """
    import json

    import timm

    import models  # noqa: F401
    from models.measure import count_macs

    _refuse_unusable(args.models or SUITE, args.size)
    device, dtype = _setup(args)
    rows = []
    print(f"suite on {_device_name(device)}, {args.dtype}, batch {args.batch}, threads {torch.get_num_threads()}, "
          f"min of {args.reps} alternating rounds", flush=True)
    for name in args.models or SUITE:
        kw = {"img_size": args.size} if args.size else {}
        model = timm.create_model(name, **kw).to(device)
        size = args.size or model.pretrained_cfg["input_size"][-1]
        macs = count_macs(model, size)
        x = torch.randn(args.batch, 3, size, size, device=device)
        model.train()
        graphs = dynamo_graphs(model, x)
        res = _side_by_side({"eager": _model_fns(model, x, dtype, True),
                             "compiled": _model_fns(torch.compile(model, backend=args.backend), x, dtype, True)},
                            args.reps, device)
        row = {"model": name, "size": size, "batch": args.batch, "device": _device_name(device), "dtype": args.dtype,
               "macs_per_image": macs, "threads": torch.get_num_threads(),
               "graphs": graphs["graphs"], "graph_breaks": graphs["graph_breaks"]}
        for k, r in res.items():
            row[f"{k}_img_s"] = args.batch / r["min_s"]
            row[f"{k}_peak_mib"] = r["peak_mib"]
            row[f"{k}_first_call_s"] = r["first_call_s"]
            if device.type == "cuda":
                row[f"{k}_mfu_pct"] = _mfu(macs, args.batch, r["min_s"], True, dtype, args)
        row["compiled_over_eager"] = res["eager"]["min_s"] / res["compiled"]["min_s"]
        share = library_kernel_share(_model_fns(model, x, dtype, True), device)
        row["eager_library_kernel_share"] = share
        row["compile_ceiling"] = 1 / share if share > 0 else float("inf")
        line = (f"  {name:26s} fwd+bwd eager {row['eager_img_s']:7.1f} img/s ({row['eager_peak_mib']:.0f} MiB)  "
                f"compiled {row['compiled_img_s']:7.1f} img/s ({row['compiled_peak_mib']:.0f} MiB)  "
                f"compiled/eager {row['compiled_over_eager']:.2f}x  "
                f"(GEMM/conv/attention kernels {share:.0%} of eager: ceiling {row['compile_ceiling']:.2f}x)  "
                f"dynamo graphs {graphs['graphs']}, breaks {graphs['graph_breaks']}")
        if device.type == "cuda":
            line += f"  MFU eager {row['eager_mfu_pct']:.1f} % compiled {row['compiled_mfu_pct']:.1f} %"
        print(line, flush=True)
        if name.startswith("vil_") and not args.no_flex:
            flex = timm.create_model(name, attn_impl="flex", **kw).to(device)
            flex.load_state_dict(model.state_dict())
            if device.type == "cuda":
                flex.train()
                fr = _side_by_side({"chunk": _model_fns(torch.compile(model, backend=args.backend), x, dtype, True),
                                    "flex": _model_fns(torch.compile(flex, backend=args.backend), x, dtype, True)},
                                   args.reps, device)
                what = "compiled fwd+bwd"
            else:
                model.eval()
                flex.eval()
                fr = _side_by_side({"chunk": _model_fns(model, x, dtype, False),
                                    "flex": _model_fns(flex, x, dtype, False)}, args.reps, device)
                what = "forward (no FlexAttention backward on CPU)"
            row["flex_measure"] = what
            for k, r in fr.items():
                row[f"{k}_{'fwd_bwd' if device.type == 'cuda' else 'fwd'}_img_s"] = args.batch / r["min_s"]
                row[f"{k}_{'fwd_bwd' if device.type == 'cuda' else 'fwd'}_peak_mib"] = r["peak_mib"]
            row["flex_over_chunk"] = fr["chunk"]["min_s"] / fr["flex"]["min_s"]
            print(f"  {name:26s} {what}: chunk {args.batch / fr['chunk']['min_s']:7.1f} img/s "
                  f"({fr['chunk']['peak_mib']:.0f} MiB)  flex {args.batch / fr['flex']['min_s']:7.1f} img/s "
                  f"({fr['flex']['peak_mib']:.0f} MiB)  flex/chunk {row['flex_over_chunk']:.2f}x", flush=True)
            del flex
        rows.append(row)
        del model
        torch._dynamo.reset()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    return rows


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
        flags = next(ln for ln in info.splitlines() if ln.startswith("flags")).split()
        isa = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f in flags] or ["avx2" if "avx2" in flags else "no avx2"]
        name += f" ({', '.join(isa)})"
    except (OSError, StopIteration):
        pass
    return f"CPU {name}"


# ----------------------------------------------------------------------------------------- ViL attention

def _release_style_local(q, k, v, nx, ny, w, g, scale, rel_bias, l2g_bias, mode=0, layout=None):
    """Release algorithm (SlidingChunk2D with autograd): 9 rolled einsums, cyclic rolls + zero-chunk mask.

    Same signature as ``sliding_chunk_attention`` (the benchmark swaps it in); ``layout`` is unused here.
    """
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="timm model name (any registered model)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="input size (default: the model's default cfg)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    ap.add_argument("--compile", action="store_true", help="also run the model under torch.compile, side by side")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    ap.add_argument("--attn-impl", default=None, help="ViL attention implementation (chunk|dense|flex)")
    ap.add_argument("--suite", action="store_true", help="one variant per family: eager vs compiled (and ViL flex)")
    ap.add_argument("--models", nargs="+", default=None, help="models of --suite (default: %s)" % " ".join(SUITE))
    ap.add_argument("--no-flex", action="store_true", help="--suite without the ViL flex/chunk comparison")
    ap.add_argument("--json", default=None, help="--suite: also write the rows to this JSON file")
    ap.add_argument("--vil-attention", action="store_true", help="ViL attention micro-benchmark")
    ap.add_argument("--tokens", type=int, nargs="+", default=[56, 112, 224], help="feature map side(s)")
    ap.add_argument("--release-max-side", type=int, default=112, help="skip the release-style run above this side")
    ap.add_argument("--dense-max-tokens", type=int, default=3136, help="skip the dense reference above this")
    args = ap.parse_args(argv)
    if args.vil_attention:
        bench_vil_attention(args)
    elif args.suite:
        return bench_suite(args)
    elif args.model:
        bench_model(args)
    else:
        ap.error("give --model NAME, --suite or --vil-attention")


if __name__ == "__main__":
    main()
