"""The FLOP count at the 7B shape: decoder matmuls, packed attention (Σ s_i²), output layer only at supervised
positions, ViT per image."""

import pytest

from megatron_mmpl.config import load_config
from megatron_mmpl.config.hf_config import resolve_hf_config
from megatron_mmpl.training.flops import FlopModel

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
