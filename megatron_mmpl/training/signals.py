"""Preemption: SIGTERM / SIGUSR1 set a flag; all ranks agree on it after a step, save, and exit 0."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
