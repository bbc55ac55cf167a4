"""Two `mmpl train` on one run_dir: the second stops at once with one line naming the holder (exit 2) and the
first's losses.tsv stays one clean sequence; a lock left by a kill -9'd process is taken over and the run starts."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.child_env import child_env, stderr_lines
from tests.distributed.train_helpers import overrides

pytestmark = pytest.mark.integration

RECIPE = "examples/recipes/quickstart.yaml"
ENV = child_env()


def _train(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_mmpl.cli", "train", "--config", RECIPE, *args]


def _wait_for(proc: subprocess.Popen, prefix: str, timeout: float = 300) -> list[str]:
    """Lines of proc's stdout up to the first one starting with `prefix` (fails if it exits or times out)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] + [lines.put(None)], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        assert line is not None, f"exited ({proc.poll()}) before a {prefix!r} line: {seen}"
        seen.append(line)
        if line.startswith(prefix):
            return seen
    pytest.fail(f"no {prefix!r} line within {timeout}s: {seen}")


def _steps(run) -> list[int]:
    return [int(ln.split("\t")[0]) for ln in (run / "losses.tsv").read_text().splitlines() if ln.strip()]


def test_second_trainer_on_a_run_dir_stops_with_one_line(tmp_path):
    run = tmp_path / "run"
    args = overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=500", "checkpoint.interval=1000")
    first = subprocess.Popen(_train(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        _wait_for(first, "step 1/")
        second = subprocess.run(_train(args), capture_output=True, text=True, env=ENV, timeout=300)
        assert first.poll() is None, "the first trainer died when the second started"
    finally:
        first.send_signal(signal.SIGTERM)  # stop signal: finishes the step, saves, exits 0
        first.wait(timeout=300)
    err = stderr_lines(second.stderr)
    assert second.returncode == 2, second.stderr
    assert len(err) == 1, err
    assert err[0].startswith("mmpl train: error: run_dir ")
    assert f"host {socket.gethostname()} PID {first.pid} " in err[0]
    assert "choose another run_dir" in err[0]
    assert "step 1/" not in second.stdout
    steps = _steps(run)
    assert steps == list(range(1, len(steps) + 1)), steps  # one writer: no duplicate or interleaved steps


def test_stale_lock_of_a_killed_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron_mmpl.storage.run_lock import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    args = overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=2")
    out = subprocess.run(_train(args), capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    stale = [ln for ln in out.stderr.splitlines() if "stale run-dir lock" in ln]
    assert len(stale) == 1 and f"PID {holder.pid} " in stale[0] and "that process is gone" in stale[0], out.stderr
    assert _steps(run) == [1, 2]
    assert (run / ".mmpl.lock").read_text() == ""  # released cleanly at the end


def test_locked_run_dir_under_torchrun_is_one_line_from_rank_0(tmp_path):
    """Rank 0 refuses and exits 2; torchrun tears rank 1 down: no rank prints a traceback (torchrun's own report
    of the failed child remains)."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron_mmpl.storage.run_lock import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = overrides(str(tmp_path), f"run_dir={run}", "parallel.tp=2", "schedule.train_steps=2")
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "megatron_mmpl.cli", "train", "--config", RECIPE, *args],
                             capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("mmpl train: error")]
    assert out.returncode != 0
    assert len(errors) == 1 and f"PID {holder.pid} " in errors[0], out.stderr[-3000:]
    assert "megatron_mmpl" not in out.stderr.split("Traceback", 1)[-1].split("ChildFailedError", 1)[0]
    assert not (run / "losses.tsv").exists()
