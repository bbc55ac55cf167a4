"""`model.rope_scaling` lands in the model's HF config (so the model, exports and transformers agree); a bad type
is one config error naming the field."""

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
