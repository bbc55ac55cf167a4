"""`bash examples/quickstart.sh`, slimmed through its env knobs: every stage runs (synth → train → export →
eval → report) and the loss falls. The full run's figures (300 steps, accuracy vs chance) are in the report."""

import json
import subprocess

import pytest
import torch

from tests.child_env import child_env

pytestmark = pytest.mark.integration


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = child_env(MMPL_QUICKSTART_DIR=str(out), MMPL_QUICKSTART_STEPS="30", MMPL_QUICKSTART_DOCS="6",
                    MMPL_QUICKSTART_EVAL_DOCS="2", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(["bash", "examples/quickstart.sh"], env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"] {stage} " in log, stage
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.json").is_file()
    assert (out / "loss_curve.png").stat().st_size > 10_000
    result = json.loads((out / "eval.json").read_text())
    assert result["samples"] == 6 and result["chance"] == pytest.approx(0.25)
    losses = [float(line.split()[1]) for line in (out / "losses.tsv").read_text().splitlines()]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert "held-out retrieval: accuracy" in log and "loss curve:" in log
