"""Graceful stop on SIGUSR1 / SIGTERM (Slurm's time-limit and preemption signals).

The handler only records the request; the training loop finishes its step, all ranks agree through the
per-step all-reduce, a checkpoint is written, and the process exits with ``EXIT_REQUEUE`` so the sbatch
scripts requeue the job. Handlers installed before ours (submitit's) are kept and called *after* the
checkpoint, at a step boundary, so their own requeue logic runs unchanged.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

EXIT_REQUEUE = 85  # "checkpointed, requeue me": slurm/*.sh run `scontrol requeue` on it
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records stop requests from signals (or code) and remembers the handlers it displaced.

    The handler only assigns an int (no lock: a second signal may arrive while the first is handled).
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGUSR1) -> None:
        if self.signum is None:
            self.signum = signum

    def _handler(self, signum, _frame):
        if self.signum is None:
            log.warning("received %s: finishing the step, then checkpointing", signal.Signals(signum).name)
        self.request(signum)

    def install(self, signals=STOP_SIGNALS, extra=()) -> None:
        """Take over ``signals`` (+ ``extra``, e.g. submitit's) in the main thread; keep the old handlers.

        Idempotent, so ``__main__`` can install at process start (closing the window before training
        where Slurm's signal would kill the process) and ``train()`` again.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for s in tuple(signals) + tuple(extra):
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._handler)

    def restore(self) -> None:
        """Put displaced handlers back; a SIGUSR1 that had none stays ignored (a time-limit signal arriving
        after the run must not kill a process that is exiting cleanly)."""
        for s, h in self._previous.items():
            if s == signal.SIGUSR1 and h in (signal.SIG_DFL, None):
                h = signal.SIG_IGN
            signal.signal(s, h)
        self._previous.clear()

    def chain_previous(self) -> None:
        """After checkpointing: hand the signal to the displaced handler (submitit requeues there)."""
        prev = self._previous.get(self.signum) if self.signum is not None else None
        self.restore()
        if callable(prev) and prev not in (signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler):
            prev(self.signum, None)


STOP = StopRequest()


def request_stop(signum: int = signal.SIGUSR1) -> None:
    """Ask the running training loop to checkpoint and stop at the next step boundary."""
    STOP.request(signum)
