"""The FLOP count at the 7B shape: decoder matmuls, packed attention (Σ s_i²), output layer only at supervised
positions, ViT per image."""

import pytest

from megatron_mmpl.config import load_config
from megatron_mmpl.config.hf_config import resolve_hf_config
from megatron_mmpl.training.flops import FlopModel, Training

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


@pytest.mark.parametrize("extra, pp, first, rebuilt", [
    (["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"], 2, 1, 1 + 2),
    (["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"], 3, None, 2 * 3),
    (["model.recompute=full", "model.recompute_method=uniform", "model.recompute_num_layers=4"], 2, None, 36),
    (["model.recompute=selective", "model.recompute_modules=[mlp]"], 1, None, 0),
    (["model.recompute=auto"], 1, None, 0),  # unresolved auto (CPU): none, as the model builder does
])
def test_training_counts_the_lm_layers_megatron_rebuilds(extra, pp, first, rebuilt):
    """The block method rebuilds the first k layers of each pipeline stage; uniform rebuilds every layer."""
    cfg = load_config(None, ["model.hf_config=qwen25vl-3b", *extra])
    spec = FlopModel.from_hf(resolve_hf_config(cfg.model)).spec
    t = Training.of(cfg.model, spec, pp=pp, first_stage_layers=first)
    assert t.lm_layers_rebuilt == rebuilt
    assert t.lm_modules_rebuilt == (("mlp",) if "model.recompute=selective" in extra else ())
    assert t.vit_blocks_rebuilt == 32 and not t.vit_tower_rebuilt  # the default: every ViT block


def test_hfu_adds_the_rebuilt_forward_to_the_model_flops():
    """3B, one 32K sample, LM MLP and every ViT block rebuilt: HFU/MFU = 1 + rebuilt / model FLOPs."""
    cfg = load_config(None, ["model.hf_config=qwen25vl-3b", "model.recompute=selective",
                             "model.recompute_modules=[mlp]"])
    spec = FlopModel.from_hf(resolve_hf_config(cfg.model)).spec
    f = FlopModel(spec, Training.of(cfg.model, spec))
    grids = [[1, 80, 62]] * 26
    model = f.lm_flops([32768]) + f.vit_flops(grids)
    rebuilt = f.rebuilt_flops([32768], grids)
    mlp = 36 * 2 * 3 * 2048 * 11008 * 32768
    vit_forward = (f.vit_flops(grids) - 26 * 80 * 62 * (4 * 1176 * 1280 + 6 * f.vit_merger_params_per_patch)) / 3
    assert rebuilt == pytest.approx(mlp + vit_forward, rel=1e-12)
    assert FlopModel(spec).rebuilt_flops([32768], grids) == 0  # no recompute by default
    assert 1.2 < (model + rebuilt) / model < 1.3

    from megatron_mmpl.training.train import _Window

    w = _Window()
    w.add(2.0, 1.0, 32768, f.lm_flops([32768]), f.vit_flops(grids), 0.0, 4.0, 100.0, rebuilt_flops=rebuilt)
    m = w.metrics(1e-5, world_size=1, peak=989.0)
    assert m["hfu"] == pytest.approx((m["mfu"] + m["vit_mfu"]) * (model + rebuilt) / model)
