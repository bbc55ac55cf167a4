"""Preemption: SIGTERM / SIGUSR1 set a flag; all ranks agree on it after a step, save, and exit 0.

A scheduler signals the whole process group (Slurm's scancel/time limit, a node drain), so the trainer's helper
processes — loader workers, the checkpoint writer's Manager — get the signal too. They ignore it
(`helper_process_init`) and leave the decision to the trainer, which stops them itself after its save; they are
also killed by the kernel when the trainer dies, so a kill -9 leaves no orphans.
"""

from __future__ import annotations

import ctypes
import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
HELPER_IGNORES = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StopSignal:
    """Catches the signals a cluster sends before it kills a job (Slurm: SIGTERM, or SIGUSR1 via --signal)."""

    def __init__(self, signals=SIGNALS):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank if any rank got a signal (a one-element MAX all-reduce)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def helper_process_init(*_worker_id) -> None:
    """First thing in a helper process: ignore the job's stop signals, die with the trainer (Linux). Also a
    DataLoader `worker_init_fn` (hence the ignored worker id); torch's worker SIGTERM handler is replaced."""
    for sig in HELPER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the loader's own parent watchdog still ends workers
        pass
