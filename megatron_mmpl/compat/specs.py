"""Layer specs: megatron's local GPT spec (`get_gpt_layer_local_spec`) with our CoreAttention and the QKV-bias-RoPE
SelfAttention swapped in (its one-kernel path where the spec asks for it), and a torch RMSNorm built by megatron's
norm constructor; nothing else changed."""

from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mmpl.attention.backend import check_backend
from megatron_mmpl.attention.core_attention import CoreAttention
from megatron_mmpl.attention.qkv_rope import QKVRopeSelfAttention


def with_core_attention(layer_spec: ModuleSpec, backend: str | None = None,
                        fused_qkv_rope: bool = False) -> ModuleSpec:
    """Copy of a TransformerLayer spec whose self-attention uses CoreAttention (`backend` overrides the config),
    inside megatron's SelfAttention; `fused_qkv_rope`: its QKV bias and RoPE as one kernel on CUDA
    (attention/qkv_rope.py; where that is faster is measured per tower, see the callers)."""
    spec = copy.deepcopy(layer_spec)
    attn = spec.submodules.self_attention
    if attn is None or not hasattr(attn.submodules, "core_attention"):
        raise ValueError("layer spec has no self_attention.submodules.core_attention to replace")
    if attn.module is not SelfAttention:
        raise ValueError(f"layer spec's self_attention is {attn.module.__name__}, not megatron's SelfAttention")
    attn.module = QKVRopeSelfAttention
    attn.params = {**attn.params, "fused_qkv_rope": fused_qkv_rope}
    params = {"backend": check_backend(backend)} if backend else {}
    attn.submodules.core_attention = ModuleSpec(module=CoreAttention, params=params)
    return spec


def gpt_layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False, backend: str | None = None):
    """megatron `get_gpt_layer_local_spec` with CoreAttention: the LM decoder layer spec for packed rows and CP."""

    return with_core_attention(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm),
                               backend)


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's norm constructor. Under sequence parallelism its weight is marked
    `sequence_parallel`, so megatron's finalize_model_grads sums its gradient over TP (as apex/TE norms do;
    megatron's own torch-norm wrapper refuses sequence parallelism)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
