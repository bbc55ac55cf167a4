"""Preemption and hangs as a scheduler causes them: a signal to the whole process group (loader workers and the
checkpoint writer's helper included) saves and exits 0, also mid-save; kill -9 leaves no process behind; a rank
stopped with SIGSTOP is reported within parallel.timeout_s; a resume at another data-parallel size is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from megatron_mmpl.storage.checkpoint_dir import complete_steps, latest_step
from megatron_mmpl.storage.integrity import verify_checkpoint
from tests.distributed.train_helpers import overrides
from tests.faults.trainer import ENV, Trainer, train_cmd

pytestmark = pytest.mark.integration

LONG = ("schedule.train_steps=500", "checkpoint.interval=1000", "data.num_workers=2")


def _no_partial(ckpt) -> None:
    assert not [p for p in os.listdir(ckpt) if p.endswith(".partial")], os.listdir(ckpt)


def _signal_group_and_check(t: Trainer, sig: int, ckpt) -> list[int]:
    """Send `sig` to the trainer's whole process group; it must save, exit 0 and leave only verified checkpoints.
    Returns their steps."""
    try:
        os.killpg(t.proc.pid, sig)
        rc = t.finish()
    finally:
        t.kill()
    assert rc == 0, t.text[-3000:]
    assert "stop signal: saved step" in t.text and "killed by signal" not in t.text, t.text[-3000:]
    assert "BrokenPipeError" not in t.text, t.text[-3000:]
    steps = complete_steps(str(ckpt))
    for s in steps:
        verify_checkpoint(str(ckpt / f"iter_{s:07d}"))
    _no_partial(ckpt)
    return steps


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_0(tmp_path):
    run = tmp_path / "run"
    t = Trainer(overrides(str(tmp_path), f"run_dir={run}", *LONG))
    try:
        t.wait_line("step 3/")
        assert len(t.group()) >= 3, "the trainer and its two loader workers"
    except BaseException:
        t.kill()
        raise
    steps = _signal_group_and_check(t, signal.SIGTERM, run / "checkpoints")
    assert steps and steps[-1] >= 3 and latest_step(str(run / "checkpoints")) == steps[-1]


def test_sigusr1_to_the_process_group_during_a_save_completes_it_and_exits_0(tmp_path):
    run = tmp_path / "run"
    t = Trainer(overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=500", "checkpoint.interval=2",
                          "checkpoint.keep_last=0", "data.num_workers=2"))
    try:
        t.wait_path(run / "checkpoints" / "iter_0000002.partial")  # the first save is being written
    except BaseException:
        t.kill()
        raise
    steps = _signal_group_and_check(t, signal.SIGUSR1, run / "checkpoints")
    assert steps in ([2], [2, 3]), steps  # the save the signal arrived in finished (then a stop-save at 3)


def test_kill_9_of_the_trainer_leaves_no_process_behind(tmp_path):
    run = tmp_path / "run"
    t = Trainer(overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=500", "checkpoint.interval=1",
                          "checkpoint.keep_last=1", "data.num_workers=2"))
    try:
        t.wait_line("step 2/")  # a save has run: the writer's helper (a Manager process) exists too
        t.wait_path(run / "checkpoints" / "iter_0000002")
        helpers = [p for p in t.group() if p.pid != t.proc.pid]
        assert len(helpers) >= 3, [p.cmdline() for p in helpers]  # 2 loader workers + the writer's Manager
        t.proc.kill()
        t.proc.wait(timeout=60)
        _gone, alive = psutil.wait_procs(helpers, timeout=60)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
        assert not t.group()
    finally:
        t.kill()
        for p in t.group():
            p.kill()


def test_a_stopped_rank_is_reported_within_the_timeout(tmp_path):
    run = tmp_path / "run"
    t = Trainer(overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=500", "checkpoint.interval=1000",
                          "parallel.timeout_s=10"), nproc=2)
    stopped = None
    try:
        t.wait_line("step 2/")
        ranks = psutil.Process(t.proc.pid).children()
        assert len(ranks) == 2, ranks
        stopped = max(ranks, key=lambda p: p.pid)  # one of the two ranks hangs (a GPU hang, a stuck NFS read)
        stopped.suspend()
        t0 = time.monotonic()
        line = t.wait_line("mmpl train: error:", timeout=120)
        waited = time.monotonic() - t0
    finally:
        if stopped is not None:
            stopped.resume()
        t.kill()
        t.finish(timeout=120)
    assert "timed out waiting on another rank" in line and "parallel.timeout_s=10" in line, line
    assert waited < 60, f"reported after {waited:.0f}s"
    assert t.proc.returncode != 0


def test_resume_at_another_data_parallel_size_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    args = overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=2", "checkpoint.interval=1000")
    first = subprocess.run(train_cmd(args, nproc=2), capture_output=True, text=True, env=ENV, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert latest_step(str(run / "checkpoints")) == 2
    again = subprocess.run(train_cmd([*args, "schedule.train_steps=4"]),
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    err = [ln for ln in again.stderr.splitlines() if ln.startswith("mmpl train: error:")]
    assert len(err) == 1 and "data-parallel size 2" in err[0] and "this run has 1" in err[0], again.stderr[-2000:]
    assert "Traceback" not in again.stderr
