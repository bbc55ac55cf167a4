"""M-RoPE scaling equals transformers' Qwen2.5-VL rotary embedding (rope_type default / linear / yarn): inverse
frequencies (fp32, ≤1e-6 rel), and q·k scores through megatron's M-RoPE + our softmax-scale hook (≤1e-5 rel)."""

import math
import types

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb

from megatron_mmpl.attention.rope_scaling import mrope_inv_freq
from megatron_mmpl.compat.rope import apply_inv_freq, set_rope_softmax_scale

pytestmark = pytest.mark.unit

HEADS, D, SECTION, THETA = 2, 32, [4, 6, 6], 1e6
SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
]


def _hf_rope(scaling):
    params = {"rope_type": "default", **(scaling or {}), "rope_theta": THETA, "mrope_section": SECTION}
    cfg = Qwen2_5_VLTextConfig(hidden_size=HEADS * D, num_attention_heads=HEADS, num_key_value_heads=1,
                               rope_parameters=params)
    return Qwen2_5_VLRotaryEmbedding(cfg)


def _megatron_mrope(inv_freq):
    """megatron's MultimodalRotaryEmbedding without its CUDA-device constructor; inv_freq set by our hook."""
    rope = MultimodalRotaryEmbedding.__new__(MultimodalRotaryEmbedding)
    torch.nn.Module.__init__(rope)
    rope.rotary_interleaved, rope.seq_len_interpolation_factor, rope.cp_group = False, None, None
    rope.inv_freq = torch.zeros(D // 2)
    apply_inv_freq(types.SimpleNamespace(rotary_pos_emb=rope), inv_freq)
    return rope


@pytest.mark.parametrize("scaling", SCALINGS)
def test_inv_freq_and_scores_match_transformers(scaling):
    hf = _hf_rope(scaling)
    inv_freq, attn_factor = mrope_inv_freq(D, THETA, scaling)
    assert ((inv_freq - hf.inv_freq).abs() / hf.inv_freq).max() <= 1e-6
    assert abs(attn_factor - hf.attention_scaling) <= 1e-12

    g = torch.Generator().manual_seed(0)
    s = 40
    pos = torch.stack([torch.arange(s) * 300, torch.arange(s) * 170 % 5000, torch.arange(s) * 13])[:, None]
    q, k = torch.randn(1, HEADS, s, D, generator=g), torch.randn(1, HEADS, s, D, generator=g)
    cos, sin = hf(q, pos)
    qh, kh = apply_rotary_pos_emb(q, k, cos, sin)
    hf_scores = qh @ kh.transpose(-1, -2) / math.sqrt(D)

    emb = _megatron_mrope(inv_freq)(pos, SECTION)  # [s, 1, 1, D]
    qm = _apply_rotary_pos_emb_bshd(q.permute(2, 0, 1, 3), emb)  # [s, b, h, d]
    km = _apply_rotary_pos_emb_bshd(k.permute(2, 0, 1, 3), emb)
    cfg = types.SimpleNamespace(kv_channels=D, softmax_scale=None)
    set_rope_softmax_scale(cfg, attn_factor)
    scale = cfg.softmax_scale or 1 / math.sqrt(D)
    ours = torch.einsum("qbhd,kbhd->bhqk", qm, km) * scale
    assert (ours - hf_scores).abs().max() <= 1e-5 * hf_scores.abs().max()


def test_bad_scaling_is_named():
    with pytest.raises(ValueError, match="'dynamic' is not one of"):
        mrope_inv_freq(D, THETA, {"type": "dynamic", "factor": 2})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        mrope_inv_freq(D, THETA, {"type": "yarn", "factor": 2})
    assert torch.equal(mrope_inv_freq(D, 5e5, {"type": "mrope"})[0], mrope_inv_freq(D, 5e5)[0])  # theta override
