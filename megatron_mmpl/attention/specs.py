"""Layer specs with CoreAttention swapped into megatron's local GPT spec (nothing else changed)."""

from __future__ import annotations

import copy

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mmpl.attention.backend import check_backend
from megatron_mmpl.attention.core_attention import CoreAttention


def with_core_attention(layer_spec: ModuleSpec, backend: str | None = None) -> ModuleSpec:
    """Copy of a TransformerLayer spec whose self-attention uses CoreAttention (`backend` overrides the config)."""
    spec = copy.deepcopy(layer_spec)
    attn = spec.submodules.self_attention
    if attn is None or not hasattr(attn.submodules, "core_attention"):
        raise ValueError("layer spec has no self_attention.submodules.core_attention to replace")
    params = {"backend": check_backend(backend)} if backend else {}
    attn.submodules.core_attention = ModuleSpec(module=CoreAttention, params=params)
    return spec


def gpt_layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False, backend: str | None = None):
    """megatron `get_gpt_layer_local_spec` with CoreAttention: the LM decoder layer spec for packed rows and CP."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return with_core_attention(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm),
                               backend)


def use_per_token_mrope_under_cp(gpt_model) -> None:
    """Stop megatron re-slicing M-RoPE for CP: our position ids are already this rank's zigzag share.

    megatron 0.16.1 `MultimodalRotaryEmbedding.forward` slices its output along the whole row into 2·CP chunks
    (`get_pos_emb_on_this_cp_rank`) when its cp_group has >1 rank; that is right only for unsplit, contiguous
    positions. With packed samples split per segment it must see no CP group. Call once after building GPTModel.
    """
    rope = getattr(gpt_model, "rotary_pos_emb", None)
    if rope is not None and hasattr(rope, "cp_group"):
        rope.cp_group = None
