"""storage/run_lock.py: one holder per run_dir, the holder named on refusal, stale locks taken over, no fd leaks."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from megatron_mmpl.storage.run_lock import LOCK_NAME, RunDirLocked, RunLock, read_holder
from tests.child_env import child_env

pytestmark = pytest.mark.unit

# A holder in another process: takes the lock, optionally forks a child that lingers, prints "locked", waits.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from megatron_mmpl.storage.run_lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    if sys.argv[2] == "fork" and os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(60)
""")


def _holder(run_dir, fork: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), "fork" if fork else "-"],
                         stdout=subprocess.PIPE, text=True, env=child_env())
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_lock_names_holder_and_fix(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirLocked) as e:
            RunLock(tmp_path / "run").acquire()
    msg = str(e.value)
    assert f"host {socket.gethostname()} PID {os.getpid()}" in msg
    assert "choose another run_dir" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_release_lets_the_next_run_in_and_empties_the_file(tmp_path, caplog):
    RunLock(tmp_path).acquire().release()
    assert read_holder(str(tmp_path / LOCK_NAME)) == {}
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert read_holder(str(tmp_path / LOCK_NAME))["pid"] == str(os.getpid())
    assert "stale" not in caplog.text  # a clean release is not a stale lock


def test_lock_of_another_live_process_refused(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLocked, match=f"PID {p.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()


def test_stale_lock_of_killed_process_taken_over(tmp_path, caplog):
    p = _holder(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with caplog.at_level(logging.WARNING):
        with RunLock(tmp_path):
            assert read_holder(str(tmp_path / LOCK_NAME))["pid"] == str(os.getpid())
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and f"PID {p.pid} " in stale[0]


def test_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path):
    """A DataLoader-like forked child outlives the kill -9'd trainer: the lock must be free at once anyway."""
    p = _holder(tmp_path, fork=True)
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the holder's forked child is not running"
    p.kill()
    p.wait()
    try:
        with RunLock(tmp_path):
            pass
    finally:
        for c in children:
            os.kill(int(c), signal.SIGKILL)


def test_fd_not_inherited_by_exec(tmp_path):
    with RunLock(tmp_path) as lock:
        assert not os.get_inheritable(lock.fd)
        out = subprocess.run([sys.executable, "-c", f"import os; os.fstat({lock.fd})"], capture_output=True)
    assert out.returncode != 0 and b"Bad file descriptor" in out.stderr


def test_release_twice_and_in_a_forked_child_is_harmless(tmp_path):
    lock = RunLock(tmp_path).acquire()
    pid = os.fork()
    if pid == 0:  # the child's copy was closed at fork; its release must not unlock the parent
        lock.release()
        os._exit(0 if lock.fd is None else 1)
    assert os.waitpid(pid, 0)[1] == 0
    with pytest.raises(RunDirLocked):
        RunLock(tmp_path).acquire()
    lock.release()
    lock.release()
    RunLock(tmp_path).acquire().release()
