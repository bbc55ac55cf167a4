"""`mmpl train` from the command line: one-line config errors and missing inputs before any compute; a stop
signal sent to one of two ranks makes both finish the step, save a complete checkpoint and exit 0."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from megatron_mmpl.cli import main
from megatron_mmpl.models.qwen25vl.presets import preset_dict
from megatron_mmpl.training.checkpoint import latest_step
from tests.child_env import child_env
from tests.distributed.train_helpers import overrides

pytestmark = pytest.mark.integration

RECIPE = "examples/recipes/quickstart.yaml"


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("override, expected", [
    ("parallel.tp=3", "config error: parallel.tp*pp*cp=3*1*1=3 does not divide the world size 1"),
    ("optim.lr=fast", "config error: optim.lr='fast' must be a number"),
    ("optim.betass=0.9", "config error: unknown key optim.betass (did you mean optim.beta"),
    ("model.recompute=most", "config error: model.recompute='most' must be one of auto | none | selective | full"),
    ("model.dtype=bf16", "config error: model.dtype=bf16 needs a GPU; on CPU set model.dtype=fp32"),
])
def test_bad_config_is_one_line_naming_the_field(tmp_path, capsys, override, expected):
    args = overrides(str(tmp_path), f"run_dir={tmp_path / 'run'}")
    line = _error_line(capsys, ["train", "--config", RECIPE, *args, override])
    assert line.startswith("mmpl train: error: ") and expected in line, line
    assert not (tmp_path / "run").exists() and not dist.is_initialized()


def test_missing_inputs_fail_before_compute(tmp_path, capsys):
    run = tmp_path / "run"
    line = _error_line(capsys, ["train", "--config", RECIPE, f"data.shards={tmp_path / 'none'}", f"run_dir={run}"])
    assert "data.shards=" in line and "does not exist" in line and "mmpl data build" in line
    args = overrides(str(tmp_path), f"run_dir={run}")
    line = _error_line(capsys, ["train", "--config", RECIPE, *args, f"checkpoint.load={tmp_path / 'ckpt'}"])
    assert f"checkpoint.load='{tmp_path / 'ckpt'}' does not exist" in line
    (tmp_path / "empty").mkdir()
    line = _error_line(capsys, ["train", "--config", RECIPE, *args, f"checkpoint.load={tmp_path / 'empty'}"])
    assert "holds no complete checkpoint" in line
    # a converted checkpoint of another shape than model.hf_config (its own config.json travels in mmpl/hf/)
    other = tmp_path / "other-ckpt"
    (other / "mmpl" / "hf").mkdir(parents=True)
    (other / "metadata.json").write_text("{}")
    cfg = preset_dict("tiny")
    cfg["vision_config"]["intermediate_size"] = 96
    (other / "mmpl" / "hf" / "config.json").write_text(json.dumps(cfg))
    line = _error_line(capsys, ["train", "--config", RECIPE, *args, f"checkpoint.load={other}"])
    assert "model.hf_config='tiny' does not describe the checkpoint" in line, line
    assert "vision_config.intermediate_size: 64 vs 96" in line and f"model.hf_config: {other}/mmpl/hf" in line
    line = _error_line(capsys, ["train", "--config", RECIPE, *args, "data.min_len=600", "data.max_len=700"])
    assert line.startswith("mmpl train: error: config error: data.recipe/min_len/max_len/task_weights: ")
    line = _error_line(capsys, ["train", "--config", RECIPE, *args, "model.hf_overrides={vocab_size: 256}"])
    assert "vocab_size is 256" in line or "other special ids" in line
    assert not run.exists() and not dist.is_initialized()
    assert main(["train", "--config", RECIPE, *args, "--check"]) == 0
    assert "config ok; start: fresh" in capsys.readouterr().out


def test_signal_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=500", "checkpoint.interval=1000",
                     "data.global_batch_size=2", "parallel.tp=2")
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "megatron_mmpl.cli", "train", "--config", RECIPE, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/500"):
                break
            assert time.monotonic() < deadline, "".join(lines[-20:])
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        os.kill(int(ranks[1]), signal.SIGUSR1)  # one rank only: the other learns it through the all-reduce
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines.append(out)
    log = "".join(lines)
    assert proc.returncode == 0, log[-3000:]
    assert "stop signal: saved step" in log and "stopped by signal at step" in log
    step = latest_step(str(run / "checkpoints"))
    assert step is not None and 3 <= step < 500, log[-2000:]
