"""Trainer parts without process groups: FLOP count, LR schedule, loss reduction, checkpoint discovery, logging."""

import json
import math
import os

import pytest
import torch

from megatron_mmpl.config import load_config
from megatron_mmpl.config.hf_config import resolve_hf_config
from megatron_mmpl.training import checkpoint as ckpt
from megatron_mmpl.training.flops import FlopModel
from megatron_mmpl.training.forward_step import loss_func
from megatron_mmpl.training.logger import RunLogger, format_line
from megatron_mmpl.training.optimizer import build_scheduler, param_part

pytestmark = pytest.mark.unit


def test_flops_count_7b_matmuls_and_packed_attention():
    hf = resolve_hf_config(load_config(None, ["model.hf_config=qwen25vl-7b"]).model)
    f = FlopModel.from_hf(hf)
    # 7B decoder matmul weights: qkv (3584 -> 3584 + 2*512), out proj, gated MLP (3 x 3584 x 18944), 28 layers
    assert f.lm_nonembed_params == 28 * (3584 * (3584 + 1024) + 3584 * 3584 + 3 * 3584 * 18944)
    assert 6.4e9 < f.lm_nonembed_params < 6.6e9
    dense = 6 * f.lm_nonembed_params + 6 * 3584 * 152064
    # a pack of two 8K samples costs the attention of 2·8K², not of (16K)²: S_eff = Σ s_i² / S_pack
    two = f.lm_flops([8192, 8192])
    assert two == pytest.approx(dense * 16384 + 6 * 28 * 3584 * 2 * 8192**2)
    assert f.lm_flops([16384]) - two == pytest.approx(6 * 28 * 3584 * (16384**2 - 2 * 8192**2))
    # the output layer only runs at supervised positions (e.g. 64 answer tokens)
    assert two - f.lm_flops([8192, 8192], head_tokens=64) == pytest.approx(6 * 3584 * 152064 * (16384 - 64))
    one_page, two_pages = f.vit_flops([[1, 36, 26]]), f.vit_flops([[1, 36, 26], [1, 36, 26]])
    assert one_page > 0 and two_pages == pytest.approx(2 * one_page)


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


def test_loss_is_token_sum_and_count_so_the_global_mean_is_per_token():
    # two micro-batches with 1 and 3 answer tokens: megatron divides Σ losses by Σ tokens (per-token mean over
    # the global batch), not the mean of the two micro-batch means
    mb1 = loss_func(torch.tensor([[1.0, 0.0]]), torch.tensor([[4.0, 9.0]]))
    mb2 = loss_func(torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]]))
    assert (mb1[0].item(), mb1[1].item(), mb2[0].item(), mb2[1].item()) == (4.0, 1, 3.0, 3)
    total = mb1[2]["lm loss"] + mb2[2]["lm loss"]
    assert (total[0] / total[1]).item() == pytest.approx(7 / 4)  # mean of means would be 2.5


def test_latest_checkpoint_ignores_partial_and_incomplete(tmp_path):
    root = str(tmp_path)
    assert ckpt.latest_step(root) is None
    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"iter_{step:07d}"
        d.mkdir()
        if complete:
            (d / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000040.partial").mkdir()
    assert ckpt.complete_steps(root) == [10, 20] and ckpt.latest_step(root) == 20
    (tmp_path / ckpt.TRACKER).write_text("10")
    assert ckpt.latest_step(root) == 10  # the tracker wins while its checkpoint is complete
    (tmp_path / ckpt.TRACKER).write_text("30")
    assert ckpt.latest_step(root) == 20  # ... and is ignored when it names an incomplete one
    assert ckpt.classify_load_path(root) == "resume"
    assert ckpt.classify_load_path(str(tmp_path / "iter_0000010")) == "model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.classify_load_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        ckpt.classify_load_path(str(tmp_path / "iter_0000030"))


def test_freeze_groups_follow_the_model_names():
    assert param_part("vision_model.patch_embed.weight") == "vision"
    assert param_part("vision_model.decoder.layers.0.mlp.linear_fc1.weight") == "vision"
    assert param_part("vision_model.decoder.final_layernorm.weight") == "merger"
    assert param_part("vision_model.projection.encoder.linear_fc1.weight") == "merger"
    assert param_part("language_model.decoder.layers.3.self_attention.linear_qkv.weight") == "llm"
    assert param_part("language_model.output_layer.weight") == "llm"


def test_console_line_and_log_files(tmp_path):
    m = {"loss": 2.5, "lr": 1e-5, "grad_norm": 0.5, "tokens_per_s": 12345.0, "tflops_per_gpu": 400.0,
         "vit_tflops_per_gpu": 20.0, "mfu": 0.42, "vit_mfu": 0.02, "max_mem_gib": 60.0, "data_wait": 0.01}
    line = format_line(7, 100, m)
    assert line.startswith("step 7/100 | loss 2.5000 | lr 1.000e-05 | grad 0.500 | tok/s 12,345")
    assert "TFLOP/s/GPU 400 + ViT 20" in line and "MFU 42.0% + ViT 2.0%" in line and "mem 60.00 GiB" in line
    assert "data 1.0%" in line and "\n" not in line
    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.progress_bar=false"])
    log = RunLogger(cfg, writer=True, total_steps=100, start_step=0)
    log.advance(7, 2.5)
    log.log(7, {**m, "mfu": None, "vit_mfu": None})
    log.close()
    assert open(os.path.join(tmp_path, "losses.tsv")).read() == "7\t2.500000\n"
    rec = json.loads(open(os.path.join(tmp_path, "metrics.jsonl")).read())
    assert rec["step"] == 7 and rec["loss"] == 2.5 and "mfu" not in rec
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
