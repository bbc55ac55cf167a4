"""HF config → megatron configs: presets as data, both rope layouts, every dim read from the config, clear errors."""

import types

import pytest
import torch

from megatron_mmpl.models.qwen25vl.configs import megatron_configs
from megatron_mmpl.models.qwen25vl.presets import PRESETS, hf_config_from_preset, preset_dict
from megatron_mmpl.models.qwen25vl.spec import ModelSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "name,layers,hidden,heads,groups,ffn,vocab,tied",
    [
        ("qwen25vl-3b", 36, 2048, 16, 2, 11008, 151936, True),
        ("qwen25vl-7b", 28, 3584, 28, 4, 18944, 152064, False),
        ("qwen25vl-32b", 64, 5120, 40, 8, 27648, 152064, False),
        ("qwen25vl-72b", 80, 8192, 64, 8, 29568, 152064, False),
    ],
)
def test_released_presets(name, layers, hidden, heads, groups, ffn, vocab, tied):
    c = megatron_configs(hf_config_from_preset(name), tp=2)
    lm, vis = c.language, c.vision
    got = (lm.num_layers, lm.hidden_size, lm.num_attention_heads, lm.num_query_groups)
    assert got == (layers, hidden, heads, groups)
    assert (lm.ffn_hidden_size, c.spec.vocab, c.spec.tied) == (ffn, vocab, tied)
    assert lm.kv_channels == 128 and c.spec.mrope_section == (16, 24, 24) and c.spec.rope_theta == 1e6
    assert lm.add_qkv_bias and not lm.add_bias_linear and lm.gated_linear_unit and lm.layernorm_epsilon == 1e-6
    # released 3420 (3B/7B) or 3456 (32B/72B); built zero-padded to a multiple of 64 (models/qwen25vl/padding.py)
    assert (vis.num_layers, vis.hidden_size, vis.num_attention_heads, vis.ffn_hidden_size) == (32, 1280, 16, 3456)
    assert vis.add_bias_linear and vis.gated_linear_unit
    d = c.spec.vision
    assert d.fullatt_block_indexes == (7, 15, 23, 31) and d.window_size == 112 and d.out_hidden_size == hidden
    assert d.patch_dim == 3 * 2 * 14 * 14
    assert c.projector.ffn_hidden_size == 4 * 1280 and c.projector.hidden_size == hidden
    assert (c.spec.tokens.image, c.spec.tokens.video) == (151655, 151656)


def test_dims_come_from_the_config():
    """Change every dim of the tiny config; the derived configs follow (nothing hard-coded)."""
    d = preset_dict("tiny")
    d["text_config"].update(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=80,
                            num_hidden_layers=3, vocab_size=300, rms_norm_eps=1e-5, hidden_act="gelu",
                            rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 2, 2]})
    d["vision_config"].update(depth=5, hidden_size=48, intermediate_size=40, num_heads=3, patch_size=8,
                              temporal_patch_size=1, spatial_merge_size=3, window_size=48, out_hidden_size=96,
                              fullatt_block_indexes=[0, 4], hidden_act="quick_gelu", in_channels=1)
    c = megatron_configs(d)
    lm, vis = c.language, c.vision
    assert (lm.hidden_size, lm.num_attention_heads, lm.num_query_groups, lm.ffn_hidden_size, lm.num_layers) == (
        96, 6, 3, 80, 3)
    assert (c.spec.vocab, lm.layernorm_epsilon, c.spec.rope_theta, c.spec.mrope_section) == (300, 1e-5, 5e5, (4, 2, 2))
    assert lm.activation_func is torch.nn.functional.gelu
    assert (vis.num_layers, vis.hidden_size, vis.ffn_hidden_size, vis.num_attention_heads, vis.kv_channels) == (
        5, 48, 64, 3, 16)  # ViT MLP 40 built zero-padded to 64
    x = torch.tensor([0.3, -1.0])
    assert torch.allclose(vis.activation_func(x), x * torch.sigmoid(1.702 * x))
    dims = c.spec.vision
    assert (dims.patch_size, dims.temporal_patch_size, dims.spatial_merge_size, dims.in_channels) == (8, 1, 3, 1)
    assert dims.fullatt_block_indexes == (0, 4) and dims.patch_dim == 64
    assert c.projector.ffn_hidden_size == 48 * 9


def test_old_and_new_rope_layouts_agree():
    new = hf_config_from_preset("tiny")
    old = preset_dict("tiny")
    tc = old.pop("text_config")
    rp = tc.pop("rope_parameters")
    flat = {**old, **tc, "rope_theta": rp["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    a, b = megatron_configs(new).spec, megatron_configs(flat).spec
    assert (a.rope_theta, a.mrope_section) == (b.rope_theta, b.mrope_section) == (1e4, (2, 3, 3))
    # a pre-transformers-5 config object: no rope_parameters, text fields at the top level
    legacy = types.SimpleNamespace(**{k: v for k, v in preset_dict("qwen25vl-7b").items() if k != "vision_config"},
                                   vision_config=types.SimpleNamespace(**preset_dict("qwen25vl-7b")["vision_config"]))
    legacy.rope_theta = 2e6
    m = ModelSpec.from_hf(legacy)
    assert (m.rope_theta, m.mrope_section, m.hidden, m.vision.depth) == (2e6, (16, 24, 24), 3584, 32)


def test_tied_flag_from_top_level():
    assert megatron_configs("tiny-tied").spec.tied and not megatron_configs("tiny").spec.tied


@pytest.mark.parametrize(
    "kwargs,edit,match",
    [
        ({"tp": 8}, {}, "num_attention_heads=4"),
        ({"tp": 4}, {}, "num_key_value_heads=2"),
        ({"tp": 2}, {"intermediate_size": 129}, "intermediate_size=129"),
        ({"tp": 2}, {"vocab_size": 255}, "vocab_size=255"),
        ({"pp": 5}, {}, "larger than the LM's 4 layers"),
        ({"pp": 3}, {}, "not divisible by pp=3"),
        ({"pp": 2, "first_stage_layers": 4}, {}, "first_stage_layers=4"),
        ({"first_stage_layers": 1}, {}, "needs pipeline parallelism"),
        ({}, {"rope_parameters": {"rope_theta": 1e4, "mrope_section": [2, 2, 2]}}, "must sum to head_dim/2 = 8"),
    ],
)
def test_clear_errors(kwargs, edit, match):
    d = preset_dict("tiny")
    d["text_config"].update(edit)
    with pytest.raises(ValueError, match=match):
        megatron_configs(d, **kwargs)


def test_vision_tp_error_names_the_vision_dim():
    d = preset_dict("tiny")
    d["vision_config"].update(num_heads=4, hidden_size=32)
    with pytest.raises(ValueError, match="vision_num_heads=4"):
        megatron_configs(d, tp=8)
    megatron_configs("qwen25vl-72b", tp=8)  # its ViT MLP is 3456 wide
    megatron_configs("qwen25vl-3b", tp=2)  # 3420, built as 3456: any tp up to 8 divides it


def test_presets_are_data():
    assert {"qwen25vl-3b", "qwen25vl-7b", "qwen25vl-32b", "qwen25vl-72b", "tiny", "tiny-tied"} <= set(PRESETS)
    a = preset_dict("qwen25vl-7b")
    a["hidden_size"] = 1
    assert preset_dict("qwen25vl-7b")["hidden_size"] == 3584  # copies, not the registry itself
