"""Checksum manifests of checkpoint directories: `mmpl/manifest.json` maps each file to its size and sha256.

Written when a checkpoint is saved (before `iter_N.partial/` becomes `iter_N/`), checked before it is loaded or
exported. A checkpoint written before manifests existed is accepted with a warning: it cannot be verified.
Hashing and checking split the files over ranks round-robin (sorted list, file i on rank i % world_size).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
import torch.distributed as dist

from megatron_mmpl.storage.atomic import atomic_write

log = logging.getLogger(__name__)

MANIFEST = "mmpl/manifest.json"
FORMAT = 1


class CheckpointCorrupt(ValueError):
    """A checkpoint that is damaged or incomplete (a ValueError, so the CLI prints it as one line)."""


def file_digest(path: str) -> dict:
    """{"size", "sha256"} of one file, read in blocks (memory stays flat for any file size)."""
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": sha}


def checkpoint_files(root: str) -> list[str]:
    """Every file under `root` as a sorted relative path, the manifest itself excepted."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def my_share(items: list, rank: int, world_size: int) -> list:
    """This rank's round-robin slice of a sorted list."""
    return [x for i, x in enumerate(items) if i % world_size == rank]


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def hash_shared(root: str) -> dict[str, dict]:
    """Collective: every rank hashes its share of `root`'s files (rank 0's listing); rank 0 gets all digests,
    the other ranks an empty dict."""
    rank, world = _world()
    files = [checkpoint_files(root) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(files, src=0)
    mine = {rel: file_digest(os.path.join(root, rel)) for rel in my_share(files[0], rank, world)}
    if world == 1:
        return mine
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()} if rank == 0 else {}


def write_manifest(root: str, digests: dict[str, dict] | None = None) -> dict:
    """Write `root/mmpl/manifest.json` (one process): `digests` from `hash_shared`, plus files not in it (those
    written after the shared hashing, e.g. the run config) hashed here. Returns the manifest."""
    files = {rel: (digests or {}).get(rel) or file_digest(os.path.join(root, rel)) for rel in checkpoint_files(root)}
    manifest = {"format": FORMAT, "files": files}
    os.makedirs(os.path.dirname(os.path.join(root, MANIFEST)), exist_ok=True)
    atomic_write(os.path.join(root, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(root: str) -> dict | None:
    """The manifest of checkpoint `root`, or None when it has none (written before manifests existed)."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointCorrupt(f"corrupt checkpoint: {path} is unreadable ({e})") from None
    return manifest


def file_problem(root: str, rel: str, expected: dict) -> str | None:
    """Why file `rel` of checkpoint `root` does not match its manifest entry (None: it matches)."""
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != expected["size"]:
        return f"{path} has {size} bytes, the manifest says {expected['size']}"
    if file_digest(path)["sha256"] != expected["sha256"]:
        return f"{path} has a different sha256 than the manifest (corrupted bytes)"
    return None


def files_problem(root: str, rels: list[str]) -> str | None:
    """Why some of the files `rels` of checkpoint `root` do not match its manifest (one process; None: they match,
    or there is no manifest to check them against)."""
    try:
        manifest = read_manifest(root)
    except CheckpointCorrupt as e:
        return str(e)
    for rel in rels if manifest else ():
        problem = file_problem(root, rel, manifest["files"][rel]) if rel in manifest["files"] else None
        if problem:
            return f"corrupt checkpoint: {problem}"
    return None


def verify_checkpoint(root: str) -> bool:
    """Check every file of checkpoint `root` against its manifest on all ranks together (each hashes its share;
    collective when torch.distributed is initialized). True: verified; False: no manifest (a warning is logged);
    raises CheckpointCorrupt with the first bad file's reason. Files the manifest does not list are ignored."""
    reason = None
    try:
        manifest = read_manifest(root)
    except CheckpointCorrupt as e:
        manifest, reason = None, str(e)
    if manifest is None and reason is None:
        if _world()[0] == 0:
            log.warning("checkpoint %s has no %s (saved before checksums existed): it cannot be verified", root,
                        MANIFEST)
        return False
    if reason is None:
        rank, world = _world()
        entries = sorted(manifest["files"].items())
        for rel, expected in my_share(entries, rank, world):
            problem = file_problem(root, rel, expected)
            if problem:
                reason = f"corrupt checkpoint: {problem}"
                break
    reason = first_reason(reason)
    if reason:
        raise CheckpointCorrupt(reason)
    return True


def first_reason(reason: str | None) -> str | None:
    """Collective: the lowest rank's non-None `reason`, the same on every rank (None when no rank has one).
    A MAX all-reduce of a bad flag first, so a healthy check costs one small all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    flag = torch.tensor([1.0 if reason else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return None
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next(r for r in reasons if r)
