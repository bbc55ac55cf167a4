"""FlexAttention with a document mask: one kernel for a pack of many short segments (compiled on GPU)."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

_COMPILED = {}
_MASKS: dict = {}  # last few block masks: every layer of one forward reuses the same one
_MAX_MASKS = 4


def _flex():
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def document_block_mask(key, coords, causal: bool):
    """Block mask for 'same segment (and not in the future)', cached by `key` (a hashable description).

    coords: () → (q_seg, q_pos, kv_seg, kv_pos), called only on a cache miss.
    """
    if key in _MASKS:
        return _MASKS[key]
    q_seg, q_pos, kv_seg, kv_pos = coords()

    def mask_mod(b, h, qi, ki):
        same = q_seg[qi] == kv_seg[ki]
        return same & (q_pos[qi] >= kv_pos[ki]) if causal else same

    mask = create_block_mask(mask_mod, None, None, q_seg.numel(), kv_seg.numel(), device=q_seg.device,
                             _compile=q_seg.is_cuda)
    if len(_MASKS) >= _MAX_MASKS:
        _MASKS.pop(next(iter(_MASKS)))
    _MASKS[key] = mask
    return mask


def flex_packed(q, k, v, block_mask, scale: float) -> torch.Tensor:
    """q [sq, b, nq, d], k/v [sk, b, nkv, d] → [sq, b, nq, d]."""
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    fn = _flex() if q.is_cuda else flex_attention  # eager on CPU (tests): a reference-speed math path
    out = fn(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.permute(2, 0, 1, 3)
