"""The backward of the fused QKV-bias-RoPE (`qkv_rope.QKVBiasRope`) as one Triton kernel: d(mixed) = [Rᵀ·dq, Rᵀ·dk,
dv] in megatron's head-group layout, read from the gradients the attention hands back in whatever strides they
have, written once; the bias gradient's row sum is left to ATen. Why: inductor's kernel for the same function takes
~4.6 ms per ViT block at 128,960 patches, ~1.6 ms this one (benchmarks/bench_qkv_rope.py, H100, 2026-12-07).
The default on CUDA where Triton is installed (MMPL_QKV_ROPE_BACKWARD=compiled picks inductor's,
attention/qkv_rope.py). In the ViT tower's forward + backward the kernel time fell from 1.75 to 1.66 s
(bench_vit_tower.py --profile, H100, 2026-12-07; docs/PERFORMANCE.md says how an order effect first hid it).
"""

from __future__ import annotations

import torch

_KERNEL = None


def qkv_rope_grad_triton(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, freqs: torch.Tensor,
                         q_per_group: int, head_dim: int) -> torch.Tensor:
    """dq [s, b, ng·q_per_group, d], dk and dv [s, b, ng, d] (any strides with the last dim contiguous), freqs
    [s, b|1, 1, r] (r ≤ d, non-interleaved) → d(mixed) [s, b, ng·(q_per_group+2)·d], contiguous, in dq's dtype.
    The rotation is applied in fp32 (fp64 for fp64 inputs)."""
    kernel = _kernel()
    import triton  # lazy: Triton is installed only with CUDA torch; CPU runs never get here

    s, b, groups, d = dv.shape
    rot = freqs.shape[-1]
    if d != head_dim or rot > d or rot % 2 or dq.shape[2] != groups * q_per_group:
        raise ValueError(f"qkv_rope_grad_triton: dq {tuple(dq.shape)}, dv {tuple(dv.shape)}, freqs "
                         f"{tuple(freqs.shape)} do not fit q_per_group={q_per_group}, head_dim={head_dim}")
    dq, dk, dv, freqs = (t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk, dv, freqs))
    out = torch.empty(s, b, groups * (q_per_group + 2) * d, device=dv.device, dtype=dv.dtype)
    rows = s * b
    block_d = triton.next_power_of_2(d)
    block_rows = max(1, 4096 // block_d)
    fb = freqs.stride(1) if freqs.shape[1] > 1 else 0
    kernel[(triton.cdiv(rows, block_rows), groups)](
        dq, dk, dv, freqs, out, rows, b,
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2), freqs.stride(0), fb,
        QPG=q_per_group, D=d, R=rot, BD=block_d, BR=block_rows, F64=dv.dtype == torch.float64,
    )
    return out


def _kernel():
    """The Triton kernel, defined on first use (Triton is imported only where a GPU runs it)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton  # lazy: Triton is installed only with CUDA torch
    import triton.language as tl  # lazy: as above

    @triton.jit
    def qkv_rope_grad_kernel(dq, dk, dv, freqs, out, rows, B,
                             sq0, sq1, sq2, sk0, sk1, sk2, sv0, sv1, sv2, sf0, sf1,
                             QPG: tl.constexpr, D: tl.constexpr, R: tl.constexpr, BD: tl.constexpr,
                             BR: tl.constexpr, F64: tl.constexpr):
        # one program: BR rows (s·b) of one head group; every head of the group is a [BR, BD] tile
        group = tl.program_id(1)
        row = tl.program_id(0) * BR + tl.arange(0, BR)
        si, bi = (row // B).to(tl.int64), (row % B).to(tl.int64)
        col = tl.arange(0, BD)
        half = R // 2
        partner = tl.where(col < half, col + half, col - half)  # the other half of the rotated pair
        sign = tl.where(col < half, 1.0, -1.0)
        rot = (col < R)[None, :]
        keep = (row < rows)[:, None] & (col < D)[None, :]
        ftype = tl.float64 if F64 else tl.float32
        f_row = freqs + si[:, None] * sf0 + bi[:, None] * sf1
        cos = tl.cos(tl.load(f_row + col[None, :], mask=keep & rot, other=0.0).to(ftype))
        sin_partner = tl.sin(tl.load(f_row + partner[None, :], mask=keep & rot, other=0.0).to(ftype))
        width = (QPG + 2) * D
        o_row = out + row.to(tl.int64)[:, None] * (tl.num_programs(1) * width) + group * width
        for h in tl.static_range(QPG + 1):  # q heads of the group, then its k head: Rᵀ·g
            if h < QPG:
                g_row = dq + si[:, None] * sq0 + bi[:, None] * sq1 + (group * QPG + h) * sq2
            else:
                g_row = dk + si[:, None] * sk0 + bi[:, None] * sk1 + group * sk2
            x = tl.load(g_row + col[None, :], mask=keep, other=0.0).to(ftype)
            x_partner = tl.load(g_row + partner[None, :], mask=keep & rot, other=0.0).to(ftype)
            y = tl.where(rot, x * cos + sign[None, :] * x_partner * sin_partner, x)
            tl.store(o_row + h * D + col[None, :], y.to(out.dtype.element_ty), mask=keep)
        v = tl.load(dv + si[:, None] * sv0 + bi[:, None] * sv1 + group * sv2 + col[None, :], mask=keep)
        tl.store(o_row + (QPG + 1) * D + col[None, :], v, mask=keep)

    _KERNEL = qkv_rope_grad_kernel
    return _KERNEL
