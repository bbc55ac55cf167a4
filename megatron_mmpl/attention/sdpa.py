"""Per-segment torch SDPA: one fused call per block of a packed row, so no S×S tensor for the whole pack."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megatron_mmpl.attention.segments import Block

# On GPU repeat GQA heads before SDPA so the cuDNN/flash kernels are eligible; MMPL_SDPA_EXPAND_KV=0 passes
# enable_gqa instead (less memory; benchmarks/bench_attention.py measures both as sdpa / sdpa-gqa).
EXPAND_KV_ON_GPU = os.environ.get("MMPL_SDPA_EXPAND_KV", "1") == "1"


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, n_kv, s, d] → [b, n_kv·groups, s, d] (GQA heads repeated, as SDPA's fused GPU kernels want them)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sdpa_blocks(q, k, v, blocks: list[Block], scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """q [sq, b, nq, d], k/v [sk, b, nkv, d] → [sq, b, nq, d]; each block is one SDPA call."""
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
    groups = q.shape[2] // k.shape[2]
    # CPU math supports enable_gqa; on GPU expand the heads so cuDNN/flash are eligible.
    expand = groups > 1 and q.is_cuda and EXPAND_KV_ON_GPU
    outs = []
    for blk in blocks:
        qs = qh[:, :, blk.q_start : blk.q_start + blk.q_len]
        ks = kh[:, :, blk.kv_start : blk.kv_start + blk.kv_len]
        vs = vh[:, :, blk.kv_start : blk.kv_start + blk.kv_len]
        if expand:
            ks, vs = _expand_kv(ks, groups), _expand_kv(vs, groups)
        mask, is_causal = None, False
        if blk.causal and blk.q_len == blk.kv_len:
            is_causal = True
        elif blk.causal:
            mask = causal_lower_right(blk.q_len, blk.kv_len)
        outs.append(F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
            enable_gqa=groups > 1 and not expand,
        ))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [b, nq, sq, d]
    return out.permute(2, 0, 1, 3)


def sdpa_dense(q, k, v, keep: torch.Tensor | None, is_causal: bool, scale: float, dropout_p: float = 0.0):
    """Unpacked batch with an explicit mask: q [sq, b, nq, d]; keep [b|1, 1|n, sq, sk] bool (True = attend)."""
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    if is_causal and keep is not None:
        keep = keep & torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril()
        is_causal = False
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep, is_causal=is_causal, dropout_p=dropout_p,
                                         scale=scale, enable_gqa=groups > 1)
    return out.permute(2, 0, 1, 3)
