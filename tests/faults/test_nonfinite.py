"""Non-finite steps: one NaN gradient is skipped (no optimizer update, the schedule holds) and counted; an
exploding run (optim.lr=1e6) stops after optim.max_bad_steps in a row with one line; no checkpoint is written from
a non-finite step; NaN is logged as NaN."""

from __future__ import annotations

import json
import math

import pytest

from megatron_mmpl.storage.checkpoint_dir import complete_steps
from megatron_mmpl.training import train as train_mod
from tests.child_env import stderr_lines
from tests.distributed.train_helpers import overrides
from tests.faults.trainer import RECIPE, cli_in_a_rank

pytestmark = pytest.mark.integration


def _losses(run) -> dict[int, float]:
    rows = [ln.split("\t") for ln in (run / "losses.tsv").read_text().splitlines() if ln.strip()]
    return {int(s): float(v) for s, v in rows}


def _metrics(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def poison_third_gradient() -> None:
    """In the trainer's process: micro-batch 3 (step 2 of 2 micro-batches each) gets a NaN gradient."""
    wrap = train_mod.wrap_ddp
    calls = {"n": 0}

    def poisoned(module, cfg):
        def hook(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == 3 else grad

        next(p for p in module.parameters() if p.requires_grad).register_hook(hook)
        return wrap(module, cfg)

    train_mod.wrap_ddp = poisoned


def test_one_nan_gradient_is_skipped_and_counted(tmp_path):
    run = tmp_path / "run"
    args = overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=4", "checkpoint.interval=2",
                     "checkpoint.keep_last=0", "optim.warmup=0", "optim.decay_style=linear")
    r = cli_in_a_rank(["train", "--config", RECIPE, *args], setup=poison_third_gradient)
    assert r["rc"] == 0, r["err"][-2000:]
    out = r["out"]
    assert "step 2: non-finite loss or gradient" in out and "1 in a row, optim.max_bad_steps=5" in out, out
    assert "skipped in this run: 1 non-finite step(s)" in out, out
    m = {r["step"]: r for r in _metrics(run)}
    assert m[2]["bad_steps"] == 1 and math.isnan(m[2]["grad_norm"]) and m[3]["bad_steps"] == 0
    assert m[3]["lr"] == m[2]["lr"] < m[1]["lr"], "the scheduler did not advance on the skipped step"
    assert "non-finite steps 1" in out and "grad nan" in out
    assert complete_steps(str(run / "checkpoints")) == [3, 4], "the save due at step 2 waited for a finite step"


def test_an_exploding_run_stops_after_max_bad_steps_without_saving(tmp_path):
    run = tmp_path / "run"
    args = overrides(str(tmp_path), f"run_dir={run}", "schedule.train_steps=60", "checkpoint.interval=1",
                     "checkpoint.keep_last=0", "optim.lr=1e6", "optim.clip_grad=0", "optim.max_bad_steps=3")
    r = cli_in_a_rank(["train", "--config", RECIPE, *args])
    assert r["rc"] == 2
    err = stderr_lines(r["err"])
    assert len(err) == 1 and "3 steps in a row" in err[0] and "lower optim.lr" in err[0], r["err"][-2000:]
    losses, bad = _losses(run), {r["step"] for r in _metrics(run) if r["bad_steps"]}
    assert len(bad) >= 3 and max(losses) < 60, (bad, losses)
    assert all(math.isnan(r["grad_norm"]) for r in _metrics(run) if r["step"] in bad)
    saved = complete_steps(str(run / "checkpoints"))
    assert saved and not set(saved) & bad, (saved, bad)
