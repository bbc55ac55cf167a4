"""Length-extension knobs for the LM's M-RoPE: base (theta) override, linear interpolation, YaRN.

M-RoPE uses one inverse-frequency vector for all three axes; `mrope_section` only chooses which frequency slots
read the temporal / height / width position. So every scaling acts on the inverse frequencies exactly as for 1D
RoPE, and the sections are applied afterwards (as transformers' Qwen2.5-VL does with `rope_type="yarn"`).

YaRN (arXiv 2309.00071): frequencies that turn fewer than `beta_slow` times over the original context are
interpolated (÷ factor), those turning more than `beta_fast` times are kept, a linear ramp in between; cos/sin are
multiplied by an attention factor (0.1·ln(factor)+1 by default). q and k both carry it, so it equals multiplying
the softmax scale by attention_factor² — that is how we apply it (no megatron change).

Hook into a megatron GPTModel (position_embedding_type="mrope"), with compat/rope.py:
    inv_freq, attn_factor = mrope_inv_freq(head_dim, theta, {"type": "yarn", "factor": 4,
                                                              "original_max_position_embeddings": 32768})
    set_rope_softmax_scale(language_config, attn_factor)   # before building the model
    model = GPTModel(...)
    apply_inv_freq(model, inv_freq)                         # after building it
"""

from __future__ import annotations

import math

import torch

SCALING_TYPES = ("default", "linear", "yarn")


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE inverse frequencies [dim/2] fp32: theta^(-2i/dim)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, factor: float, original_max_position_embeddings: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
                  attention_factor: float | None = None, mscale: float | None = None,
                  mscale_all_dim: float | None = None) -> tuple[torch.Tensor, float]:
    """YaRN-scaled inverse frequencies [dim/2] and the attention (cos/sin) factor."""
    if factor < 1:
        raise ValueError(f"yarn factor={factor} must be >= 1 (it is target length / original length)")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))

    def slot_for_rotations(n_rot: float) -> float:
        # frequency slot i turns original_max·theta^(-2i/dim)/(2π) times over the original context; solve for i
        return dim * math.log(original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = slot_for_rotations(beta_fast), slot_for_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0 keep → 1 interp
    base = rope_inv_freq(dim, theta)
    inv_freq = base / factor * ramp + base * (1 - ramp)
    return inv_freq, float(attention_factor)


def mrope_inv_freq(dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor for the LM's M-RoPE from a scaling dict (HF `rope_scaling` keys).

    scaling: None / {"type": "default"}; {"type": "linear", "factor": f}; {"type": "yarn", "factor": f,
    "original_max_position_embeddings": n, optional beta_fast, beta_slow, truncate, attention_factor, mscale,
    mscale_all_dim}. `rope_type` is accepted for `type`; `mrope_section` and unknown HF keys are ignored.
    """
    scaling = dict(scaling or {})
    kind = scaling.pop("type", None) or scaling.pop("rope_type", None) or "default"
    if kind == "mrope":  # old Qwen2-VL configs call plain M-RoPE "mrope"
        kind = "default"
    if kind not in SCALING_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not one of {SCALING_TYPES}")
    if kind == "default":
        return rope_inv_freq(dim, theta), 1.0
    if "factor" not in scaling:
        raise ValueError(f"rope scaling {kind!r} needs 'factor' (target length / trained length)")
    if kind == "linear":
        return rope_inv_freq(dim, theta) / float(scaling["factor"]), 1.0
    if "original_max_position_embeddings" not in scaling:
        raise ValueError("yarn needs 'original_max_position_embeddings' (32768 for Qwen2.5-VL)")
    keys = ("beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")
    return yarn_inv_freq(dim, theta, float(scaling["factor"]), int(scaling["original_max_position_embeddings"]),
                         **{k: scaling[k] for k in keys if scaling.get(k) is not None})
