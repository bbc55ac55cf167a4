"""Overrides of megatron's rotary embeddings for the LM's M-RoPE (megatron-core 0.16.1 `MultimodalRotaryEmbedding`):
length-extension frequencies (attention/rope_scaling.py computes them), YaRN's attention factor, and per-token
positions under context parallelism."""

from __future__ import annotations

import math

import torch


def set_rope_softmax_scale(config, attention_factor: float) -> None:
    """Fold the YaRN attention factor into megatron's `softmax_scale` (call before building the model)."""
    if hasattr(config, "yarn_rotary_scaling_factor"):
        raise ValueError("config already carries megatron's yarn_rotary_scaling_factor: the factor would apply twice")
    if attention_factor != 1.0:
        config.softmax_scale = attention_factor**2 / math.sqrt(config.kv_channels)


def apply_inv_freq(gpt_model, inv_freq: torch.Tensor) -> None:
    """Replace the inverse frequencies of a built GPTModel's (M-)RoPE (only on stages that have it)."""
    rope = getattr(gpt_model, "rotary_pos_emb", None)
    if rope is None:
        return
    if rope.inv_freq.shape != inv_freq.shape:
        raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}, the model's rope {tuple(rope.inv_freq.shape)}")
    rope.inv_freq = inv_freq.to(device=rope.inv_freq.device, dtype=rope.inv_freq.dtype)


def use_per_token_mrope_under_cp(gpt_model) -> None:
    """Stop megatron re-slicing M-RoPE for CP: our position ids are already this rank's zigzag share.

    megatron 0.16.1 `MultimodalRotaryEmbedding.forward` slices its output along the whole row into 2·CP chunks
    (`get_pos_emb_on_this_cp_rank`) when its cp_group has >1 rank; that is right only for unsplit, contiguous
    positions. With packed samples split per segment it must see no CP group. Call once after building GPTModel.
    """
    rope = getattr(gpt_model, "rotary_pos_emb", None)
    if rope is not None and hasattr(rope, "cp_group"):
        rope.cp_group = None
