"""`model.rope_scaling` lands in the model's HF config (so the model, exports and transformers agree); a bad type
is one config error naming the field."""

import dataclasses

import pytest

pytestmark = pytest.mark.unit


def test_rope_scaling_goes_into_the_hf_config():
    from megatron_mmpl.config import load_config
    from megatron_mmpl.config.hf_config import resolve_hf_config
    from megatron_mmpl.models.qwen25vl.spec import ModelSpec

    yarn = "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 32768}"
    cfg = load_config(None, ["model.hf_config=qwen25vl-7b", "model.dtype=fp32", "model.rope_theta=2e6", yarn])
    hf = resolve_hf_config(cfg.model)
    want = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}
    assert ModelSpec.from_hf(hf).rope_scaling == want
    assert hf.get_text_config().rope_parameters["rope_theta"] == 2e6
    assert ModelSpec.from_hf(resolve_hf_config(load_config(None, ["model.dtype=fp32"]).model)).rope_scaling is None


def test_unknown_rope_scaling_is_one_config_error():
    from megatron_mmpl.config import load_config
    from megatron_mmpl.config.hf_config import resolve_hf_config
    from megatron_mmpl.config.load import ConfigError

    cfg = load_config(None, ["model.dtype=fp32", "model.rope_scaling={rope_type: ntk, factor: 4}"])
    with pytest.raises(ConfigError, match=r"model\.rope_scaling=.*'ntk' is not supported"):
        resolve_hf_config(cfg.model)


@pytest.mark.parametrize("override", ["{text_config.num_hidden_layers: 3}", "{text_config: {num_hidden_layers: 3}}",
                                      "{num_hidden_layers: 3}"])
@pytest.mark.parametrize("preset", ["qwen25vl-3b", "tiny"])
def test_a_layer_override_changes_only_the_layer_count(preset, override):
    """Every spelling of one text field sets that field and keeps the others, in a flat config.json (the 3B's:
    LM fields at the top level) and in one with a text_config (tiny's). A text_config created in a flat config
    used to make transformers drop the top-level fields and build its default 8192-wide LM."""
    from megatron_mmpl.config import load_config
    from megatron_mmpl.config.hf_config import resolve_hf_config
    from megatron_mmpl.models.qwen25vl.spec import ModelSpec

    base = ModelSpec.from_hf(resolve_hf_config(load_config(None, [f"model.hf_config={preset}"]).model))
    cfg = load_config(None, [f"model.hf_config={preset}", f"model.hf_overrides={override}"])
    got = ModelSpec.from_hf(resolve_hf_config(cfg.model))
    assert got.layers == 3
    assert dataclasses.replace(got, layers=base.layers) == base
