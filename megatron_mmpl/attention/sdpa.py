"""Torch SDPA over the blocks of a packed row: equal blocks batched into one call, never an S×S tensor for the
whole pack."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megatron_mmpl.attention import window_attention as windows
from megatron_mmpl.attention.segments import GroupPlan, permute_rows

# On GPU SDPA takes GQA as is (enable_gqa: measured as fast as repeated heads, with less memory —
# benchmarks/bench_attention.py, sdpa vs sdpa-gqa); MMPL_SDPA_EXPAND_KV=1 repeats K/V heads instead.
EXPAND_KV_ON_GPU = os.environ.get("MMPL_SDPA_EXPAND_KV", "0") == "1"


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, n_kv, s, d] → [B, n_kv·groups, s, d] (GQA heads repeated)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _take(x: torch.Tensor, start: int, rows: torch.Tensor | None, n: int, length: int) -> torch.Tensor:
    """Rows of n equal blocks of x [s, b, h, d] → [n·b, h, length, d] (a view when they are back to back)."""
    part = x[start:start + n * length] if rows is None else x.index_select(0, rows)
    return _batched(part, n, length)


def _batched(part: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n blocks back to back [n·length, b, h, d] → [n·b, h, length, d]."""
    b, h, d = part.shape[1:]
    return part.view(n, length, b, h, d).permute(0, 2, 3, 1, 4).reshape(n * b, h, length, d)


def _tiling(plan: GroupPlan, sq: int, sk: int) -> list[int] | None:
    """Row counts of the groups when they tile self-attention rows [0, sq) back to back in order (a ViT's windows
    after the tower's regrouping, a pack's samples), else None. Then q, k, v are cut with one `torch.split`, whose
    backward writes each gradient once (a slice per group would zero-fill and add a full-size gradient per group)."""
    sizes, at = [], 0
    for g in plan.groups:
        if g.q_rows is not None or g.kv_rows is not None or g.q_len != g.kv_len or g.q_start != at \
                or g.kv_start != at:
            return None
        sizes.append(g.n * g.q_len)
        at += sizes[-1]
    return sizes if at == sq == sk else None


def sdpa_blocks(q, k, v, plan: GroupPlan, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """q [sq, b, nq, d], k/v [sk, b, nkv, d] → [sq, b, nq, d]; one batched SDPA call per group of equal blocks
    (`segments.group_blocks`), so thousands of ViT windows cost a handful of kernels. Short unmasked windows that
    tile the rows (the ViT's) run as one Triton kernel instead where it fits (attention/window_attention.py)."""
    b, nq, d = q.shape[1:]
    groups = nq // k.shape[2]
    expand = groups > 1 and q.is_cuda and EXPAND_KV_ON_GPU
    if plan.perm is not None:  # self-attention: one reorder puts every group's rows back to back
        q, k, v = (permute_rows(t, plan.perm, plan.inverse) for t in (q, k, v))
    sizes = _tiling(plan, q.shape[0], k.shape[0])
    if sizes is not None and not any(g.causal for g in plan.groups):
        tiles = [(g.n, g.q_len) for g in plan.groups]
        if windows.fits(q, k, tiles, dropout_p):
            return _in_plan_order(windows.window_attention(q, k, v, tiles, scale), plan)
    split = sizes is not None and len(plan.groups) > 1
    if split:
        parts = zip(*(torch.split(t, sizes) for t in (q, k, v)))
    outs = []
    for g in plan.groups:
        if split:
            qs, ks, vs = (_batched(t, g.n, g.q_len) for t in next(parts))
        else:
            qs = _take(q, g.q_start, g.q_rows, g.n, g.q_len)
            ks = _take(k, g.kv_start, g.kv_rows, g.n, g.kv_len)
            vs = _take(v, g.kv_start, g.kv_rows, g.n, g.kv_len)
        if expand:
            ks, vs = _expand_kv(ks, groups), _expand_kv(vs, groups)
        mask, is_causal = None, False
        if g.causal and g.q_len == g.kv_len:
            is_causal = True
        elif g.causal:
            mask = causal_lower_right(g.q_len, g.kv_len)
        out = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
            enable_gqa=groups > 1 and not expand,
        )  # [n·b, nq, len, d]
        outs.append(out.view(g.n, b, nq, g.q_len, d).permute(0, 3, 1, 2, 4).reshape(g.n * g.q_len, b, nq, d))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # [sq, b, nq, d] in group order
    return _in_plan_order(out, plan)


def _in_plan_order(out: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """Rows of `out` (in group order) put back in the order of the rows the plan was made for."""
    if plan.perm is not None:
        return permute_rows(out, plan.inverse, plan.perm)
    return out if plan.inverse is None else out.index_select(0, plan.inverse)


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
