"""Checksum manifests: a round trip verifies; each damage (missing, resized, changed bytes, unreadable manifest)
is one reason naming the file; unknown extra files pass; no manifest is a warning. Across 2 gloo ranks the files
are hashed and checked in round-robin shares and every rank raises the same first reason."""

import json
import logging
import os

import pytest

from megatron_mmpl.parallel.spawn import run_distributed
from megatron_mmpl.storage import integrity
from megatron_mmpl.storage.integrity import MANIFEST, CheckpointCorrupt, verify_checkpoint, write_manifest

pytestmark = pytest.mark.unit


def _checkpoint(root) -> str:
    (root / "mmpl").mkdir(parents=True)
    for name, data in (("__0_0.distcp", b"a" * 1000), ("__0_1.distcp", b"b" * 999), (".metadata", b"meta"),
                       ("mmpl/rng_r0.pt", b"rng")):
        (root / name).write_bytes(data)
    return str(root)


def test_manifest_round_trip_lists_every_file_but_itself(tmp_path):
    root = _checkpoint(tmp_path / "c")
    manifest = write_manifest(root)
    on_disk = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert on_disk == manifest and manifest["format"] == integrity.FORMAT
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "__0_1.distcp", "mmpl/rng_r0.pt"]
    assert manifest["files"]["__0_1.distcp"]["size"] == 999
    assert manifest["files"][".metadata"]["sha256"] == integrity.hashlib.sha256(b"meta").hexdigest()
    assert verify_checkpoint(root) is True
    (tmp_path / "c" / "extra.log").write_text("unknown files are fine")
    assert verify_checkpoint(root) is True


def test_known_digests_are_taken_and_the_rest_hashed(tmp_path):
    root = _checkpoint(tmp_path / "c")
    fake = {"size": 1000, "sha256": "0" * 64}
    assert write_manifest(root, {"__0_0.distcp": fake})["files"]["__0_0.distcp"] == fake
    assert integrity.hash_shared(root) == write_manifest(root)["files"]  # one process hashes them all


@pytest.mark.parametrize("damage, reason", [
    (lambda c: os.remove(c / "__0_1.distcp"), "__0_1.distcp is missing"),
    (lambda c: os.truncate(c / "__0_0.distcp", 10), "__0_0.distcp has 10 bytes, the manifest says 1000"),
    (lambda c: (c / "mmpl" / "rng_r0.pt").write_bytes(b"RNG"), "rng_r0.pt has a different sha256"),
])
def test_each_damage_is_one_reason_naming_the_file(tmp_path, damage, reason):
    root = _checkpoint(tmp_path / "c")
    write_manifest(root)
    damage(tmp_path / "c")
    with pytest.raises(CheckpointCorrupt, match="^corrupt checkpoint: ") as e:
        verify_checkpoint(root)
    assert reason in str(e.value) and "\n" not in str(e.value)
    assert str(tmp_path / "c") in str(e.value)


@pytest.mark.parametrize("text", ["{not json", '{"format": 99, "files": {}}', '{"format": 1}', "\xff"])
def test_unreadable_manifest_is_corrupt(tmp_path, text):
    root = _checkpoint(tmp_path / "c")
    (tmp_path / "c" / MANIFEST).write_text(text)
    with pytest.raises(CheckpointCorrupt, match=f"{MANIFEST} is unreadable"):
        verify_checkpoint(root)


def test_no_manifest_is_accepted_with_a_warning(tmp_path, caplog):
    root = _checkpoint(tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="megatron_mmpl.storage.integrity"):
        assert verify_checkpoint(root) is False
    assert len(caplog.records) == 1 and "cannot be verified" in caplog.records[0].getMessage()


def test_round_robin_shares_cover_each_item_once():
    items = list(range(11))
    shares = [integrity.my_share(items, r, 3) for r in range(3)]
    assert shares[1] == [1, 4, 7, 10] and sorted(sum(shares, [])) == items


def _two_ranks(root: str) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    digests = integrity.hash_shared(root)
    if rank == 0:
        write_manifest(root, digests)
    dist.barrier()
    ok = verify_checkpoint(root)
    dist.barrier()
    if rank == 0:  # sorted files: .metadata, __0_0, __0_1, mmpl/rng_r0.pt → __0_0.distcp is in rank 1's share
        with open(os.path.join(root, "__0_0.distcp"), "r+b") as f:
            f.write(b"X")
    dist.barrier()
    try:
        verify_checkpoint(root)
        reason = None
    except CheckpointCorrupt as e:
        reason = str(e)
    return {"digests": sorted(digests), "ok": ok, "reason": reason}


@pytest.mark.distributed
def test_two_ranks_share_the_hashing_and_agree_on_the_reason(tmp_path):
    root = _checkpoint(tmp_path / "c")
    r0, r1 = run_distributed(_two_ranks, 2, root)
    assert r0["digests"] == [".metadata", "__0_0.distcp", "__0_1.distcp", "mmpl/rng_r0.pt"] and r1["digests"] == []
    assert r0["ok"] is r1["ok"] is True
    assert r0["reason"] == r1["reason"] and "__0_0.distcp has a different sha256" in r0["reason"]


def test_files_problem_checks_only_the_named_files(tmp_path):
    root = _checkpoint(tmp_path / "c")
    assert integrity.files_problem(root, [".metadata"]) is None  # no manifest: nothing to check against
    write_manifest(root)
    (tmp_path / "c" / "__0_0.distcp").write_bytes(b"x")
    assert integrity.files_problem(root, [".metadata", "mmpl/rng_r0.pt", "not/listed"]) is None
    assert "__0_0.distcp has 1 bytes" in integrity.files_problem(root, [".metadata", "__0_0.distcp"])
