"""A pre-imported interpreter that forks the test suite's training ranks (``python -m pretrain ...``).

Why: a short training rank of the suite spends most of its CPU time importing the stack (torch, timm with
torchvision, DeepSpeed, inductor). A 2-step world-1 run (ZeRO-1, fp32, the engine tests' tiny config) measured
3.5-3.7 CPU-s started fresh and 1.0-1.1 forked from here (2-core Xeon held to AVX2 kernels; 1.7-1.8 before
DeepSpeed's Muon/inductor and DALI's modules joined PRELOAD); the engine tests start about fifty ranks, the
chaos and gpu_check tests sixteen more. This process imports the stack once, then for each request forks a
child that becomes the rank as ``python -m <module> <args>`` would: the request's environment (plus the
variables that importing the stack sets, such as ``DS_ACCELERATOR``, which a fresh rank has once it has
imported), working directory, argv and log file, the module run as ``__main__`` by :func:`runpy.run_module`,
and the interpreter's own handling of ``SystemExit`` and uncaught exceptions. The child is a real, separate
process; only the import work is shared. Variables read at import time cannot change per request, so
``tests/engine_utils.py`` starts a rank fresh when its environment differs from this process's in anything but
the per-run keys it lists and the values the imports set anyway.

Protocol (one JSON object per line): the parent writes ``{"module", "args", "env", "cwd", "log"}`` on
stdin; this process answers ``{"ready": true, "import_env": {...}}`` once the imports are done (with the
variables they set), ``{"pid": N}`` after each fork, and ``{"exit": N, "code": C}`` when a child ends
(``C`` as :attr:`subprocess.Popen.returncode` gives it: negative for a signal). It ends when stdin closes.
"""
from __future__ import annotations

import json
import os
import runpy
import select
import sys

# What a rank imports: our entry points and, imported by them only later, the ZeRO optimizers, TensorBoard,
# DALI's pipeline API (nvidia.dali.fn and its autograph for conditionals, the PyTorch plugin) and the module
# DeepSpeed's ZeRO optimizer check imports (Muon, which brings in inductor: ~1 CPU-s per rank). None of them
# starts a thread, installs a signal handler or sets a variable at import (checked when these were added).
PRELOAD = ("pretrain.trainer", "finetune.__main__", "deepspeed.runtime.zero.stage_1_and_2",
           "deepspeed.runtime.zero.muon.muon_optimizer", "torch.utils.tensorboard")
DALI_PRELOAD = ("nvidia.dali.fn", "nvidia.dali.auto_aug.rand_augment", "nvidia.dali.plugin.pytorch")  # if installed


def become(request: dict, import_env: dict, proto_in: int, proto_out: int):
    """In the forked child: turn into ``python -m <module> <args>`` (never returns to the server loop)."""
    os.close(proto_in)
    os.close(proto_out)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**import_env, **request["env"]})
    sys.path[0] = request["cwd"]  # what ``python -m`` puts first
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)  # the module returned: the interpreter would exit 0 here


def serve() -> None:
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the children's stdout/stderr become their log files; ours stays quiet
    os.close(devnull)
    sys.path[0] = os.getcwd()
    before = dict(os.environ)
    for name in PRELOAD:
        __import__(name)
    try:
        for name in DALI_PRELOAD:
            __import__(name)
    except ImportError:  # DALI is an optional extra: ranks without it use data.pipeline=torch
        pass
    import_env = {k: v for k, v in os.environ.items() if before.get(k) != v}

    def send(obj):
        os.write(proto_out, (json.dumps(obj) + "\n").encode())

    send({"ready": True, "import_env": import_env})
    buf = b""
    while True:
        readable, _, _ = select.select([proto_in], [], [], 0.05)
        while True:  # reap every child that ended, as their parent must
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if not readable:
            continue
        chunk = os.read(proto_in, 65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                become(request, import_env, proto_in, proto_out)
            send({"pid": pid})


if __name__ == "__main__":
    serve()
