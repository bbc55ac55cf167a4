"""CP=2 with PP=2 (4 ranks) trains like CP=1, PP=1: same start weights, same data → the 3 step losses within
1e-5 relative (fp32, gloo), through the trainer (zigzag split of labels/positions/merged embeddings per sample)."""

import pytest

from megatron_mmpl.parallel.spawn import run_distributed
from tests.distributed.train_helpers import overrides, run_training, save_start_checkpoint

pytestmark = pytest.mark.distributed

STEPS = 3


def test_cp2_pp2_follows_cp1(tmp_path):
    start = str(tmp_path / "start")
    run_distributed(save_start_checkpoint, 1, start)
    runs = {}
    for name, world, extra in (("ref", 1, []), ("cp2pp2", 4, ["parallel.cp=2", "parallel.pp=2"])):
        args = overrides(str(tmp_path), f"checkpoint.load={start}", f"schedule.train_steps={STEPS}",
                         f"run_dir={tmp_path / name}", *extra)
        runs[name] = run_distributed(run_training, world, args, timeout=400)
    ref = runs["ref"][0]["losses"]
    assert sorted(ref) == list(range(1, STEPS + 1))
    for rank, r in enumerate(runs["cp2pp2"]):
        for step, loss in ref.items():
            rel = abs(r["losses"][step] - loss) / abs(loss)
            assert rel <= 1e-5, (rank, step, r["losses"][step], loss)
