"""Every expected failure reaches the user as one `mmpl <cmd>: error:` line naming the file and a fix, exit 2;
--debug re-raises it with its traceback: an unwritable or full run_dir, shards that no longer decode, a corrupt
dist checkpoint or safetensors file. We run as root, so permission failures are also simulated (os.makedirs)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from megatron_mmpl.cli import main
from megatron_mmpl.data.shards import load_index, load_shard_samples
from megatron_mmpl.models.qwen25vl.presets import preset_dict
from tests.child_env import child_env
from tests.distributed.train_helpers import needle_shards, overrides

pytestmark = pytest.mark.integration

RECIPE = "examples/recipes/quickstart.yaml"
ENV = child_env()


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def _train_args(tmp_path, run) -> list[str]:
    return ["train", "--config", RECIPE, *overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=2")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions (the simulated test covers it)")
def test_read_only_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir(mode=0o500)
    line = _one_line(capsys, _train_args(tmp_path, run))
    assert line.startswith("mmpl train: error: ") and str(run) in line and "make the directory writable" in line


@pytest.mark.parametrize("code, fix", [
    (errno.EACCES, "make the directory writable, or choose another run_dir / --out"),
    (errno.EROFS, "make the directory writable, or choose another run_dir / --out"),
    (errno.ENOSPC, "free space there, or point checkpoint.save / run_dir / --out at another filesystem"),
])
def test_unwritable_or_full_run_dir_is_one_line(tmp_path, capsys, monkeypatch, code, fix):
    run = tmp_path / "run"
    real = os.makedirs

    def makedirs(path, *a, **kw):
        if os.fspath(path) == str(run):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real(path, *a, **kw)

    args = _train_args(tmp_path, run)  # builds the shards before the patch
    monkeypatch.setattr(os, "makedirs", makedirs)
    line = _one_line(capsys, args)
    assert line == f"mmpl train: error: {run}: {os.strerror(code)}; {fix}"
    with pytest.raises(OSError) as e:
        main([*args, "--debug"])
    assert e.value.errno == code


def test_run_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    run = tmp_path / "file" / "run"
    line = _one_line(capsys, _train_args(tmp_path, run))
    assert line == f"mmpl train: error: {run}: Not a directory"


def _garbled_shards(tmp_path) -> str:
    """Needle shards whose every sample's JSON header is overwritten (as in tests/unit/data/test_loader.py)."""
    bad = tmp_path / "bad"
    shutil.copytree(needle_shards(str(tmp_path / "shards")), bad)
    for sh in load_index(bad)["shards"]:
        for _, off, _, _ in load_shard_samples(bad, sh):
            with open(bad / sh["path"], "r+b") as f:
                f.seek(off + 512)
                f.write(b"\xff" * 16)
    return str(bad)


def test_decode_abort_from_a_loader_worker_is_one_line(tmp_path):
    bad = _garbled_shards(tmp_path)
    argv = [sys.executable, "-m", "megatron_mmpl.cli", *_train_args(tmp_path, tmp_path / "run"), f"data.shards={bad}",
            "data.num_workers=1", "data.max_consecutive_failures=2"]
    out = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("mmpl train: error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert errors[0].startswith("mmpl train: error: 2 consecutive samples failed to decode (last: ")
    assert f"the shards under {bad} look corrupt" in errors[0] and "rebuild them (`mmpl data build`)" in errors[0]
    assert ".tar:" in errors[0]  # the shard file of the last bad sample
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, env=ENV, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DecodeAbort" in debug.stderr


def test_corrupt_safetensors_is_one_line(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(preset_dict("tiny")))
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # header cut off
    argv = ["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "out")]
    line = _one_line(capsys, argv)
    assert line.startswith(f"mmpl convert: error: --hf {hf / 'model.safetensors'}: damaged safetensors file (Error "
                           "while deserializing header"), line
    assert "re-download the checkpoint" in line
    with pytest.raises(ValueError, match="damaged safetensors file"):
        main(["convert", "--debug", *argv[1:]])


def test_corrupt_dist_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    """megatron's CheckpointingException from our loader (models/qwen25vl/build.py), the checkpoint named."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from megatron_mmpl.conversion import commands
    from megatron_mmpl.models.qwen25vl.build import load_model_weights

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    monkeypatch.setattr(commands, "_verify", lambda args: load_model_weights(
        str(ckpt), types.SimpleNamespace(sharded_state_dict=dict)))
    argv = ["convert", "verify", "--hf", str(tmp_path), "--ckpt", str(ckpt)]
    line = _one_line(capsys, argv)
    assert line.startswith(f"mmpl convert: error: checkpoint {ckpt}: ") and "resume from an earlier iter_*" in line
    with pytest.raises(CheckpointingException):
        main(["convert", "--debug", *argv[1:]])
