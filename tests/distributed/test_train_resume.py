"""Exact resume: 2N steps straight == N steps + save + fresh-process resume + N steps (losses and final weights
bit-identical on CPU fp32, with 2 loader workers); the same checkpoint resumed at TP=2 follows within 1e-5
(different reduction order, so not bit-equal); keep-last-K and the tracker; the same exactness with torch's fused
AdamW kernel (what CUDA runs), its flag and step counters carried through the checkpoint."""

import os
import shutil

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed
from megatron_mmpl.training.checkpoint import TRACKER, complete_steps, latest_step
from tests.distributed.train_helpers import merged_weights, overrides, run_training

pytestmark = pytest.mark.distributed

N = 3


def test_resume_is_exact_and_reshards_to_tp2(tmp_path):
    common = overrides(str(tmp_path), f"schedule.train_steps={2 * N}", "optim.warmup=0", "data.num_workers=2")
    (straight,) = run_distributed(run_training, 1, [*common, f"run_dir={tmp_path / 'straight'}"])

    split = [*common, f"run_dir={tmp_path / 'split'}", "checkpoint.interval=1", "checkpoint.keep_last=2"]
    (first,) = run_distributed(run_training, 1, split, N)
    ckpt_dir = str(tmp_path / "split" / "checkpoints")
    assert first["step"] == N and latest_step(ckpt_dir) == N
    assert complete_steps(ckpt_dir) == [N - 1, N]  # keep_last=2 removed the older ones
    assert open(os.path.join(ckpt_dir, TRACKER)).read().strip() == str(N)
    assert os.path.isfile(os.path.join(ckpt_dir, f"iter_{N:07d}", "mmpl", "config.yaml"))
    at_n = str(tmp_path / "at_n")
    shutil.copytree(ckpt_dir, at_n)

    # The same run dir again, in fresh processes: it resumes from step N and finishes.
    (second,) = run_distributed(run_training, 1, [*split, "checkpoint.interval=1000"])
    assert sorted(second["losses"]) == list(range(N + 1, 2 * N + 1))
    for step in range(N + 1, 2 * N + 1):
        assert second["losses"][step] == straight["losses"][step], step
    for n, w in straight["weights"].items():
        assert torch.equal(second["weights"][n], w), n

    # Resume step N of that run at TP=2 (checkpoint.load names another run's checkpoint dir: full resume).
    tp2 = run_distributed(run_training, 2, [*common, f"run_dir={tmp_path / 'tp2'}", f"checkpoint.load={at_n}",
                                            "parallel.tp=2"])
    weights = merged_weights(tp2)
    for r in tp2:
        assert sorted(r["losses"]) == list(range(N + 1, 2 * N + 1))
        for step in range(N + 1, 2 * N + 1):
            assert abs(r["losses"][step] - straight["losses"][step]) <= 1e-5 * abs(straight["losses"][step])
    for n, w in straight["weights"].items():
        assert (weights[n] - w).norm() <= 1e-4 * w.norm(), n


def _train_with_fused_adam(args, max_steps=None):
    """run_training with torch's fused AdamW on CPU too (compat/optimizer.py switches it on for CUDA only), and
    the inner optimizer's fused flags and step counters after the run."""
    from megatron_mmpl.compat import optimizer as compat_optimizer
    from megatron_mmpl.config import load_config
    from megatron_mmpl.models.qwen25vl.build import gather_full_weights
    from megatron_mmpl.training.train import train

    compat_optimizer.FUSED_ADAM_DEVICES = ("cuda", "cpu")
    r = train(load_config(None, args), max_steps=max_steps)
    inner = r.optimizer.chained_optimizers[0].optimizer
    return {"losses": r.losses, "weights": gather_full_weights(r.model),
            "fused": sorted({bool(g.get("fused")) for g in inner.param_groups}),
            "steps": sorted({float(s["step"]) for s in inner.state.values()})}


def test_resume_is_exact_with_the_fused_adam_kernel(tmp_path):
    common = overrides(str(tmp_path), f"schedule.train_steps={2 * N}", "optim.warmup=0")
    (straight,) = run_distributed(_train_with_fused_adam, 1, [*common, f"run_dir={tmp_path / 'straight'}"])
    assert straight["fused"] == [True] and straight["steps"] == [2.0 * N]
    split = [*common, f"run_dir={tmp_path / 'split'}", f"checkpoint.interval={N}"]
    (first,) = run_distributed(_train_with_fused_adam, 1, split, N)
    assert first["steps"] == [float(N)]
    (second,) = run_distributed(_train_with_fused_adam, 1, split)
    assert second["fused"] == [True] and second["steps"] == [2.0 * N]  # restored at N, then N more updates
    for step in range(N + 1, 2 * N + 1):
        assert second["losses"][step] == straight["losses"][step], step
    for n, w in straight["weights"].items():
        assert torch.equal(second["weights"][n], w), n
