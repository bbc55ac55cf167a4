"""Atomic outputs: a reader sees the old file or directory or the complete new one, never a half-written one.

Everything is written under a temporary name beside the target (same filesystem) and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through a synced temp file and a rename (the parent directory must exist)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_target(target: str | os.PathLike, overwrite: bool = False) -> None:
    """Fail early (before any work) when `target` exists, is not empty and may not be replaced."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"output {target} exists and is not empty; choose a new --out or pass --overwrite")


def replace_directory(tmp: str | os.PathLike, target: str | os.PathLike, keep_existing: bool = False) -> None:
    """Move the finished directory `tmp` to `target`; an existing `target` is replaced (moved aside first, removed
    last) or, with `keep_existing` (another writer of the same content finished first), kept and `tmp` dropped."""
    tmp, target = Path(tmp), Path(target)
    if target.exists() and keep_existing:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, target)
    except OSError:  # a concurrent writer published it between the check and the rename
        if not keep_existing:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False, keep_existing: bool = False):
    """Yield a temp dir next to `target`; on success it becomes `target`, on any error it is removed.

    Refuses an existing non-empty `target` unless `overwrite` (then the old one is replaced only at the end) or
    `keep_existing` (a cache: whoever finishes first wins, see `replace_directory`).
    """
    target = Path(target)
    if not keep_existing:
        check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, target, keep_existing=keep_existing)
