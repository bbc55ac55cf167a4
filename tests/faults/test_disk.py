"""A full disk, for real: a small tmpfs as checkpoint.save. Too little room is refused before any compute; a save
that hits ENOSPC removes its .partial, keeps the previous checkpoint and stops with one line; a stale .partial left
by a killed save is cleaned at start-up, so the restart has its room back."""

from __future__ import annotations

import subprocess

import pytest

from megatron_mmpl.storage.checkpoint_dir import complete_steps, latest_step
from tests.child_env import stderr_lines
from tests.distributed.train_helpers import overrides
from tests.faults.trainer import RECIPE, cli_in_a_rank
from tests.requires import skip_or_fail

pytestmark = pytest.mark.integration
ONE_CHECKPOINT = 5.9  # MiB: the tiny model's checkpoint (fp32 weights + master + Adam, tokenizer files)


@pytest.fixture
def small_disk(tmp_path):
    """A mounted tmpfs of the requested size in MiB (root only; CI runs as root)."""
    mounts = []

    def make(mib: float):
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mib * 1024)}k", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            skip_or_fail(f"cannot mount a tmpfs here ({r.stderr.strip()}): the disk-full tests need root")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _one_error(r: dict) -> str:
    err = stderr_lines(r["err"])
    assert len(err) == 1, err
    return err[0]


def test_too_little_room_is_refused_before_compute(tmp_path, small_disk):
    disk = small_disk(2)
    args = overrides(str(tmp_path), f"run_dir={tmp_path / 'run'}", f"checkpoint.save={disk}")
    r = cli_in_a_rank(["train", "--config", RECIPE, *args])
    assert r["rc"] == 2
    line = _one_error(r)
    assert f"checkpoint.save='{disk}' has" in line and "MiB free, one checkpoint of this model takes ~" in line
    assert "point checkpoint.save at a larger filesystem" in line
    assert not (tmp_path / "run" / "losses.tsv").exists()


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, small_disk):
    disk = small_disk(1.6 * ONE_CHECKPOINT)  # room for one checkpoint, not for the next beside it
    args = overrides(str(tmp_path), f"run_dir={tmp_path / 'run'}", f"checkpoint.save={disk}",
                     "schedule.train_steps=6", "checkpoint.interval=2", "checkpoint.keep_last=1")
    r = cli_in_a_rank(["train", "--config", RECIPE, *args])
    assert r["rc"] == 2
    line = _one_error(r)
    assert "saving step 4 failed: " in line and f"(the filesystem of {disk} is full: " in line, line
    assert f"removed {disk}/iter_0000004.partial" in line and f"stays: {disk}/iter_0000002" in line, line
    assert complete_steps(str(disk)) == [2] and latest_step(str(disk)) == 2
    assert sorted(p.name for p in disk.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def test_a_stale_partial_is_cleaned_at_start_up(tmp_path, small_disk):
    disk = small_disk(1.6 * ONE_CHECKPOINT)
    stale = disk / "iter_0000007.partial"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"\0" * int(0.9 * ONE_CHECKPOINT * 2**20))  # a killed save's leftovers
    args = overrides(str(tmp_path), f"run_dir={tmp_path / 'run'}", f"checkpoint.save={disk}",
                     "schedule.train_steps=2", "checkpoint.keep_last=1")
    r = cli_in_a_rank(["train", "--config", RECIPE, *args])
    assert r["rc"] == 0, r["err"][-2000:]
    out = r["out"]
    assert f"removed what interrupted saves left in {disk}: iter_0000007.partial" in out, out
    assert not stale.exists() and complete_steps(str(disk)) == [2]
