"""Which query rows attend to which key rows in a packed row, with or without context parallelism.

Queries are this rank's local rows; keys are the full row (after the CP all-gather, in packed order). With CP the
local rows of each segment are its zigzag chunks r and 2·CP−1−r (see parallel/context_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    """Local queries [q_start, q_start+q_len) attend keys [kv_start, kv_start+kv_len).

    causal: lower-right aligned causal mask (the last query sees the last key); else no mask.
    """

    q_start: int
    q_len: int
    kv_start: int
    kv_len: int
    causal: bool
    seg: int  # index of the segment in cu_seqlens


def segment_bounds(cu_seqlens, total_len: int) -> list[int]:
    """Boundaries as a list; rows after cu_seqlens[-1] (trailing row padding) form one more segment."""
    if cu_seqlens is None:
        return [0, total_len]
    cu = [int(x) for x in cu_seqlens.tolist()] if torch.is_tensor(cu_seqlens) else [int(x) for x in cu_seqlens]
    if cu[0] != 0 or any(b < a for a, b in zip(cu[:-1], cu[1:])) or cu[-1] > total_len:
        raise ValueError(f"cu_seqlens {cu} must start at 0, not decrease, and end at most at the row length "
                         f"{total_len}")
    return cu + [total_len] if cu[-1] < total_len else cu


def plan_blocks(cu: list[int], causal: bool, cp_rank: int = 0, cp_size: int = 1) -> list[Block]:
    """Blocks covering this rank's local query rows in order (empty segments skipped)."""
    blocks, local = [], 0
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        n = b - a
        if n == 0:
            continue
        if cp_size == 1:
            blocks.append(Block(a, n, a, n, causal, i))
            continue
        if n % (2 * cp_size):
            raise ValueError(f"segment [{a}, {b}) length {n} is not a multiple of 2*cp={2 * cp_size}; split the "
                             "batch with megatron_mmpl.parallel.context_parallel.split_packed_batch")
        c = n // (2 * cp_size)
        for j in (cp_rank, 2 * cp_size - 1 - cp_rank):
            kv_len = (j + 1) * c if causal else n
            blocks.append(Block(local, c, a, kv_len, causal, i))
            local += c
    return blocks


def token_coords(blocks: list[Block], cu: list[int], device) -> tuple[torch.Tensor, ...]:
    """(q_seg, q_pos, kv_seg, kv_pos) int32 per row, for a mask function: same segment (and q_pos >= kv_pos)."""
    q_seg, q_pos = [], []
    for blk in blocks:
        # global row of the last query = last visible key (lower-right alignment of causal blocks)
        last = blk.kv_start + (blk.kv_len if blk.causal else blk.q_len) - 1
        q_seg.append(torch.full((blk.q_len,), blk.seg, dtype=torch.int32))
        q_pos.append(torch.arange(last - blk.q_len + 1, last + 1, dtype=torch.int32))
    kv_seg = torch.repeat_interleave(torch.arange(len(cu) - 1, dtype=torch.int32), torch.tensor(cu).diff())
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int32)
    return (cat(q_seg).to(device), cat(q_pos).to(device), kv_seg.to(device),
            torch.arange(cu[-1], dtype=torch.int32, device=device))


@dataclass(frozen=True)
class BlockGroup:
    """Blocks of one shape (q_len, kv_len, causal), run as one batched attention call.

    The n blocks sit back to back from `q_start` / `kv_start` (after the plan's `perm`, if any), or, when
    `q_rows` / `kv_rows` are given ([n·q_len] / [n·kv_len] int64), are gathered by them (CP: key ranges overlap).
    """

    n: int
    q_len: int
    kv_len: int
    causal: bool
    q_start: int
    kv_start: int
    q_rows: torch.Tensor | None = None
    kv_rows: torch.Tensor | None = None


@dataclass(frozen=True)
class GroupPlan:
    """All blocks of a forward grouped by shape. Self-attention rows (each block's keys are its own rows) are
    reordered once by `perm` so every group is back to back, and the output put back by `inverse`; under CP the
    groups gather their own rows and only `inverse` is used. None: already in order."""

    groups: tuple[BlockGroup, ...]
    perm: torch.Tensor | None
    inverse: torch.Tensor | None


def _rows(starts: list[int], length: int) -> torch.Tensor:
    return (torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(length)).reshape(-1)


def _back_to_back(starts: list[int], length: int) -> bool:
    return all(b - a == length for a, b in zip(starts[:-1], starts[1:]))


def group_blocks(blocks: list[Block], device) -> GroupPlan:
    """Group equal-shape blocks (a ViT's thousands of equal windows, a pack's equal samples) for batched calls."""
    by_shape: dict[tuple[int, int, bool], list[Block]] = {}
    for blk in blocks:
        by_shape.setdefault((blk.q_len, blk.kv_len, blk.causal), []).append(blk)
    own_keys = all(b.q_start == b.kv_start and b.q_len == b.kv_len for b in blocks)
    order = torch.cat([_rows([b.q_start for b in bl], q) for (q, _, _), bl in by_shape.items()]) if blocks \
        else torch.zeros(0, dtype=torch.int64)
    in_order = bool(torch.equal(order, torch.arange(order.numel())))
    groups, offset = [], 0
    for (q_len, kv_len, causal), blks in by_shape.items():
        qs, ks = [b.q_start for b in blks], [b.kv_start for b in blks]
        if own_keys:  # contiguous after the plan's permutation
            start = qs[0] if in_order else offset
            groups.append(BlockGroup(len(blks), q_len, kv_len, causal, start, start))
        else:
            groups.append(BlockGroup(
                len(blks), q_len, kv_len, causal, qs[0], ks[0],
                q_rows=None if _back_to_back(qs, q_len) else to_device(_rows(qs, q_len), device),
                kv_rows=None if _back_to_back(ks, kv_len) else to_device(_rows(ks, kv_len), device),
            ))
        offset += len(blks) * q_len
    if in_order:
        return GroupPlan(tuple(groups), None, None)
    inverse = to_device(inverse_permutation(order), device)
    return GroupPlan(tuple(groups), to_device(order, device) if own_keys else None, inverse)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on `device` without stalling the host: pinned and copied asynchronously on CUDA (a
    pageable copy would wait for all queued GPU work first)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class _PermuteRows(torch.autograd.Function):
    """x[perm] along dim 0 for a permutation: the backward is the gather by its inverse (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """argsort(perm) for a permutation of 0..n-1, by one scatter instead of a sort (a few ms on the host for the
    ViT's 128,960 rows)."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inverse


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[perm] (dim 0), differentiable; `inverse` = inverse_permutation(perm)."""
    return _PermuteRows.apply(x, perm, inverse)
