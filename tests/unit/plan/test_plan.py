"""`mmpl plan`: parameter counts equal transformers', every shipped preset fits its own plan and is what the
generator writes, the default preset is the MMProLong recipe, and impossible layouts are refused with the reason."""

import itertools
import os

import pytest
import yaml

from megatron_mmpl.cli import main as mmpl
from megatron_mmpl.config.load import ConfigError, load_config
from megatron_mmpl.models.qwen25vl.spec import ModelSpec
from megatron_mmpl.plan.command import PRESET_DIR, plan_preset, preset_names, read_hardware
from megatron_mmpl.plan.memory import (
    GiB,
    Hardware,
    PlanError,
    check_layout,
    layer_activation_bytes,
    lm_layer_activation_bytes,
    plan_config,
    total_params,
)

pytestmark = pytest.mark.unit

RECIPE = "examples/recipes/mmprolong-7b.yaml"


@pytest.mark.parametrize("name", ["qwen25vl-3b", "qwen25vl-7b", "qwen25vl-72b"])
def test_param_count_equals_transformers(name):
    """The planner's parameter formulas (LM, ViT blocks, patch embed, merger; tied or not) vs the HF model."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.models.qwen25vl.presets import preset_dict

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**preset_dict(name)))
    hf = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert total_params(ModelSpec.of(name)) == hf


def test_every_shipped_preset_fits_its_own_plan(capsys):
    names = sorted(preset_names())
    assert "mmprolong-7b" in names and "tiny" in names and len(names) >= 60
    for name in names:
        head = read_hardware(os.path.join(PRESET_DIR, f"{name}.yaml"))
        assert {"nodes", "gpus", "gpu_mem"} <= set(head), f"{name}: no `# plan:` header"
        plan = plan_preset(name)
        assert plan.fits, f"{name}: {plan.refusal}"
        assert plan.peak.total <= plan.hardware.budget_bytes
    assert mmpl(["plan", "--all"]) == 0
    assert mmpl(["plan", "--preset", "mmprolong-7b"]) == 0
    out = capsys.readouterr().out
    assert "tokens/step" in out and "1193 steps" in out and "fits:" in out


def test_grid_covers_the_issue():
    """7B at 32K-512K on 1-32 nodes of H100 and H200 (each shipped or refused with a reason), 32B/72B at 128K."""
    names = set(preset_names())
    index = open(os.path.join(PRESET_DIR, "INDEX.md")).read()
    for gpu in ("h100", "h200"):
        for nodes in (1, 2, 4, 8, 16, 32):
            for seq in (32, 64, 128, 256, 512):
                name = f"qwen25vl-7b-{seq}k-{nodes}n-{gpu}"
                assert name in names or f"`{name}`: nothing fits" in index, name
        assert f"qwen25vl-32b-128k-8n-{gpu}" in names and f"qwen25vl-72b-128k-16n-{gpu}" in names
    for seq in (32, 64, 128, 256, 512):  # every length has some H100 preset
        assert any(n.startswith(f"qwen25vl-7b-{seq}k-") and n.endswith("h100") for n in names)


def test_shipped_presets_are_what_the_generator_writes():
    from megatron_mmpl.plan import generate

    files, _ = generate.generate()
    shipped = {f for f in os.listdir(PRESET_DIR) if f.startswith(("qwen25vl-", "mmprolong-")) or f == "INDEX.md"}
    assert shipped == set(files), "run `python -m megatron_mmpl.plan.generate` and commit the result"
    for fname, text in files.items():
        with open(os.path.join(PRESET_DIR, fname)) as f:
            assert f.read() == text, f"{fname} is stale: run `python -m megatron_mmpl.plan.generate`"


def test_default_preset_is_the_mmprolong_recipe():
    preset = load_config(os.path.join(PRESET_DIR, "mmprolong-7b.yaml"))
    recipe = load_config(RECIPE)
    assert preset.optim == recipe.optim and preset.schedule == recipe.schedule
    assert preset.model.hf_config == "qwen25vl-7b"
    d, r = preset.data, recipe.data
    assert (d.recipe, d.min_len, d.max_len, d.max_seq_len, d.task_weights) == (
        r.recipe, r.min_len, r.max_len, r.max_seq_len, r.task_weights)
    assert (d.min_len, d.max_len, d.task_weights) == (32768, 131072, {"extraction": 0.8, "reasoning": 0.2})
    assert preset.optim.min_lr == pytest.approx(0.1 * preset.optim.lr) and preset.optim.warmup == 0.1
    plan = plan_preset("mmprolong-7b")
    assert plan.tokens_per_step == 32 * 131072 and plan.train_steps == -(-5_000_000_000 // (32 * 131072))


def _cfg(*overrides):
    return load_config(RECIPE, list(overrides))


def test_refusals_name_the_reason(capsys):
    hw8 = Hardware(nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    cases = [
        (_cfg("parallel.tp=8", "parallel.cp=1"), hw8, "parallel.tp=8 does not divide LM attention heads=28"),
        (_cfg("parallel.tp=4", "parallel.cp=4"), hw8, "does not divide the world size 8"),
        (_cfg("parallel.tp=4", "parallel.cp=1"), Hardware(2, 2, 80), "spans nodes"),
        (_cfg("parallel.cp=2", "parallel.tp=4", "data.max_seq_len=131076", "data.max_len=131076"),
         hw8, r"data.max_seq_len=131076 must be a multiple of 16 \(2·cp, times tp with sequence parallel"),
    ]
    for cfg, hw, reason in cases:
        with pytest.raises(PlanError, match=reason):
            plan_config(cfg, hw)
    # A legal layout that is far too big: 7B at 128K on one GPU.
    plan = plan_config(_cfg("parallel.tp=1", "parallel.cp=1", "parallel.sequence_parallel=false",
                            "data.global_batch_size=32"), Hardware(1, 1, 80))
    assert not plan.fits and "does not fit: stage 0 needs" in plan.refusal and "over the 68.4 GiB" in plan.refusal
    rc = mmpl(["plan", "--preset", "mmprolong-7b", "--nodes", "1", "--gpus", "1"])
    err = capsys.readouterr()
    assert rc == 1 and "does not divide the world size 1" in err.err
    rc = mmpl(["plan", "--preset", "mmprolong-7b", "--gpu-mem", "24"])
    assert rc == 1 and "REFUSED: does not fit" in capsys.readouterr().out


def test_memory_terms_move_the_right_way():
    """Recompute, freezing the ViT, CP, TP and more nodes each shrink the terms they should."""
    hw = Hardware(4, 8, 80)
    base = plan_config(_cfg("parallel.tp=2", "parallel.cp=4", "model.recompute=full", "model.vit_recompute=full"),
                       hw).peak.terms
    none = plan_config(_cfg("parallel.tp=2", "parallel.cp=4", "model.recompute=none"), hw).peak.terms
    assert none["activations"] > 20 * base["activations"]
    vit_none = plan_config(_cfg("parallel.tp=2", "parallel.cp=4", "model.recompute=full", "model.vit_recompute=none"),
                           hw).peak.terms
    assert vit_none["vit_activations"] > 5 * base["vit_activations"]
    # chunked: the ViT reruns whole images chunk by chunk, nothing kept, one chunk's blocks in the working set
    chunked = ["parallel.tp=2", "parallel.cp=4", "model.recompute=full", "model.vit_recompute=chunked"]
    ch = plan_config(_cfg(*chunked), hw).peak.terms
    small = plan_config(_cfg(*chunked, "model.vit_chunk_patches=4096"), hw).peak.terms
    assert ch["vit_activations"] == 0 and small["transient"] <= ch["transient"]
    frozen = plan_config(_cfg("parallel.tp=2", "parallel.cp=4", "model.recompute=full", "model.freeze_vision=true",
                              "model.vit_recompute=none"), hw).peak.terms
    assert frozen["grads"] < base["grads"] and frozen["vit_activations"] < vit_none["vit_activations"] / 10
    cp8 = plan_config(_cfg("parallel.tp=2", "parallel.cp=8", "model.recompute=full"), hw).peak.terms
    # the loss holds one chunk's logits whatever the CP split (both local rows are longer than a chunk)
    assert cp8["logits"] == pytest.approx(base["logits"]) and cp8["optimizer"] == pytest.approx(base["optimizer"])
    more = plan_config(_cfg("parallel.tp=2", "parallel.cp=4", "model.recompute=full"), Hardware(8, 8, 80)).peak.terms
    assert more["optimizer"] == pytest.approx(base["optimizer"] / 2) and more["weights"] == base["weights"]
    # Pipeline: stage 0 holds pp micro-batches in flight, the last stage one, and only the last has logits.
    pp = plan_config(_cfg("parallel.tp=2", "parallel.cp=2", "parallel.pp=4", "model.recompute=full"), hw)
    assert [s.in_flight for s in pp.stages] == [4, 3, 2, 1]
    assert "logits" in pp.stages[-1].terms and "logits" not in pp.stages[0].terms


def test_activation_formula_numbers():
    """The per-layer formula at the 7B shape, spelled out (bf16, tp=4 with sequence parallel; see plan.py)."""
    m = ModelSpec.of("qwen25vl-7b")
    h, f, heads, kv, d = 3584, 18944, 28, 4 * 128, 128
    # on CUDA (the default): fused SwiGLU keeps 3F, compiled RoPE keeps only the shared table, fused rms_norm
    none = 2 * (4 * h / 4 + (4 * h + 3 * kv + 3 * f) / 4) + 4 * (heads / 4 + 2 / 4)
    assert lm_layer_activation_bytes(m, 4, True, "none") == pytest.approx(none)
    # the one QKV-bias-RoPE kernel (the ViT's on CUDA) keeps q, k, v alone: no QKV buffer beside RoPE'd q and k
    fused = 2 * (4 * h / 4 + (3 * h + 2 * kv + 3 * f) / 4) + 4 * (heads / 4 + 2 / 4)
    assert layer_activation_bytes(h, heads, kv, f, d, 4, True, "none", fused_qkv=True) == pytest.approx(fused)
    assert lm_layer_activation_bytes(m, 4, True, "selective") == pytest.approx(none - 2 * h / 4 - 4 * heads / 4)
    assert lm_layer_activation_bytes(m, 4, True, "full") == 2 * h / 4
    assert lm_layer_activation_bytes(m, 4, False, "full") == 2 * h
    cp = 2 * (4 * h / 4 + (3 * h + 3 * f) / 4) + 4 * (heads / 4 + 2 / 4)  # K/V counted as gathered
    assert lm_layer_activation_bytes(m, 4, True, "none", cp=2) == pytest.approx(cp)
    cpu = 2 * (4 * h / 4 + (4 * h + 3 * kv + 5 * f) / 4 + 2 * h / 4) + 4 * (heads / 4 + 4 * d + 2 / 4)
    assert lm_layer_activation_bytes(m, 4, True, "none", cuda=False) == pytest.approx(cpu)
    assert isinstance(m, ModelSpec) and m.head_dim == 128


def test_header_and_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    raw = yaml.safe_load(open(RECIPE))
    path.write_text("# plan: nodes=2 gpus=8 gpu_mem=140\n" + yaml.safe_dump(raw))
    plan = plan_preset(str(path))
    assert (plan.hardware.nodes, plan.hardware.gpu_mem_gib, plan.dp) == (2, 140.0, 1)
    plan = plan_preset(str(path), ["parallel.cp=2"], nodes=4)
    assert (plan.cp, plan.dp) == (2, 4)  # 4 nodes x 8 GPUs over tp4 x cp2
    assert plan.hardware.budget_bytes == pytest.approx((140 - 4) * 0.9 * GiB)


def test_planner_loss_chunk_matches_the_model():
    """The planner's logits term assumes the model's loss chunk size (kept as a literal to stay import-light)."""
    from megatron_mmpl.models.qwen25vl.language_model import LanguageModel
    from megatron_mmpl.plan.memory import LOSS_CHUNK_TOKENS

    assert LanguageModel.loss_chunk_tokens == LOSS_CHUNK_TOKENS


def test_auto_recompute_picks_the_least_that_fits():
    """model.recompute=auto: no recompute when memory is ample; when tight, the setting that rebuilds the fewest
    forward FLOPs and fits — at 8K no LM recompute and the ViT's first blocks only, the MLP of every layer
    (selective) with the per-block ViT at 32K, every layer and the chunked ViT at 128K; every cheaper setting
    (all of them planned, as choose_recompute does not) does not fit."""
    from dataclasses import replace

    from megatron_mmpl.plan.memory import choose_recompute, recompute_label, recompute_settings, vit_recompute_label

    m = ModelSpec.of("qwen25vl-3b")
    one = ["parallel.tp=1", "parallel.cp=1", "parallel.sequence_parallel=false", "data.global_batch_size=1",
           "model.hf_config=qwen25vl-3b"]
    seen = {}
    for seq, mem in ((4096, 140), (8192, 140), (32768, 140), (131072, 140)):
        cfg = _cfg(*one, f"data.max_seq_len={seq}", f"data.max_len={seq}", f"data.min_len={seq // 4}",
                   "model.recompute=auto")
        hw = Hardware(1, 1, mem)
        plan = plan_config(cfg, hw)
        chosen, line = choose_recompute(cfg, hw, m)
        assert plan.fits and plan.model_settings["recompute"] == chosen.model.recompute and "auto chose" in line
        seen[seq] = (recompute_label(chosen), vit_recompute_label(chosen, m))
        settings = recompute_settings(cfg, m)
        assert settings[0] == {"recompute": "none", "vit_recompute": "none", "vit_recompute_blocks": None}
        pick = next(i for i, c in enumerate(settings) if all(getattr(chosen.model, k) == v for k, v in c.items()))
        for cheaper in settings[:pick]:
            assert not plan_config(replace(cfg, model=replace(cfg.model, **cheaper)), hw).fits, cheaper
    assert seen[4096] == ("none", "none")
    assert seen[8192] == ("none", "full on 13 of 32 blocks")
    assert seen[32768] == ("selective (mlp)", "full")  # measured the fastest on an H200 (docs/PERFORMANCE.md)
    assert seen[131072] == ("full (uniform, 1 layer(s) per chunk)", "chunked")


def test_vit_recompute_blocks_plans_each_block():
    """model.vit_recompute_blocks=k (megatron's block method on the ViT): the first k blocks keep their input, the
    others all their activations, block by block as vit_block_activation_bytes counts them (window or full
    attention); 0 plans as no ViT recompute, every block as the default; memory falls with each block from one on.
    Counts the ViT cannot take are refused with the field and the fix."""
    from megatron_mmpl.plan.memory import IMAGE_TOKEN_FRACTION, vit_block_activation_bytes

    m = ModelSpec.of("qwen25vl-3b")
    one = ["model.hf_config=qwen25vl-3b", "parallel.tp=1", "parallel.cp=1", "parallel.sequence_parallel=false",
           "data.global_batch_size=1", "model.recompute=full", "data.max_seq_len=8192", "data.max_len=8192",
           "data.min_len=2048"]
    hw = Hardware(1, 1, 140)

    def vit_terms(*extra):
        return plan_config(_cfg(*one, *extra), hw).peak.terms

    patches = 8192 * IMAGE_TOKEN_FRACTION * m.vision.spatial_merge_size**2
    merger = vit_terms("model.vit_recompute=full")["vit_activations"] - patches * m.vision.depth * (
        vit_block_activation_bytes(m, 1, "full"))
    kept = [vit_terms("model.vit_recompute=full", f"model.vit_recompute_blocks={k}")["vit_activations"] - merger
            for k in range(m.vision.depth + 1)]
    assert kept[0] == pytest.approx(vit_terms("model.vit_recompute=none")["vit_activations"] - merger)
    assert kept[-1] == pytest.approx(patches * m.vision.depth * vit_block_activation_bytes(m, 1, "full"))
    for k in range(m.vision.depth):
        block = vit_block_activation_bytes(m, 1, "none", windowed=k not in m.vision.fullatt_block_indexes)
        assert kept[k] - kept[k + 1] == pytest.approx(patches * (block - vit_block_activation_bytes(m, 1, "full")))
    totals = [plan_config(_cfg(*one, f"model.vit_recompute_blocks={k}"), hw).peak.total for k in range(1, 33)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)

    for bad, line in (("model.vit_recompute_blocks=-1", "model.vit_recompute_blocks=-1 needs"),
                      ("model.vit_recompute_blocks=33", "model.vit_recompute_blocks=33 is above the 32 ViT blocks"),
                      ("model.vit_recompute=chunked", "needs model.vit_recompute=full")):
        with pytest.raises((PlanError, ConfigError), match=line):
            plan_config(_cfg(*one, "model.vit_recompute_blocks=4", bad), hw)


def test_every_row_length_the_planner_accepts_the_loader_and_cp_split_accept():
    """One padding multiple (ParallelConfig.pad_multiple) for planner, loader and CP split: whenever the planner
    accepts a layout and data.max_seq_len, a full row packed by the loader is accepted and splits into equal CP
    shares that TP divides under sequence parallelism, with no padding beyond max_seq_len."""
    import numpy as np
    import torch

    from megatron_mmpl.data.loader import LoaderOptions
    from megatron_mmpl.data.packing import PackingBuffer, ProcessedSample, collate_packed
    from megatron_mmpl.parallel.context_parallel import split_packed_batch

    rng = np.random.default_rng(0)
    accepted = refused = 0
    for tp, cp, sp, seq in itertools.product((1, 2, 4), (1, 2, 4), (False, True), (4096, 4100, 4104, 4112, 4128)):
        if sp and tp == 1:
            continue
        cfg = _cfg(f"parallel.tp={tp}", f"parallel.cp={cp}", f"parallel.sequence_parallel={str(sp).lower()}",
                   "parallel.pp=1", f"data.max_seq_len={seq}", "data.min_len=1024", "data.max_len=2048",
                   "data.global_batch_size=1", "data.shards=unused", "schedule.train_steps=10")
        try:
            check_layout(cfg, Hardware(1, tp * cp, 80), ModelSpec.of("qwen25vl-7b"))
        except PlanError:
            refused += 1
            continue
        accepted += 1
        mult = cfg.parallel.pad_multiple
        opts = LoaderOptions.from_config(cfg.data, pad_multiple=mult, pad_to_max_len=True)  # raises if it refuses
        buf = PackingBuffer(opts.max_seq_len, 8, mult)
        for n in rng.integers(100, 1500, size=8):
            buf.add(int(n), int(n))
        lens = buf.pop_bin()
        samples = [ProcessedSample(np.ones(n, np.int64), np.ones(n, bool), torch.zeros(3, n, dtype=torch.long),
                                   np.zeros((0, 0), np.float32), np.zeros((0, 3), np.int64)) for n in lens]
        row = collate_packed(samples, 0, mult, pad_to=opts.max_seq_len)
        assert row["input_ids"].shape[1] == seq, (tp, cp, sp, seq)
        if mult > 1:
            shares = [split_packed_batch(row, r, cp, multiple=mult)["input_ids"].shape[1] for r in range(cp)]
            assert shares == [seq // cp] * cp and all(s % (tp if sp else 1) == 0 for s in shares), (tp, cp, sp, seq)
    assert accepted and refused  # the grid holds both kinds
