"""The recompute settings of the run config reach megatron's TransformerConfig of the right tower."""

import pytest

from megatron_mmpl.config import load_config
from megatron_mmpl.training.model_provider import transformer_overrides

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("extra, vit", [
    ([], dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    (["model.vit_recompute_blocks=3"], dict(recompute_granularity="full", recompute_method="block",
                                            recompute_num_layers=3)),
    (["model.vit_recompute_blocks=0"], {}),
    (["model.vit_recompute=none"], {}),
    (["model.vit_recompute=chunked"], {}),  # the ViT's own (vision_model.recompute), not megatron's
])
def test_vit_recompute_reaches_the_vision_config(extra, vit):
    cfg = load_config(None, ["model.recompute=selective", "model.recompute_modules=[mlp]", *extra])
    _, lm, got = transformer_overrides(cfg)
    assert got == vit
    assert lm == dict(recompute_granularity="selective", recompute_modules=["mlp"])


def test_lm_block_recompute_reaches_the_language_config():
    cfg = load_config(None, ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=5"])
    _, lm, _ = transformer_overrides(cfg)
    assert lm == dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=5)
