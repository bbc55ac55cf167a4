"""Self-attention whose QKV bias and RoPE run as one kernel on the QKV GEMM's output (CUDA).

megatron-core 0.16.1 `SelfAttention` adds the QKV bias in its own broadcast kernel (ColumnParallelLinear, local
spec), splits q / k / v as views of that buffer, and rotates q and k in two more kernels (`apply_rotary_pos_emb`);
the backward reverses each and concatenates the gradients. Its one-pass alternative (`fused_single_qkv_rope`)
needs Transformer Engine and no packed_seq_params. At the 3B's ViT over 128,960 patches those steps took ~3.9 ms
of every block forward and ~3.6 ms of its backward (benchmarks/bench_vit_tower.py --profile, H200).

`QKVRopeSelfAttention` takes the GEMM output and the bias separately and runs bias + split + RoPE of q and k as
one compiled function that returns q, k, v as three contiguous tensors, then lets megatron's forward continue with
RoPE already applied. The backward is written out (`QKVBiasRope`): the gradient of the GEMM output is dq and dk
through RoPE's transpose (the rotation by −θ), laid into the QKV buffer beside dv, one compiled kernel with the
bias gradient's row sum. It changes nothing else: where the fused path does not apply (CPU, inference, thd
packing, gated / q-k-normed / TP-regrouped heads, megatron's YaRN mscale, per-q/k rope tuples) megatron's own
code runs. Written for megatron-core 0.16.1 (the
compat package's version check guards it).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp

from megatron_mmpl.attention.qkv_rope_backward import qkv_rope_grad_triton

_COMPILED: dict[tuple, object] = {}
# The backward's kernel on CUDA: "triton" (attention/qkv_rope_backward.py; the default where Triton is installed)
# or "compiled" (inductor's, from `_qkv_bias_rope_grad`); MMPL_QKV_ROPE_BACKWARD picks one. The Triton kernel does
# in 1.4 ms per ViT block what inductor's does in 4.9 (the ViT tower's fwd+bwd kernel time 1.66 against 1.75 s,
# H100, 2026-12-07; docs/PERFORMANCE.md).
BACKWARD = os.environ.get("MMPL_QKV_ROPE_BACKWARD", "triton")
if BACKWARD not in ("compiled", "triton"):
    raise ValueError(f"MMPL_QKV_ROPE_BACKWARD={BACKWARD!r}: set it to 'triton' (the default) or 'compiled'")
_TRITON_BACKWARD = BACKWARD == "triton" and importlib.util.find_spec("triton") is not None  # looked up once


def qkv_bias_rope(mixed: torch.Tensor, bias: torch.Tensor | None, freqs: torch.Tensor, q_per_group: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixed [s, b, ng·(q_per_group+2)·d] (the GEMM output, bias not added; megatron's head-group interleaved
    layout), bias [ng·(q_per_group+2)·d] or None, freqs [s, b|1, 1, r] (r ≤ d, non-interleaved rotation) →
    q [s, b, ng·q_per_group, d], k and v [s, b, ng, d], contiguous; compiled on CUDA."""
    if not mixed.is_cuda:
        return _qkv_bias_rope(mixed, bias, freqs, q_per_group, head_dim)
    return QKVBiasRope.apply(mixed, bias, freqs, q_per_group, head_dim)


class QKVBiasRope(torch.autograd.Function):
    """The compiled forward with the backward written out: d(mixed) = [Rᵀ·dq, Rᵀ·dk, dv] in megatron's
    head-group layout, d(bias) its sum over rows. On CUDA that is one Triton kernel (attention/qkv_rope_backward.py)
    and ATen's row sum; with MMPL_QKV_ROPE_BACKWARD=compiled, or without Triton, one compiled function. The
    backward autograd derives from the forward's graph took 4.97 ms per ViT block against 0.77 ms for the forward
    (bench_vit_tower.py --profile, H200, 2026-12-04); benchmarks/bench_qkv_rope.py times the variants."""

    @staticmethod
    def forward(ctx, mixed, bias, freqs, q_per_group: int, head_dim: int):
        ctx.save_for_backward(freqs)
        ctx.layout = (q_per_group, head_dim, bias is not None)
        fn = compiled_qkv_bias_rope(q_per_group, head_dim, bias is not None)
        with torch.no_grad():
            return fn(*sequence_dynamic(mixed, freqs), bias)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (freqs,) = ctx.saved_tensors
        q_per_group, head_dim, has_bias = ctx.layout
        if dv.is_cuda and _TRITON_BACKWARD:
            dmixed = qkv_rope_grad_triton(dq, dk, dv, freqs, q_per_group, head_dim)
            return dmixed, (dmixed.sum((0, 1)) if has_bias else None), None, None, None
        dmixed, dbias = compiled_qkv_bias_rope_grad(*ctx.layout)(*sequence_dynamic(dq, dk, dv, freqs))
        return dmixed, dbias, None, None, None


def compiled_qkv_bias_rope_grad(q_per_group: int, head_dim: int, has_bias: bool):
    """The compiled backward of `QKVBiasRope` for one head layout (the sequence length dynamic)."""
    key = ("grad", q_per_group, head_dim, has_bias)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(lambda dq, dk, dv, f: _qkv_bias_rope_grad(dq, dk, dv, f, q_per_group,
                                                                                 head_dim, has_bias))
    return _COMPILED[key]


def _qkv_bias_rope_grad(dq, dk, dv, freqs, q_per_group: int, head_dim: int, has_bias: bool):
    s, b = dv.shape[:2]
    dq = rope_bshd_transpose(dq, freqs).reshape(s, b, -1, q_per_group * head_dim)
    dk = rope_bshd_transpose(dk, freqs)
    dmixed = torch.cat([dq, dk, dv], dim=3).reshape(s, b, -1)
    return dmixed, (dmixed.sum((0, 1)) if has_bias else None)


def compiled_qkv_bias_rope(q_per_group: int, head_dim: int, has_bias: bool):
    """The compiled function for one head layout. Only the sequence length varies between calls (marked dynamic
    by `sequence_dynamic`)."""
    key = (q_per_group, head_dim, has_bias)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(lambda m, f, b: _qkv_bias_rope(m, b, f, q_per_group, head_dim))
    return _COMPILED[key]


def sequence_dynamic(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mark dim 0 (the sequence) of each input to a compiled RoPE function dynamic, so one graph serves every row
    length while heads, head_dim and the rotary width stay static and the generated kernels index with constants.
    `dynamic=True` made every dimension symbolic: the fused kernel's backward then took 11 ms per ViT block, ~7×
    its forward (benchmarks/bench_vit_tower.py --profile, H200, 2026-12-03)."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return tensors


def rope_bshd(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """megatron's `_apply_rotary_pos_emb_bshd` (non-interleaved, mscale 1): t [s, b, h, d], freqs [s, b|1, 1, r]
    (r ≤ d: the rest of d passes through)."""
    rot = freqs.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    out = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rope_bshd_transpose(g: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The transpose of `rope_bshd` as a linear map of t, applied to g: g·cos + Pᵀ(g·sin), where P(x) = [−x₂, x₁]
    is the half rotation, so Pᵀ(z) = [z₂, −z₁]. (With both halves of freqs equal, as RoPE builds them, this is the
    rotation by −θ; written out it holds for any freqs.)"""
    rot = freqs.shape[-1]
    x, rest = g[..., :rot], g[..., rot:]
    cos, sin = torch.cos(freqs).to(g.dtype), torch.sin(freqs).to(g.dtype)
    z1, z2 = torch.chunk(x * sin, 2, dim=-1)
    out = x * cos + torch.cat((z2, -z1), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def _qkv_bias_rope(mixed, bias, freqs, q_per_group: int, head_dim: int):
    x = mixed if bias is None else mixed + bias
    s, b = x.shape[:2]
    x = x.view(s, b, -1, (q_per_group + 2) * head_dim)
    q, k, v = torch.split(x, [q_per_group * head_dim, head_dim, head_dim], dim=3)
    q = rope_bshd(q.reshape(s, b, -1, head_dim), freqs)
    return q.contiguous(), rope_bshd(k, freqs).contiguous(), v.contiguous()


def fusable(attn: SelfAttention) -> bool:
    """Whether the one-kernel path computes what megatron's SelfAttention would for this layer's structure."""
    cfg = attn.config
    plain = lambda norm: norm is None or isinstance(norm, IdentityOp)  # the local spec builds IdentityOp
    return bool(not cfg.attention_output_gate and not cfg.flash_decode and not cfg.rotary_interleaved
                and plain(attn.q_layernorm) and plain(attn.k_layernorm) and cfg.num_query_groups >= attn.world_size
                and _yarn_get_concentration_factor_from_config(cfg) == 1.0)


class QKVRopeSelfAttention(SelfAttention):
    """megatron's SelfAttention with the QKV bias and q/k RoPE in one kernel where `fused_qkv_rope` is set: the
    spec asks for it (`fused_qkv_rope=True`) and the config runs fused kernels (config.apply_rope_fusion, i.e.
    CUDA with model.fused_kernels) on a layer `fusable` accepts."""

    def __init__(self, *args, fused_qkv_rope: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_qkv_rope = fused_qkv_rope and bool(self.config.apply_rope_fusion) and fusable(self)
        self._rope = None

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        rope, psp = kwargs.get("rotary_pos_emb"), kwargs.get("packed_seq_params")
        if not (self.fused_qkv_rope and isinstance(rope, torch.Tensor) and not args
                and kwargs.get("inference_context") is None and kwargs.get("key_value_states") is None
                and (psp is None or psp.qkv_format == "sbhd")):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        self._rope = rope
        try:  # megatron's forward, with RoPE already applied by get_query_key_value_tensors
            return super().forward(hidden_states, attention_mask, **{**kwargs, "rotary_pos_emb": None})
        finally:
            self._rope = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        if self._rope is None or output_gate or not split_qkv:
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        lin = self.linear_qkv
        lin.skip_bias_add = True  # the bias goes into the fused kernel instead of its own broadcast add
        try:
            mixed, bias = lin(hidden_states)
        finally:
            lin.skip_bias_add = False
        per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        return qkv_bias_rope(mixed, bias, self._rope, per_group, self.hidden_size_per_attention_head)
