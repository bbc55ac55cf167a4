"""The LR schedule (warmup, cosine to the floor) and the freeze groups by parameter name."""

import math

import pytest

from megatron_mmpl.config import load_config
from megatron_mmpl.training.optimizer import build_scheduler, param_part

pytestmark = pytest.mark.unit


def test_schedule_warms_up_then_cosine_to_the_floor():
    cfg = load_config(None, ["schedule.train_steps=100", "optim.warmup=0.1", "optim.lr=1e-3", "optim.min_lr=1e-4"])

    class Opt:
        param_groups = [{"params": [], "wd_mult": 1.0}]

    sched = build_scheduler(Opt(), cfg)
    lrs = []
    for _ in range(101):
        lrs.append(Opt.param_groups[0]["lr"])
        sched.step(1)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(1e-4) and min(lrs[10:]) == pytest.approx(1e-4)
    assert Opt.param_groups[0]["weight_decay"] == cfg.optim.weight_decay


def test_freeze_groups_follow_the_model_names():
    assert param_part("vision_model.patch_embed.weight") == "vision"
    assert param_part("vision_model.decoder.layers.0.mlp.linear_fc1.weight") == "vision"
    assert param_part("vision_model.decoder.final_layernorm.weight") == "merger"
    assert param_part("vision_model.projection.encoder.linear_fc1.weight") == "merger"
    assert param_part("language_model.decoder.layers.3.self_attention.linear_qkv.weight") == "llm"
    assert param_part("language_model.output_layer.weight") == "llm"
