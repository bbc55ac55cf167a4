"""WebDataset tar shards by length bucket: `<out>/<bucket>/<task>-NNNNNN.tar` + a per-shard offset index + index.json.

The whole output is written into `<out>.partial` and renamed to `<out>` at the end, so a crashed build never looks
finished (a resumed build keeps its finished shards); index.json (written last) is what the loader trusts. The
per-shard `.idx.json` lists each sample's byte range in its tar, so the loader reads samples by offset (exact
resume without replaying a stream).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

from megatron_mmpl.data.schema import Sample
from megatron_mmpl.data.storage import join, read_bytes, read_many
from megatron_mmpl.storage.atomic import atomic_write, replace_directory

K = 1024
DEFAULT_BUCKET_EDGES = (8 * K, 16 * K, 32 * K, 48 * K, 64 * K, 96 * K, 128 * K, 256 * K, 512 * K)
INDEX_VERSION = 1


def parse_length(s: str | int) -> int:
    """'32k' / '32K' → 32768, '1m' → 1048576, '5000' → 5000."""
    if isinstance(s, int):
        return s
    t = s.strip().lower()
    mult = {"k": K, "m": K * K}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"length {s!r}: use a number of tokens like 32768, 32k or 1m") from None


def bucket_name(edge: int) -> str:
    return f"{edge // K}k" if edge % K == 0 else str(edge)


def bucket_of(n_tokens: int, edges) -> int:
    """Index of the first edge >= n_tokens (bucket i holds (edges[i-1], edges[i]])."""
    for i, e in enumerate(edges):
        if n_tokens <= e:
            return i
    raise ValueError(f"sample of {n_tokens} tokens is longer than the largest bucket edge {edges[-1]}; add an edge")


class ShardWriter:
    """Routes samples to `<bucket>/<task>-NNNNNN.tar` by exact token length; call close() to publish.

    Everything is written under `<out>.partial` (locked against a second writer). `resume=True` keeps the finished
    shards found there (a `.tar` beside its `.idx.json`; their keys are in `self.keys`) and removes half-written
    ones; `params` must then equal the ones the partial output was started with.
    """

    def __init__(self, out: str | os.PathLike, *, bucket_edges=DEFAULT_BUCKET_EDGES, shard_bytes: int = 256 << 20,
                 info: dict | None = None, overwrite: bool = False, resume: bool = False, params: dict | None = None):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass --overwrite (overwrite=True) to replace it")
        self.tmp = self.out.with_name(f"{self.out.name}.partial")
        self.edges = tuple(sorted(int(e) for e in bucket_edges))
        self.shard_bytes = shard_bytes
        self.info = dict(info or {})
        self._open: dict[tuple[str, str], dict] = {}
        self._count: dict[tuple[str, str], int] = {}
        self.shards: list[dict] = []
        self.keys: set[str] = set()
        params = json.loads(json.dumps(dict(params or {}, bucket_edges=list(self.edges))))
        if resume and (self.tmp / "params.json").exists():
            self._lock()
            saved = json.loads((self.tmp / "params.json").read_text())
            diff = sorted(k for k in set(saved) | set(params) if saved.get(k) != params.get(k))
            if diff:
                raise ValueError(f"--resume: {self.tmp} was started with other settings ({', '.join(diff)}: "
                                 f"{[saved.get(k) for k in diff]} then, {[params.get(k) for k in diff]} now); rerun "
                                 f"with the same ones, or without --resume to start over")
            self._adopt_finished()
        else:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
            self._lock()
            atomic_write(self.tmp / "params.json", json.dumps(params, indent=1))

    def _lock(self) -> None:

        self._lock_file = open(self.tmp / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{self.tmp} is being written by another build; wait for it or choose another "
                               f"--out") from None

    def _adopt_finished(self) -> None:
        """Keep finished shards of an interrupted run; delete the half-written rest."""
        for p in self.tmp.rglob("*"):
            if p.name.endswith(".part") or ".tmp" in p.name:
                p.unlink()
        for idx in sorted(self.tmp.glob("*/*.idx.json")):
            rel_tar = idx.relative_to(self.tmp).as_posix()[: -len(".idx.json")] + ".tar"
            if not (self.tmp / rel_tar).exists():
                idx.unlink()
                continue
            samples = json.loads(idx.read_text())["samples"]
            bucket, name = rel_tar.split("/")
            task, _, n = name[: -len(".tar")].rpartition("-")
            self._count[(bucket, task)] = max(self._count.get((bucket, task), 0), int(n) + 1)
            self.shards.append(dict(path=rel_tar, index=idx.relative_to(self.tmp).as_posix(), bucket=bucket,
                                    task=task, samples=len(samples), tokens=sum(s[3] for s in samples),
                                    bytes=(self.tmp / rel_tar).stat().st_size))
            self.keys.update(s[0] for s in samples)

    def add(self, sample: Sample) -> str:
        """Append a sample; returns its bucket name."""
        if sample.key in self.keys:
            raise ValueError(f"duplicate sample key {sample.key!r}")
        members = sample.to_members()
        bucket = bucket_name(self.edges[bucket_of(sample.n_tokens, self.edges)])
        slot = (bucket, sample.task)
        cur = self._open.get(slot)
        if cur is None:
            cur = self._start(slot)
        start = cur["tar"].offset
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            cur["tar"].addfile(ti, io.BytesIO(data))
        end = cur["tar"].offset
        cur["samples"].append([sample.key, start, end - start, int(sample.n_tokens)])
        self.keys.add(sample.key)
        if end >= self.shard_bytes:
            self._finish(slot)
        return bucket

    def _start(self, slot):
        bucket, task = slot
        n = self._count.get(slot, 0)
        self._count[slot] = n + 1
        rel = f"{bucket}/{task}-{n:06d}.tar"
        (self.tmp / bucket).mkdir(exist_ok=True)
        f = open(self.tmp / (rel + ".part"), "wb")
        cur = dict(rel=rel, file=f, tar=tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT), samples=[])
        self._open[slot] = cur
        return cur

    def _finish(self, slot):
        cur = self._open.pop(slot)
        cur["tar"].close()
        cur["file"].flush()
        os.fsync(cur["file"].fileno())
        cur["file"].close()
        rel = cur["rel"]
        idx = rel[: -len(".tar")] + ".idx.json"
        atomic_write(self.tmp / idx, json.dumps({"samples": cur["samples"]}))
        os.replace(self.tmp / (rel + ".part"), self.tmp / rel)
        bucket, task = slot
        self.shards.append(dict(path=rel, index=idx, bucket=bucket, task=task, samples=len(cur["samples"]),
                                tokens=sum(s[3] for s in cur["samples"]), bytes=(self.tmp / rel).stat().st_size))

    def close(self) -> dict:
        """Finish open shards, write index.json, move the tree into place; returns the index."""
        for slot in list(self._open):
            self._finish(slot)
        index = build_index(self.shards, self.edges, self.info)
        atomic_write(self.tmp / "index.json", json.dumps(index, indent=1))
        (self.tmp / ".lock").unlink()
        self._lock_file.close()
        replace_directory(self.tmp, self.out)
        return index

    def abort(self, keep: bool = False) -> None:
        """Stop writing; `keep` leaves the finished shards for a `resume` (half-written ones are redone)."""
        for cur in self._open.values():
            cur["file"].close()
        self._open.clear()
        self._lock_file.close()
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def build_index(shards: list[dict], edges, info: dict) -> dict:
    buckets = {}
    for i, e in enumerate(edges):
        buckets[bucket_name(e)] = dict(lo=edges[i - 1] + 1 if i else 1, hi=e, samples=0, tokens=0, tasks={})
    for s in sorted(shards, key=lambda s: s["path"]):
        b = buckets[s["bucket"]]
        b["samples"] += s["samples"]
        b["tokens"] += s["tokens"]
        t = b["tasks"].setdefault(s["task"], dict(samples=0, tokens=0))
        t["samples"] += s["samples"]
        t["tokens"] += s["tokens"]
    tasks: dict[str, dict] = {}
    for b in buckets.values():
        for t, c in b["tasks"].items():
            tt = tasks.setdefault(t, dict(samples=0, tokens=0))
            tt["samples"] += c["samples"]
            tt["tokens"] += c["tokens"]
    return dict(
        version=INDEX_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S"), bucket_edges=list(edges), **info,
        samples=sum(b["samples"] for b in buckets.values()), tokens=sum(b["tokens"] for b in buckets.values()),
        bytes=sum(s.get("bytes", 0) for s in shards),
        tasks=tasks, buckets={k: v for k, v in buckets.items() if v["samples"]},
        shards=sorted(shards, key=lambda s: s["path"]),
    )


def load_index(root: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """index.json of a shard directory (a path or a URL)."""

    path = join(root, "index.json")
    try:
        index = json.loads(read_bytes(path, storage_options))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a shard directory, or its build did not finish "
                                f"(run `mmpl data build` / `mmpl data synth` to write one)") from None
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {index.get('version')} != {INDEX_VERSION}; rebuild the shards")
    return index


def load_shard_samples(root: str | os.PathLike, shard: dict) -> list[list]:
    """[[key, offset, nbytes, n_tokens], ...] of one shard."""
    return load_all_shard_samples(root, [shard])[0]


def load_all_shard_samples(root: str | os.PathLike, shards: list[dict],
                           storage_options: dict | None = None) -> list[list[list]]:
    """The offset index of every shard (fetched concurrently from a URL)."""

    return [json.loads(b)["samples"] for b in read_many([join(root, sh["index"]) for sh in shards], storage_options)]


def read_members(f, offset: int, nbytes: int) -> tuple[str, dict[str, bytes]]:
    """The tar members of one sample from an open shard file: (key, {suffix: bytes})."""
    f.seek(offset)
    chunk = f.read(nbytes)
    if len(chunk) != nbytes:
        raise ValueError(f"short read at offset {offset}: {len(chunk)} of {nbytes} bytes (truncated shard?)")
    return parse_members(chunk, offset)


def parse_members(chunk: bytes, offset: int = 0) -> tuple[str, dict[str, bytes]]:
    """(key, {suffix: bytes}) of the tar bytes of one sample (read at `offset`, for messages)."""
    members, key = {}, None
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
        for ti in tar:
            k, _, suffix = ti.name.partition(".")
            if key is None:
                key = k
            elif k != key:
                raise ValueError(f"member {ti.name} at offset {offset} does not belong to sample {key}")
            members[suffix] = tar.extractfile(ti).read()
    if key is None:
        raise ValueError(f"no tar members at offset {offset}")
    return key, members
