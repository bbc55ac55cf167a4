"""A real `mmpl train` in a subprocess for the fault tests: its own session (so a signal can go to its whole
process group, as a scheduler sends it), its output read line by line, waits on lines and files, never sleeps."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.child_env import child_env

RECIPE = "examples/recipes/quickstart.yaml"
ENV = child_env()


def train_cmd(args: list[str], nproc: int = 1) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    return [*launcher, "-m", "megatron_mmpl.cli", "train", "--config", RECIPE, *args]


class Trainer:
    """`mmpl train` started in a new session; `.lines` is everything it printed (stdout + stderr)."""

    def __init__(self, args: list[str], nproc: int = 1):
        self.proc = subprocess.Popen(train_cmd(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=ENV, start_new_session=True)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line)
        self._q.put(None)

    def _pump(self, timeout: float) -> bool:
        """Take one line (False once the output ended)."""
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            return True
        if line is None:
            self._q.put(None)
            return False
        self.lines.append(line)
        return True

    def wait_line(self, prefix: str, timeout: float = 300) -> str:
        """The first line starting with `prefix` (fails when the trainer exits first or the time runs out)."""
        deadline, seen = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if line.startswith(prefix):
                    return line
            seen = len(self.lines)
            if not self._pump(0.2):
                pytest.fail(f"exited ({self.proc.poll()}) before a {prefix!r} line:\n{self.text[-3000:]}")
        pytest.fail(f"no {prefix!r} line within {timeout}s:\n{self.text[-3000:]}")

    def wait_path(self, path: Path, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < deadline, f"{path} did not appear:\n{self.text[-3000:]}"
            assert self._pump(0.02) or path.exists(), f"exited before {path} appeared:\n{self.text[-3000:]}"

    def finish(self, timeout: float = 300) -> int:
        """Wait for the exit; returns the exit code (all output read)."""
        rc = self.proc.wait(timeout=timeout)
        while self._pump(5):
            pass
        return rc

    def group(self) -> list[psutil.Process]:
        """Every live process of the trainer's session (the trainer, its workers and helpers)."""
        sid = self.proc.pid
        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    @property
    def text(self) -> str:
        return "".join(self.lines)


def cli_in_a_rank(argv: list[str], setup=None) -> dict:
    """`mmpl <argv>` in a fresh spawned process (never in pytest's own): its exit code and what it printed.

    In-process trainings left state in the pytest process (gloo listeners, a TCP store, fsspec's event loop
    stopped seeing a socket), after which a later test's HTTP read hung until aiohttp's timeout. `setup` is an
    importable function run in that process first (e.g. to patch a hook)."""
    from megatron_mmpl.parallel.spawn import run_distributed

    (result,) = run_distributed(_cli_rank, 1, list(argv), setup)
    return result


def _cli_rank(argv: list[str], setup) -> dict:
    import io
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    from megatron_mmpl.cli import main

    warnings.simplefilter("ignore")  # library warnings, which pytest captured when this ran in its process
    if setup is not None:
        setup()
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}
