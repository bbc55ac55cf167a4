"""One trainer per run directory: an advisory flock on `<run_dir>/.mmpl.lock`, held for the run's life.

The kernel drops a flock when the last descriptor of its open file description closes, so a crashed or kill -9'd
holder leaves a lock file that can be taken: such a file is stale and is taken over (one log line names the dead
holder). The descriptor is opened O_CLOEXEC (exec'd children never get it) and closed in forked children (DataLoader
workers), so the lock dies with the trainer even while a worker outlives it for a moment. Advisory only: it stops
another `mmpl train`, not a user's `rm`. On a filesystem without flock (some Lustre mounts) the run goes on unlocked,
with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
import weakref

log = logging.getLogger(__name__)
LOCK_NAME = ".mmpl.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # the filesystem cannot flock
_held: weakref.WeakSet[RunLock] = weakref.WeakSet()


class RunDirLocked(ValueError):
    """Another live process holds the run directory (a ValueError: the CLI prints it as one line)."""


class RunLock:
    """`with RunLock(run_dir):` or `acquire()` ... `release()`; raises RunDirLocked when another process holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = os.path.join(os.fspath(run_dir), LOCK_NAME)
        self.fd: int | None = None
        self.pid: int | None = None  # the process that took the lock (a forked child must not unlock it)

    def acquire(self) -> RunLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(f"run_dir {os.path.dirname(self.path)} is in use by {describe(read_holder(self.path))}"
                               f" (lock {self.path}); wait for that run to end, or choose another run_dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKS:
                raise
            log.warning("%s: the filesystem does not support flock (%s); training without a run-dir lock",
                        self.path, e.strerror)
            return self
        previous = _read_fd(fd)
        if previous:  # a clean release empties the file: a holder written here died holding the lock
            log.warning("taking over the stale run-dir lock %s of %s: that process is gone", self.path,
                        describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host={socket.gethostname()}\npid={os.getpid()}\nstarted={time.time():.0f}\n".encode(), 0)
        self.fd, self.pid = fd, os.getpid()
        _held.add(self)
        return self

    def release(self) -> None:
        """Empty the file (a clean end) and unlock; a no-op if not held, or in a forked child."""
        fd, self.fd = self.fd, None
        _held.discard(self)
        if fd is None:
            return
        if os.getpid() == self.pid:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock taken and never released (an exception before train()'s try) ends with its object
        if self.fd is not None and os.getpid() == self.pid:
            os.close(self.fd)


def read_holder(path: str) -> dict[str, str]:
    """The holder's `host`, `pid`, `started` as written in the lock file ({} while it is being written)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _parse(f.read())
    except FileNotFoundError:
        return {}


def describe(holder: dict[str, str]) -> str:
    if not holder:
        return "another process (holder not yet written)"
    started = holder.get("started", "")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started))) if started.isdigit() else "?"
    return f"host {holder.get('host', '?')} PID {holder.get('pid', '?')} (started {when})"


def _read_fd(fd: int) -> dict[str, str]:
    return _parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))


def _parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _close_in_child() -> None:
    """After fork: a child's copy of the descriptor would keep the parent's flock alive after the parent dies."""
    for lock in list(_held):
        if lock.fd is not None:
            os.close(lock.fd)
            lock.fd = None


os.register_at_fork(after_in_child=_close_in_child)
