"""Write an output directory atomically: build it under a temp name beside the target, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def check_target(target: str | os.PathLike, overwrite: bool = False) -> None:
    """Fail early (before any work) when `target` exists, is not empty and may not be replaced."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"output {target} exists and is not empty; choose a new --out or pass --overwrite")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temp dir next to `target`; on success it becomes `target`, on any error it is removed.

    Refuses an existing non-empty `target` unless `overwrite` (then the old one is replaced only at the end).
    """
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
