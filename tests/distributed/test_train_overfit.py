"""The loop learns: the tiny Qwen2.5-VL overfits two fixed visual-needle samples (answer loss < 10% of initial);
weight decay applies to matrices only (not norms, not biases)."""

import pytest

from megatron_mmpl.parallel.spawn import run_distributed
from tests.distributed.train_helpers import needle_shards, overrides, run_training

pytestmark = pytest.mark.distributed

STEPS = 40


def test_tiny_model_overfits_a_small_fixed_set(tmp_path):
    shards = needle_shards(str(tmp_path / "two"), per_target=2, targets=(256,))
    args = overrides(str(tmp_path), f"data.shards={shards}", f"schedule.train_steps={STEPS}", "optim.lr=5e-3",
                     "optim.min_lr=5e-4", "optim.warmup=3", "optim.weight_decay=0", "data.global_batch_size=1",
                     "data.max_seq_len=512", "logging.interval=10", f"run_dir={tmp_path / 'run'}")
    (r,) = run_distributed(run_training, 1, args)
    first, last = r["losses"][1], r["losses"][STEPS]
    assert first > 5.0  # ~ln(512): the answer is not known at the start
    assert last < 0.1 * first, (first, last)
    # weight decay on matrices only: never on norms or biases
    wd = r["weight_decay"]
    assert len(wd) == len(r["weights"])
    for name, mult in wd.items():
        is_matrix = r["weights"][name].dim() >= 2
        assert mult == (1.0 if is_matrix else 0.0), (name, mult)
        assert is_matrix or name.endswith(".bias") or "norm" in name, name
