"""A RoPE kernel for megatron's fused-RoPE slot when Transformer Engine is absent (CUDA only).

megatron-core 0.16.1 `apply_rotary_pos_emb` (models/common/embeddings/rope_utils.py) calls the module global
`fused_apply_rotary_pos_emb(t, freqs, interleaved=...)` when `config.apply_rope_fusion` is set, and
`TransformerConfig.__post_init__` refuses the flag while that global is None (it is TE's kernel). Its unfused
path runs ~8 elementwise kernels per call and keeps cos/sin per call for the backward. We fill the slot with the
same formula compiled by torch.compile: one fused kernel forward and backward, keeping only the shared position
table. Written for megatron-core 0.16.1 (the package's version check, compat/__init__.py, guards it).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

_COMPILED = {}


def _rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """megatron's `_apply_rotary_pos_emb_bshd` (non-interleaved, mscale 1): t [s, b, h, d], freqs [s, b|1, 1, r]."""
    rot = freqs.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    out = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_):
    """The signature megatron calls in its fused slot (TE's, minus the options megatron does not pass here)."""
    if interleaved:
        raise NotImplementedError("interleaved RoPE has no compiled kernel here; set apply_rope_fusion=False")
    if "rope" not in _COMPILED:
        _COMPILED["rope"] = torch.compile(_rope, dynamic=True)
    return _COMPILED["rope"](t, freqs)


def install() -> None:
    """Put the kernel into megatron's fused-RoPE slot (idempotent; CUDA only; TE's kernel, if present, stays)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the compiled RoPE kernel is for CUDA; on CPU keep apply_rope_fusion=False")
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
