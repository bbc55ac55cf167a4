"""A RoPE kernel for megatron's fused-RoPE slot when Transformer Engine is absent (CUDA only).

megatron-core 0.16.1 `apply_rotary_pos_emb` (models/common/embeddings/rope_utils.py) calls the module global
`fused_apply_rotary_pos_emb(t, freqs, interleaved=...)` when `config.apply_rope_fusion` is set, and
`TransformerConfig.__post_init__` refuses the flag while that global is None (it is TE's kernel). Its unfused
path runs ~8 elementwise kernels per call and keeps cos/sin per call for the backward. We fill the slot with the
same formula (attention/qkv_rope.py's `rope_bshd`) compiled by torch.compile with only the length dynamic: one
fused kernel forward and backward, keeping only the shared position table. Written for megatron-core 0.16.1 (the
package's version check, compat/__init__.py, guards it).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_mmpl.attention.qkv_rope import rope_bshd, sequence_dynamic

_COMPILED = {}


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_):
    """The signature megatron calls in its fused slot (TE's, minus the options megatron does not pass here)."""
    if interleaved:
        raise NotImplementedError("interleaved RoPE has no compiled kernel here; set apply_rope_fusion=False")
    if "rope" not in _COMPILED:
        _COMPILED["rope"] = torch.compile(rope_bshd)
    return _COMPILED["rope"](*sequence_dynamic(t, freqs))


def install() -> None:
    """Put the kernel into megatron's fused-RoPE slot (idempotent; CUDA only; TE's kernel, if present, stays)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the compiled RoPE kernel is for CUDA; on CPU keep apply_rope_fusion=False")
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
