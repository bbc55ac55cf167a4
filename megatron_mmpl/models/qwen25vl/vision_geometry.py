"""Where each ViT patch sits: 2D rotary coordinates, attention segments (per frame, per window) and the
window order, computed from the image/video grids.

Patches arrive as the Qwen2.5-VL processor emits them: per image, frame-major, then merge blocks of
m×m patches in row-major block order. Window attention groups merge blocks into windows of
`window_size / patch_size / m` blocks per side; the ViT runs in window order and is restored afterwards.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def _grids(grid_thw) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in g) for g in torch.as_tensor(grid_thw).view(-1, 3).tolist()]


def patch_coords(grid_thw, merge: int) -> torch.Tensor:
    """(row, col) of every patch in processor order → [n_patches, 2] int64."""
    return torch.cat([_frame_coords(h, w, merge).repeat(t, 1) for t, h, w in _grids(grid_thw)])


@lru_cache(maxsize=64)  # a document's pages mostly share one grid: each is built once
def _frame_coords(h: int, w: int, merge: int) -> torch.Tensor:
    bh, bw = torch.meshgrid(torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
    i, j = torch.meshgrid(torch.arange(merge), torch.arange(merge), indexing="ij")
    rows = (bh[:, :, None, None] * merge + i).reshape(-1)  # [blocks × m × m]
    cols = (bw[:, :, None, None] * merge + j).reshape(-1)
    return torch.stack([rows, cols], dim=1)


def frame_cu_seqlens(grid_thw) -> torch.Tensor:
    """Full-attention segments: one per frame (h·w patches) → cu_seqlens [n_frames + 1] int32."""
    lens = [h * w for t, h, w in _grids(grid_thw) for _ in range(t)]
    return torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)


def window_order(grid_thw, merge: int, window_size: int, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window order of merge blocks and the window segments.

    Returns (order [n_blocks] int64: processor block index at each window-order position,
    cu_window_seqlens [n_windows + 1] int32 in patches). Windows tile each frame row-major; a window at the
    right/bottom edge is smaller when the grid is not a multiple of the window.
    """
    win = window_size // merge // patch_size  # window side, in merge blocks
    orders, lens, base = [], [], 0
    for t, h, w in _grids(grid_thw):
        bh, bw = h // merge, w // merge
        nwh, nww = -(-bh // win), -(-bw // win)
        f, r, c = torch.meshgrid(torch.arange(t), torch.arange(bh), torch.arange(bw), indexing="ij")
        key = ((f * nwh + r // win) * nww + c // win).reshape(-1)  # window id of every block, processor order
        orders.append(torch.sort(key, stable=True).indices + base)  # stable: row-major inside a window
        counts = torch.bincount(key, minlength=t * nwh * nww)
        lens.append(counts[counts > 0])
        base += t * bh * bw
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(lens).cumsum(0) * merge * merge])
    return torch.cat(orders), cu.to(torch.int32)


def vision_rope_freqs(grid_thw, merge: int, head_dim: int, theta: float) -> torch.Tensor:
    """Rotary angles per patch, processor order → [n_patches, head_dim/2]: row angles then column angles."""
    return rope_from_coords(patch_coords(grid_thw, merge), vision_inv_freq(head_dim, theta))


def vision_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """The 2D RoPE's inverse frequencies [head_dim/4], fp32, computed on the host (one place, so that the angles
    are the same bits wherever they are multiplied out)."""
    half = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))


def rope_from_coords(coords: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """(row, col) per patch [n, 2] (any integer dtype) and `vision_inv_freq` on the same device → angles
    [n, head_dim/2] fp32: row·inv_freq then col·inv_freq, one IEEE product each, so host and GPU give the same bits."""
    rc = coords.float()
    return torch.cat([rc[:, :1] * inv_freq, rc[:, 1:] * inv_freq], dim=-1)


def windows_by_size(order: torch.Tensor, cu_window: torch.Tensor, frame_cu: torch.Tensor, unit: int):
    """The window order regrouped so that windows of one size lie back to back (largest first, stable), which lets
    every window block attend to its equal windows as one batched view with no gather; full-attention blocks,
    whose frames this may scatter, reorder rows into frames themselves.

    Takes `window_order`'s (order, cu_window) and the frames' cu_seqlens (patches); returns (order, cu_window)
    regrouped and `src` [n_patches] int64 — regrouped patch row i is row src[i] of the window order (frames are
    contiguous there) — or None when every frame stays contiguous and in place (one window size, or one frame).
    """
    lens = (cu_window[1:] - cu_window[:-1]).long()
    by_size = torch.sort(-lens, stable=True).indices
    if torch.equal(by_size, torch.arange(lens.numel())):
        return order, cu_window, None
    starts = cu_window[:-1].long()[by_size]
    sized = lens[by_size]
    src = torch.repeat_interleave(starts - (sized.cumsum(0) - sized), sized) + torch.arange(int(sized.sum()))
    blocks = src.view(-1, unit)[:, 0] // unit  # whole merge blocks move together
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), sized.cumsum(0)]).to(cu_window.dtype)
    frame = torch.bucketize(src, frame_cu[1:].long(), right=True)  # frame of each regrouped row
    in_place = bool((frame[1:] >= frame[:-1]).all())
    return order[blocks], cu, None if in_place else src
