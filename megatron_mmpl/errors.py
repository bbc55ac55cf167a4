"""Expected failures as one line for the user — what failed, the file, the fix; `user_message` is None for a bug.

`reading(path)` marks exceptions raised while a file is read (checkpoint loaders do not name it) so the line can.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

_NO_SPACE = "free space there, or point checkpoint.save / run_dir / --out at another filesystem"
_NOT_WRITABLE = "make the directory writable, or choose another run_dir / --out"
_FIXES = {
    errno.ENOSPC: _NO_SPACE, errno.EDQUOT: _NO_SPACE,
    errno.EACCES: _NOT_WRITABLE, errno.EPERM: _NOT_WRITABLE, errno.EROFS: _NOT_WRITABLE,
}
_CHECKPOINT_FIX = ("the checkpoint is incomplete or corrupt: resume from an earlier iter_* (move this one aside) or "
                   "convert/save it again")
_SAFETENSORS_FIX = "the safetensors file is truncated or corrupt: download or export the checkpoint again"


class UserError(Exception):
    """An expected failure of the run (not bad input, not a bug) whose message names the cause and the fix."""


@contextlib.contextmanager
def reading(path: str | os.PathLike):
    """Name `path` on any exception raised inside (the innermost `reading` wins)."""
    try:
        yield
    except Exception as e:
        if getattr(e, "mmpl_file", None) is None:
            with contextlib.suppress(AttributeError):  # a few builtins take no attributes
                e.mmpl_file = os.fspath(path)
        raise


def user_message(exc: BaseException) -> str | None:
    """One line for an expected failure (bad input, the environment, corrupt data); None keeps the traceback."""
    file = getattr(exc, "mmpl_file", None)
    if _is(exc, "megatron.core.dist_checkpointing.core", "CheckpointingException"):
        return _one_line(f"checkpoint {file or '?'}: {exc}; {_CHECKPOINT_FIX}")
    if _is(exc, "safetensors", "SafetensorError"):
        return _one_line(f"{file or 'a safetensors file'}: {exc}; {_SAFETENSORS_FIX}")
    if isinstance(exc, UserError):
        return _one_line(str(exc))
    if isinstance(exc, KeyError):
        return _one_line(str(exc.args[0] if exc.args else exc))
    if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError)):  # ours name the value and the fix
        return _one_line(str(exc))
    if isinstance(exc, OSError):
        return _one_line(_os_error(exc, file))
    if _is(exc, "megatron_mmpl.data.loader", "DecodeAbort"):  # its message names the shards and the fix
        return _one_line(str(exc))
    return None


def os_error_line(exc: OSError, file: str | None = None) -> str:
    """`file: what; fix` for an OSError (the fix by errno: no space, not writable)."""
    return _os_error(exc, file)


def find_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, its cause/context chain, or one rank's failure of torch's DCP
    CheckpointException (megatron's writers wrap the disk's error)."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def _os_error(exc: OSError, file: str | None) -> str:
    names = [n for n in (exc.filename, exc.filename2) if n is not None] or ([file] if file else [])
    where = " -> ".join(os.fsdecode(n) if isinstance(n, (str, bytes)) else str(n) for n in names)
    what = exc.strerror or str(exc)
    fix = _FIXES.get(exc.errno)
    return f"{where + ': ' if where else ''}{what}" + (f"; {fix}" if fix else "")


def _is(exc: BaseException, module: str, name: str) -> bool:
    """isinstance against a class of a module that is not imported unless the failure came from it."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls is not None and isinstance(exc, cls)


def _one_line(msg: str) -> str:
    """A DataLoader worker's exception arrives as 'Caught X in DataLoader worker ...' + its traceback: keep its
    last line (the original message); join any other multi-line message."""
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        last = msg.rstrip().splitlines()[-1]
        head, sep, rest = last.partition(": ")
        msg = rest if sep and "." in head and " " not in head else last
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())
