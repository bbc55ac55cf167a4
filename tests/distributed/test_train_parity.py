"""TP=2 (with sequence parallel, full recompute, the ViT's first block recomputed and the rest kept) and PP=2
(1 of 4 LM layers on the ViT stage, selective recompute of core attention and the MLP, no ViT recompute) follow
TP=1 (every ViT block recomputed): same start weights, same data → per-step loss within 1e-6 relative (fp32).
Freeze switches keep the frozen towers' weights."""

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed
from tests.distributed.train_helpers import merged_weights, overrides, run_training, save_start_checkpoint

pytestmark = pytest.mark.distributed

STEPS = 5


def test_tp2_and_pp2_follow_tp1(tmp_path):
    start = str(tmp_path / "start")
    (start_weights,) = run_distributed(save_start_checkpoint, 1, start)
    runs = {}
    # Recompute and sequence parallelism change memory, not numerics: they ride along on the parallel runs.
    layouts = (("tp1", 1, []), ("tp2", 2, ["parallel.tp=2", "parallel.sequence_parallel=true", "model.recompute=full",
                                           "model.vit_recompute_blocks=1"]),
               ("pp2", 2, ["parallel.pp=2", "parallel.first_stage_layers=1", "model.recompute=selective",
                       "model.recompute_modules=[core_attn, mlp]", "model.vit_recompute=none"]))
    for name, world, extra in layouts:
        args = overrides(str(tmp_path), f"checkpoint.load={start}", f"schedule.train_steps={STEPS}",
                         f"run_dir={tmp_path / name}", *extra)
        runs[name] = run_distributed(run_training, world, args, timeout=300)
    ref = runs["tp1"][0]["losses"]
    assert sorted(ref) == list(range(1, STEPS + 1))
    ref_w = runs["tp1"][0]["weights"]
    for name in ("tp2", "pp2"):
        for rank, r in enumerate(runs[name]):
            for step, loss in ref.items():
                rel = abs(r["losses"][step] - loss) / abs(loss)
                assert rel <= 1e-6, (name, rank, step, r["losses"][step], loss)  # observed <= 1.1e-7
            print(name, rank, {s: f"{abs(r['losses'][s] - v) / v:.1e}" for s, v in ref.items()})
        weights = merged_weights(runs[name])
        assert weights.keys() == ref_w.keys()
        for n, w in ref_w.items():  # Adam normalises updates, so tiny loss differences stay tiny in the weights
            assert (weights[n] - w).norm() <= 1e-4 * w.norm(), (name, n)

    # Freeze the ViT and the merger: after 2 steps they are the start weights, the LM moved.
    args = overrides(str(tmp_path), f"checkpoint.load={start}", "schedule.train_steps=2", "optim.warmup=0",
                     "model.freeze_vision=true", "model.freeze_merger=true", f"run_dir={tmp_path / 'frozen'}")
    (frozen,) = run_distributed(run_training, 1, args)
    vision = [n for n in start_weights if n.startswith("vision_model.")]
    assert vision and all(torch.equal(frozen["weights"][n], start_weights[n]) for n in vision)
    assert not torch.equal(frozen["weights"]["language_model.output_layer.weight"],
                           start_weights["language_model.output_layer.weight"])
