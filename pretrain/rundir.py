"""The run directory: the one module that knows its on-disk layout.

    RUN/config.yaml                   the resolved config (precision resolved too)
    RUN/command.txt, git_sha.txt, pip_freeze.txt    provenance (``run.provenance``)
    RUN/tb/                           TensorBoard events
    RUN/train_log.jsonl, eval_log.jsonl
    RUN/.train.lock                   flock of the live job (one job per run directory)
    RUN/checkpoints/step_00000100/    DeepSpeed model/optimizer shards (any ZeRO stage)
    RUN/checkpoints/step_00000100/client_rank{r}.pt   rank r's loop state: RNG states, data-loader state
    RUN/checkpoints/step_00000100/ema.safetensors     EMA weights (``train.ema > 0``)
    RUN/checkpoints/step_00000100/universal/          DeepSpeed's universal checkpoint of the tag, made on
                                      the first resume on another world size (:mod:`pretrain.elastic`)
    RUN/checkpoints/step_00000100/COMPLETE            written by rank 0 after every rank finished writing:
                                      JSON {world_size, files: {name: {size, crc32}}}
    RUN/checkpoints/corrupt-step_00000100/            a checkpoint that failed verification (kept, never read)
    RUN/checkpoints/latest            tag of the newest COMPLETE checkpoint (atomic rename)
    RUN/exports/                      ``python -m finetune.export`` output

DeepSpeed writes ``latest`` itself as soon as *its* files are written; we pass ``save_latest=False`` and
publish the tag only after our per-rank files exist and a barrier confirms them, so a crash at any point
leaves ``latest`` on the previous complete checkpoint.

Integrity: COMPLETE records every file of the tag with its size and CRC-32 (zlib's, ~2 GB/s per core, in
the standard library; each rank checksums a share of the files, so a multi-GB checkpoint costs well under a
second per GB and rank). CRC-32 catches truncation and bit rot, which is what a crash or a bad disk does;
it is not a defence against deliberate tampering (loading is weights-only for that, see
:mod:`pretrain.safeload`). Resume verifies the newest checkpoint and falls back to older ones.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain import safeload

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_FMT = "step_{:08d}"
CORRUPT_PREFIX = "corrupt-"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"
EXPORTS = "exports"
LOCK_FILE = ".train.lock"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's stage-0 / module file in a tag folder


log = logging.getLogger("pretrain")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return TAG_FMT.format(step)


def client_state_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"client_rank{rank}.pt"


def is_tag_dir(p: Path) -> bool:
    """A DeepSpeed tag folder (holds its model-states file)."""
    return bool(glob.glob(str(Path(p) / "*model_states.pt")))


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with the COMPLETE marker, oldest first (quarantined ``corrupt-*`` folders excluded)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir()
                  if p.is_dir() and is_complete(p) and not p.name.startswith(CORRUPT_PREFIX))


def latest_complete(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if it is complete, else the newest complete tag, else None."""
    latest = Path(ckpt_dir) / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(Path(ckpt_dir) / tag):
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def find_tag_dir(ckpt_dir: Path) -> Path:
    """A checkpoint folder -> the tag folder to read: what ``latest`` names, else the newest COMPLETE tag,
    else the only tag folder (a DeepSpeed checkpoint written by another program)."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (ckpt_dir / tag).is_dir():
            raise CheckpointError(f"{latest} names tag {tag!r} but {ckpt_dir / tag} does not exist")
        return ckpt_dir / tag
    tags = complete_tags(ckpt_dir)
    if tags:
        return ckpt_dir / tags[-1]
    tag_dirs = sorted({Path(p).parent for p in glob.glob(str(ckpt_dir / "*" / "*model_states.pt"))})
    if len(tag_dirs) == 1:
        return tag_dirs[0]
    if tag_dirs:
        raise CheckpointError(f"{ckpt_dir} holds several checkpoint tags ({[t.name for t in tag_dirs]}) "
                              f"and no '{LATEST}' file: pass the tag folder")
    raise CheckpointError(f"{ckpt_dir} is not a DeepSpeed checkpoint folder (no '{LATEST}', no tag folders)")


def check_not_partial(tag_dir: Path) -> None:
    """Refuse a tag our engine left half-written (no COMPLETE while its siblings have one)."""
    tag_dir = Path(tag_dir)
    if not is_complete(tag_dir) and any(tag_dir.parent.glob(f"*/{COMPLETE}")):
        raise CheckpointError(f"{tag_dir} is an incomplete checkpoint (no {COMPLETE} marker while its siblings "
                              "have one: a write was interrupted); use another tag or the checkpoint folder")


def read_complete(tag_dir: Path) -> dict:
    """The COMPLETE record of a tag: ``{world_size, files}`` (``files`` None for markers written before
    checksums existed). An unreadable marker raises CheckpointError."""
    path = Path(tag_dir) / COMPLETE
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        rec = json.loads(text)
        if isinstance(rec, int):  # the first format: the world size alone
            return {"world_size": rec, "files": None}
        if isinstance(rec, dict) and isinstance(rec.get("world_size"), int) and isinstance(rec.get("files"), dict):
            return rec
    except ValueError:
        pass
    raise CheckpointError(f"{path}: not a completion record (content {text[:60]!r})")


def saved_world_size(ckpt_dir: Path, tag: str) -> int:
    return read_complete(Path(ckpt_dir) / tag)["world_size"]


def check_world_size(ckpt_dir: Path, tag: str, world: int) -> None:
    """Refuse to load a checkpoint written by another number of processes as it is (the trainer resumes
    those through :mod:`pretrain.elastic`; an unreadable marker is left to verification)."""
    try:
        saved = saved_world_size(ckpt_dir, tag)
    except CheckpointError:
        return
    if saved != world:
        raise CheckpointError(
            f"checkpoint {Path(ckpt_dir) / tag} was written by {saved} processes, this job has {world}. "
            f"Resume with {saved} processes, or start a new run from its weights with "
            f"finetune.init={Path(ckpt_dir) / tag} (model weights only). Nothing was modified.")


def rng_state() -> dict:
    """RNG states as tensors and plain values (numpy's key array as a tensor), so a weights-only load reads them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_crc32(path: Path, chunk: int = 16 << 20) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return f"{crc:08x}"
            crc = zlib.crc32(block, crc)


def _tag_files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in Path(tag_dir).rglob("*")
                  if p.is_file() and p.name != COMPLETE and not p.name.endswith(".tmp"))


def _share(names: list[str]) -> list[str]:
    """This rank's share of a file list (every rank sees the same sorted list on a shared filesystem)."""
    return names[dist.get_rank()::dist.get_world_size()]


def checksum_files(tag_dir: Path) -> dict:
    """Collective: ``{name: {size, crc32}}`` of every file of the tag, each rank checksumming a share."""
    mine = {n: {"size": (Path(tag_dir) / n).stat().st_size, "crc32": file_crc32(Path(tag_dir) / n)}
            for n in _share(_tag_files(tag_dir))}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in sorted(part.items())}


def verify_problem(tag_dir: Path) -> str | None:
    """Collective: why the tag does not verify against its COMPLETE record (None when it does). Every rank
    gets the same answer."""
    tag_dir = Path(tag_dir)
    problem = None
    try:
        files = read_complete(tag_dir)["files"]
    except CheckpointError as e:
        problem, files = str(e), None
    for name in _share(sorted(files)) if files else []:
        path, want = tag_dir / name, files[name]
        if not path.is_file():
            problem = f"{path} is missing"
        elif path.stat().st_size != want["size"]:
            problem = f"{path} has {path.stat().st_size} bytes, {want['size']} were written"
        elif file_crc32(path) != want["crc32"]:
            problem = f"{path} does not match its checksum (crc32 {want['crc32']} when written)"
        if problem:
            break
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p), None)


class RunDir:
    """Paths and files of one run directory; checkpoint tags live in :attr:`ckpt_dir`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.ckpt_dir = self.path / CHECKPOINTS

    # ---- layout
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def tb_dir(self) -> Path:
        return self.path / "tb"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def eval_log(self) -> Path:
        return self.path / "eval_log.jsonl"

    @property
    def exports_dir(self) -> Path:
        return self.path / EXPORTS

    def tag_dir(self, tag: str) -> Path:
        return self.ckpt_dir / tag

    def ema_file(self, tag: str) -> Path:
        return self.ckpt_dir / tag / EMA_FILE

    @staticmethod
    def is_run_dir(path: str | os.PathLike) -> bool:
        return (Path(path) / CHECKPOINTS).is_dir()

    def latest_complete(self) -> str | None:
        return latest_complete(self.ckpt_dir)

    def complete_tags(self) -> list[str]:
        return complete_tags(self.ckpt_dir)

    # ---- config and provenance
    def read_config(self) -> dict:
        """The run's ``config.yaml`` as plain data ({} when absent or unreadable)."""
        import yaml

        if not self.config_file.is_file():
            return {}
        try:
            return yaml.safe_load(self.config_file.read_text()) or {}
        except yaml.YAMLError:
            return {}

    def write_config(self, cfg) -> None:
        self.config_file.write_text(cfg.to_yaml())

    def write_provenance(self) -> None:
        """Command line, git SHA (marked dirty) and ``pip freeze`` of the process writing the run."""
        (self.path / "command.txt").write_text(" ".join([sys.executable] + sys.argv) + "\n")
        repo = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True)
        (self.path / "git_sha.txt").write_text((sha.stdout.strip() or "unknown")
                                               + (" (dirty)" if dirty.stdout.strip() else "") + "\n")
        freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True)
        (self.path / "pip_freeze.txt").write_text(freeze.stdout)

    @contextlib.contextmanager
    def lock(self, rank: int):
        """One live job per run directory: rank 0 holds an exclusive flock for the run's lifetime.

        Collective: every rank learns whether rank 0 got the lock, so a refused job stops on all ranks
        instead of leaving the others waiting in a collective.
        """
        fd, holder = None, ""
        if rank == 0:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid={os.getpid()} host={os.uname().nodename} "
                              f"job={os.environ.get('SLURM_JOB_ID', '-')}\n".encode(), 0)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                fd = None
        refused = torch.tensor([0.0 if rank != 0 or fd is not None else 1.0])
        dist.all_reduce(refused)
        if refused.item():
            raise CheckpointError(f"run directory {self.path} is in use by another live job"
                                  f"{f' ({holder})' if holder else ''}; use another run.dir or stop that job")
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)


def load_engine_state(engine, ckpt_dir: Path, tag: str) -> dict:
    """Collective: DeepSpeed restores module and optimizer state (its own format, any ZeRO stage), every
    pickle weights-only; returns the common client state saved with it."""
    with safeload.weights_only_loads():
        path, common = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    return common


class Checkpointer:
    """DeepSpeed checkpoints of one checkpoint folder, with a ``latest`` that only names complete ones."""

    def __init__(self, ckpt_dir: Path, keep: int = 3, fault_hook=None):
        self.ckpt_dir = Path(ckpt_dir)
        self.keep = keep
        self.fault_hook = fault_hook  # tests: called with the tag after the files, before publishing

    def save(self, engine, step: int, common_state: dict, rank_state: dict, ema_state: dict | None = None) -> str:
        """Collective: every rank calls it. Returns the tag once it is complete and published."""
        tag, rank = tag_for(step), dist.get_rank()
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=common_state, save_latest=False)
        torch.save(rank_state, client_state_file(self.ckpt_dir / tag, rank))
        if ema_state is not None and rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.detach().float().contiguous().cpu() for k, v in ema_state.items()},
                      str(self.ckpt_dir / tag / EMA_FILE))
        if self.fault_hook is not None:
            self.fault_hook(tag)  # tests: die here, with DeepSpeed's files written but nothing published
        dist.barrier()
        files = checksum_files(self.ckpt_dir / tag)  # after the barrier: every rank's files are written
        if rank == 0:
            self._publish(tag, files)
        dist.barrier()
        return tag

    def _publish(self, tag: str, files: dict) -> None:
        record = {"world_size": dist.get_world_size(), "files": files}
        write_atomic(self.ckpt_dir / tag / COMPLETE, json.dumps(record, indent=0, sort_keys=True) + "\n")
        write_atomic(self.ckpt_dir / LATEST, tag)
        for old in complete_tags(self.ckpt_dir)[:-self.keep]:  # the tag just published is the newest good one
            shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
        # partial tags (a crash during a write) older than the one just published are garbage too
        for p in self.ckpt_dir.iterdir():
            if p.is_dir() and not is_complete(p) and p.name.startswith("step_") and p.name < tag:
                shutil.rmtree(p, ignore_errors=True)

    def candidates(self) -> list[str]:
        """Complete tags to try for resume, newest first (``latest`` first when it names one)."""
        tags = complete_tags(self.ckpt_dir)[::-1]
        latest = self.ckpt_dir / LATEST
        if latest.is_file():
            named = latest.read_text().strip()
            if named in tags:
                tags.remove(named)
                tags.insert(0, named)
            elif dist.get_rank() == 0:
                log.warning("%s names %r, which is not a complete checkpoint; resuming from the newest that "
                            "verifies", latest, named)
        return tags

    def quarantine(self, tag: str, why: str) -> None:
        """Collective: rename a checkpoint that failed verification or loading out of the resume path."""
        if dist.get_rank() == 0:
            log.warning("checkpoint %s cannot be resumed (%s); kept as %s%s, trying the next older one",
                        self.ckpt_dir / tag, why, CORRUPT_PREFIX, tag)
            os.replace(self.ckpt_dir / tag, self.ckpt_dir / f"{CORRUPT_PREFIX}{tag}")
        dist.barrier()

    def load(self, engine, tag: str) -> tuple[dict, dict]:
        """Collective: restore model/optimizer via DeepSpeed; returns (common client state, this rank's).
        Every pickle is read weights-only."""
        check_world_size(self.ckpt_dir, tag, dist.get_world_size())
        common = load_engine_state(engine, self.ckpt_dir, tag)
        rank_state = safeload.load(client_state_file(self.ckpt_dir / tag, dist.get_rank()))
        return common, rank_state

    def load_ema(self, tag: str) -> dict | None:
        path = self.ckpt_dir / tag / EMA_FILE
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))
