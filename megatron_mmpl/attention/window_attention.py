"""Attention within short windows (the ViT's, ≤ 128 rows each) as one Triton kernel, forward or backward: one
program per (window, batch row, head) holds the window's q, k, v in registers, so the whole softmax is exact in one
pass, the backward needs no saved statistics and no atomics, and q, k, v are read and the output written in the
[s, b, h, d] layout the attention module uses (no regrouping copies, no `cat`).

Why: at the ViT's shape (128,960 patches, 16 heads of 80, windows of 64 and 48 patches) cuDNN's kernels through
`sdpa.sdpa_blocks` took ~1.1 ms forward and ~2.6 ms backward per window block, plus the copies that regroup the
windows into batches, for ~0.04 TFLOP of work (bench_vit_tower.py --profile, H100, 2026-12-07): the windows are
far too short for a flash kernel's tiles. Where it runs: `sdpa.sdpa_blocks`, for self-attention whose equal-size
blocks tile the rows back to back (the ViT's windows after the tower's regrouping), no mask inside a window, no
dropout, no GQA, windows up to 128 rows and heads up to 128 wide, on CUDA in bf16, fp16 or fp32 (or in any dtype
under TRITON_INTERPRET=1).
MMPL_WINDOW_ATTENTION=sdpa keeps SDPA there.

Arithmetic as a flash kernel's: q·kᵀ accumulated in fp32 (fp64 for fp64; IEEE, not TF32, for fp32 inputs),
softmax in fp32, probabilities cast to the input dtype for P·V and its gradients.
tests/unit/attention/test_window_attention.py holds it to the written-out attention in fp64 and bf16.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

KERNEL = os.environ.get("MMPL_WINDOW_ATTENTION", "triton")
if KERNEL not in ("triton", "sdpa"):
    raise ValueError(f"MMPL_WINDOW_ATTENTION={KERNEL!r}: set it to 'triton' (the default) or 'sdpa'")
MAX_ROWS, MAX_HEAD_DIM = 128, 128

_KERNEL = None


def fits(q: torch.Tensor, k: torch.Tensor, sizes: list[tuple[int, int]], dropout_p: float) -> bool:
    """Whether windows of these (count, rows) sizes, back to back, run here rather than through SDPA."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    where = (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16, torch.float32)) or interpreted
    return (KERNEL == "triton" and where and _have_triton() and dropout_p == 0.0 and q.shape[2] == k.shape[2]
            and q.shape[-1] <= MAX_HEAD_DIM and max(rows for _, rows in sizes) <= MAX_ROWS)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: list[tuple[int, int]],
                     scale: float) -> torch.Tensor:
    """q, k, v [s, b, h, d] (last dim contiguous); `sizes` [(n, rows), ...]: n windows of `rows` rows each, back to
    back from row 0 in this order, covering all s rows → [s, b, h, d], contiguous."""
    if sum(n * rows for n, rows in sizes) != q.shape[0] or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"window_attention: windows {sizes} do not tile q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    starts, lens = _table(tuple(sizes), str(q.device))
    return WindowAttention.apply(q, k, v, starts, lens, max(rows for _, rows in sizes), scale)


class WindowAttention(torch.autograd.Function):
    """Saves q, k, v and the output (what SDPA saves, less its log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v, starts, lens, max_rows, scale):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        _launch(False, (q, k, v, out, out, out, out, out), starts, lens, max_rows, scale)  # out for the unused
        ctx.save_for_backward(q, k, v, out, starts, lens)
        ctx.max_rows, ctx.scale = max_rows, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, starts, lens = ctx.saved_tensors
        dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
        _launch(True, (q, k, v, out, dout if dout.stride(-1) == 1 else dout.contiguous(), dq, dk, dv), starts, lens,
                ctx.max_rows, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _launch(backward: bool, tensors, starts, lens, max_rows: int, scale: float) -> None:
    """tensors: q, k, v, out, d(out), dq, dk, dv (the forward passes `out` for the last four)."""
    import triton  # lazy: Triton ships with CUDA torch only

    q = tensors[0]
    s, b, h, d = q.shape
    strides = [x for i in (0, 1, 2, 4) for x in tensors[i].stride()[:3]]  # q, k, v and d(out): any strides
    wide = q.dtype in (torch.float32, torch.float64)
    _kernel()[(lens.numel(), b * h)](
        *tensors, starts, lens, scale, h, b, *strides, D=d, BL=max(16, triton.next_power_of_2(max_rows)),
        BD=max(16, triton.next_power_of_2(d)), PREC="ieee" if wide else "tf32",
        DOT_F32=not wide and os.environ.get("TRITON_INTERPRET") == "1", BACKWARD=backward)


@functools.lru_cache(maxsize=16)
def _table(sizes: tuple[tuple[int, int], ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's first row and row count, int32 on the device; cached (a ViT's page sizes repeat)."""
    lens = torch.cat([torch.full((n,), rows, dtype=torch.int32) for n, rows in sizes])
    starts = torch.cumsum(lens, 0, dtype=torch.int32) - lens
    return starts.to(device), lens.to(device)


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel():
    """The Triton kernel, defined on first use (Triton is imported only where a GPU, or its interpreter, runs it)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton  # lazy: Triton ships with CUDA torch only
    import triton.language as tl  # lazy: as above

    # One program: window program_id(0), batch row and head program_id(1); [BL, BD] tiles of its rows (padded rows
    # and columns masked). The forward writes out; the backward (BACKWARD) recomputes the probabilities and writes
    # dq, dk, dv. Outputs and gradients are contiguous [s, b, h, d].
    @triton.jit
    def window_attention_kernel(q, k, v, out, dout, dq, dk, dv, starts, lens, scale, H, B,
                                sq0, sq1, sq2, sk0, sk1, sk2, sv0, sv1, sv2, sg0, sg1, sg2,
                                D: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                                DOT_F32: tl.constexpr, BACKWARD: tl.constexpr):
        bi, head = tl.program_id(1) // H, tl.program_id(1) % H
        n = tl.load(lens + tl.program_id(0))
        i, c = tl.arange(0, BL), tl.arange(0, BD)
        row = tl.load(starts + tl.program_id(0)).to(tl.int64) + i
        keep = (i < n)[:, None] & (c < D)[None, :]
        at = ((row[:, None] * B + bi) * H + head) * D + c[None, :]
        qt = tl.load(q + row[:, None] * sq0 + bi * sq1 + head * sq2 + c[None, :], mask=keep, other=0.0)
        kt = tl.load(k + row[:, None] * sk0 + bi * sk1 + head * sk2 + c[None, :], mask=keep, other=0.0)
        vt = tl.load(v + row[:, None] * sv0 + bi * sv1 + head * sv2 + c[None, :], mask=keep, other=0.0)
        pt = qt.dtype  # probabilities and score gradients are rounded to it before their products
        if DOT_F32:  # Triton's interpreter multiplies bf16 wrongly: the same products in fp32
            qt, kt, vt = qt.to(tl.float32), kt.to(tl.float32), vt.to(tl.float32)
        sc = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale
        sc = tl.where((i < n)[None, :], sc, float("-inf"))
        p = tl.exp(sc - tl.max(sc, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        if BACKWARD:
            gt = tl.load(dout + row[:, None] * sg0 + bi * sg1 + head * sg2 + c[None, :], mask=keep, other=0.0)
            ot = tl.load(out + at, mask=keep, other=0.0)
            if DOT_F32:
                gt = gt.to(tl.float32)
            dvt = tl.dot(tl.trans(p.to(pt).to(vt.dtype)), gt, input_precision=PREC)
            dp = tl.dot(gt, tl.trans(vt), input_precision=PREC)
            delta = tl.sum(gt.to(dp.dtype) * ot.to(dp.dtype), 1)
            ds = (p * (dp - delta[:, None])).to(pt).to(qt.dtype)
            dqt = tl.dot(ds, kt, input_precision=PREC) * scale
            dkt = tl.dot(tl.trans(ds), qt, input_precision=PREC) * scale
            tl.store(dq + at, dqt.to(dq.dtype.element_ty), mask=keep)
            tl.store(dk + at, dkt.to(dk.dtype.element_ty), mask=keep)
            tl.store(dv + at, dvt.to(dv.dtype.element_ty), mask=keep)
        else:
            o = tl.dot(p.to(pt).to(vt.dtype), vt, input_precision=PREC)
            tl.store(out + at, o.to(out.dtype.element_ty), mask=keep)

    _KERNEL = window_attention_kernel
    return _KERNEL
