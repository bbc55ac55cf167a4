"""The loader never spins: a mixture where every sample is longer than max_seq_len stops at start-up with one line
(it used to spin at 100 % CPU ignoring SIGTERM); over-long samples that are skipped are counted in the log; a
resume truncates losses.tsv and metrics.jsonl to the resumed step, so no step appears twice."""

from __future__ import annotations

import json
import time

import pytest

from tests.child_env import stderr_lines
from tests.distributed.train_helpers import overrides
from tests.faults.trainer import RECIPE, cli_in_a_rank

pytestmark = pytest.mark.integration


def test_every_sample_too_long_is_one_line_at_start_up(tmp_path):
    args = overrides(str(tmp_path), f"run_dir={tmp_path / 'run'}", "data.max_seq_len=128")
    t0 = time.monotonic()
    r = cli_in_a_rank(["train", "--config", RECIPE, *args])
    assert r["rc"] == 2
    err = stderr_lines(r["err"])
    assert len(err) == 1 and "is longer than data.max_seq_len=128" in err[0] and "raise data.max_seq_len" in err[0]
    assert time.monotonic() - t0 < 120


def test_skipped_samples_are_counted_and_a_resume_truncates_the_logs(tmp_path):
    run = tmp_path / "run"
    # the needle shards hold samples of ~256 and ~512 tokens: at max_seq_len 384 the long half is skipped
    args = overrides(str(tmp_path), f"run_dir={run}", "data.max_seq_len=384", "checkpoint.interval=2")
    r = cli_in_a_rank(["train", "--config", RECIPE, *args, "schedule.train_steps=4"])
    assert r["rc"] == 0, r["err"][-2000:]
    out = r["out"]
    assert "over-long" in out and "samples over data.max_seq_len" in out, out
    m = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["skipped_long"] > 0
    # steps 3-4 happened after the last checkpoint we keep: drop it, as if the run died before saving step 4
    import shutil

    shutil.rmtree(run / "checkpoints" / "iter_0000004")
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2")
    assert cli_in_a_rank(["train", "--config", RECIPE, *args, "schedule.train_steps=4"])["rc"] == 0
    steps = [int(ln.split("\t")[0]) for ln in (run / "losses.tsv").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
