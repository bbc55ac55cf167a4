"""Shard directories at a local path or a URL (s3://, gs://, http(s)://, any fsspec protocol): whole small files
(index.json, the per-shard offset indexes) and byte ranges of tars, so a URL keeps the offset index and exact resume.

Local paths are read with plain file I/O; URLs through fsspec, one range request per sample.
"""

from __future__ import annotations

import os
import sys

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


def is_url(loc: str | os.PathLike) -> bool:
    return "://" in str(loc) and not str(loc).startswith("file://")


def join(root: str | os.PathLike, rel: str) -> str:
    return f"{str(root).rstrip('/')}/{rel}" if is_url(root) else os.path.join(root, rel)


def _detach_parent_fsspec_loop() -> None:
    """In a forked child (a loader worker): make the parent's fsspec IO loop unable to touch the parent's sockets.

    fsspec runs its async filesystems (http, s3, gcs) on one event-loop thread per process; a fork copies the loop
    without its thread, and the copy's epoll descriptor still names the parent's epoll instance, which the kernel
    shares across fork. When the child lets go of the copied connections (its first fsspec call clears fsspec's
    instance cache; its exit collects everything), asyncio deregisters their sockets from that shared epoll, and
    the parent's loop then never sees the reply to its next request: the read hangs until aiohttp's timeout
    (seen: the remote-shard test, index.json read after a 2-worker loader; reproduced with a bare fork). Putting
    /dev/null over the child's copy of the descriptor makes those deregistrations fail (asyncio ignores that)."""
    for loop in _FORKED_LOOPS:
        selector = getattr(getattr(loop, "_selector", None), "_selector", None)  # the select.epoll object
        fd = selector.fileno() if selector is not None and not selector.closed else -1
        if fd >= 0:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, fd)
            os.close(null)
    _FORKED_LOOPS.clear()


_FORKED_LOOPS: list = []  # the parent's fsspec loop, between the fork hooks


def _remember_fsspec_loop() -> None:
    asyn = sys.modules.get("fsspec.asyn")
    loop = asyn.loop[0] if asyn is not None else None
    _FORKED_LOOPS[:] = [loop] if loop is not None else []


os.register_at_fork(before=_remember_fsspec_loop, after_in_parent=_FORKED_LOOPS.clear,
                    after_in_child=_detach_parent_fsspec_loop)


def _fs(url: str, storage_options: dict | None):
    import fsspec  # lazy: only shard directories at URLs need fsspec and its backends

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        proto = url.split("://", 1)[0]
        extra = EXTRAS.get(proto)
        hint = f"pip install 'megatron_mmpl[{extra}]'" if extra else f"install the fsspec backend for {proto}://"
        raise ImportError(f"reading {url} needs an fsspec backend for {proto}:// ({e}); {hint}") from None


def read_bytes(loc: str | os.PathLike, storage_options: dict | None = None) -> bytes:
    """A whole (small) file."""
    if not is_url(loc):
        with open(loc, "rb") as f:
            return f.read()
    fs, path = _fs(str(loc), storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{loc} not found") from None


def read_many(locs: list[str], storage_options: dict | None = None) -> list[bytes]:
    """Several whole files; URLs of one store are fetched concurrently."""
    if not locs or not is_url(locs[0]):
        return [read_bytes(p) for p in locs]
    fs, _ = _fs(locs[0], storage_options)
    paths = [_fs(u, storage_options)[1] for u in locs]
    got = fs.cat(paths, on_error="return")
    out = []
    for u, p in zip(locs, paths):
        data = got[p]
        if isinstance(data, Exception):
            raise FileNotFoundError(f"{u}: {type(data).__name__}: {data}")
        out.append(data)
    return out


class RangeReader:
    """Reads byte ranges of shard files under one root, keeping a few local files open (one per worker)."""

    def __init__(self, storage_options: dict | None = None, max_open: int = 16):
        self.storage_options = storage_options
        self.max_open = max_open
        self._files: dict[str, object] = {}
        self._fs = None

    def read(self, loc: str, offset: int, nbytes: int) -> bytes:
        if is_url(loc):
            if self._fs is None or self._fs[0] != os.getpid():
                self._fs = (os.getpid(), _fs(loc, self.storage_options)[0])
            fs = self._fs[1]
            data = fs.cat_file(fs._strip_protocol(loc), start=offset, end=offset + nbytes)
        else:
            f = self._files.pop(loc, None)
            if f is None:
                f = open(loc, "rb")
                if len(self._files) >= self.max_open:
                    self._files.pop(next(iter(self._files))).close()
            self._files[loc] = f
            f.seek(offset)
            data = f.read(nbytes)
        if len(data) > nbytes:
            raise ValueError(f"{loc}: asked for bytes {offset}-{offset + nbytes - 1} and got {len(data)} bytes: the "
                             f"server ignores HTTP Range requests; serve the shards from a store or server with "
                             f"range support (S3, GCS, nginx, ...)")
        if len(data) != nbytes:
            raise ValueError(f"short read at offset {offset} of {loc}: {len(data)} of {nbytes} bytes (truncated "
                             f"shard?)")
        return data
