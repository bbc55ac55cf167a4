"""ModelSpec is one frozen description read the same from a config.json dict (planner, no transformers) and from
transformers' config object (trainer): equal for every preset and both rope layouts; the defaults it fills in for
absent fields are transformers' own; every shape field is required with an error naming it."""

import dataclasses

import pytest
from transformers import Qwen2_5_VLConfig

from megatron_mmpl.models.qwen25vl.presets import PRESETS, preset_dict
from megatron_mmpl.models.qwen25vl.spec import ModelSpec, weight_shape_differences

pytestmark = pytest.mark.unit

REQUIRED_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
REQUIRED_VISION = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_and_transformers_config_give_one_spec(name):
    raw = preset_dict(name)
    spec = ModelSpec.from_hf(raw)
    assert spec == ModelSpec.from_hf(Qwen2_5_VLConfig(**raw)) == ModelSpec.of(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.hidden = 1


def test_defaults_are_transformers_defaults():
    """A config.json with only the shape fields: the spec's defaults equal what transformers fills in."""
    full = preset_dict("tiny")
    text = {k: full["text_config"][k] for k in REQUIRED_TEXT}
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3]}  # head_dim 16
    raw = {"text_config": text, "vision_config": {k: full["vision_config"][k] for k in REQUIRED_VISION}}
    assert ModelSpec.from_hf(raw) == ModelSpec.from_hf(Qwen2_5_VLConfig(**raw))


@pytest.mark.parametrize("field", REQUIRED_TEXT)
def test_missing_shape_field_is_named(field):
    raw = preset_dict("tiny")
    del raw["text_config"][field]
    with pytest.raises(ValueError, match=f"the HF config has no '{field}'"):
        ModelSpec.from_hf(raw)


def test_rope_scaling_and_weight_shapes():
    raw = preset_dict("qwen25vl-7b")
    raw["rope_scaling"] = {"type": "yarn", "mrope_section": [16, 24, 24], "factor": 4,
                           "original_max_position_embeddings": 32768}
    m = ModelSpec.from_hf(raw)
    assert m.rope_scaling == {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}
    assert ModelSpec.of("qwen25vl-7b").rope_scaling is None
    assert weight_shape_differences(m, ModelSpec.of("qwen25vl-7b")) == []  # RoPE changes no weight
    diff = weight_shape_differences(ModelSpec.of("qwen25vl-3b"), ModelSpec.of("qwen25vl-7b"))
    assert "hidden_size: 2048 vs 3584" in diff and "tie_word_embeddings: True vs False" in diff
    raw["rope_scaling"]["type"] = "ntk"
    with pytest.raises(ValueError, match="rope_type='ntk' is not supported"):
        ModelSpec.from_hf(raw)
