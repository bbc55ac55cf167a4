"""Megatron's fused (bias-)SwiGLU slot filled with a Triton kernel, forward and backward (CUDA only).

megatron-core 0.16.1 `MLP.forward` (transformer/mlp.py) calls the module global `bias_swiglu_impl(input, bias,
fp8_input_store, cpu_offload_input)` when `config.bias_activation_fusion` is set and the activation is a gated SiLU:
both towers of Qwen2.5-VL (the ViT's MLP with biases, the LM's without). Megatron's are torch.compile'd elementwise
functions; in the ViT tower at 128,960 patches their backward took 2.23 ms a block, this kernel's 1.52 ms (the
forwards are at parity, 0.86 / 0.90 ms: bench_vit_tower.py --profile and benchmarks/bench_swiglu.py, H100,
2026-12-07). The kernel tiles [rows, F] with the gate and up halves read side by side, keeps megatron's arithmetic
(bias added, silu(a)·b, d/da of silu(a)·b) in fp32 and rounds once, like inductor's: equal to autograd of the
written-out function in fp64 to 1e-12, bf16 within one ulp (tests/unit/compat/test_swiglu.py).

`install()` swaps the name in mlp.py; MMPL_SWIGLU=compiled keeps megatron's compiled kernels. FP8 input storage
and activation offloading fall through to megatron's implementation. Written for megatron-core 0.16.1 (the
package's version check, compat/__init__.py, guards it).
"""

from __future__ import annotations

import os

import torch
from megatron.core.fusions import fused_bias_swiglu
from megatron.core.transformer import mlp

KERNEL = os.environ.get("MMPL_SWIGLU", "triton")
if KERNEL not in ("triton", "compiled"):
    raise ValueError(f"MMPL_SWIGLU={KERNEL!r}: set it to 'triton' (the default) or 'compiled'")

_KERNEL = None
_BR, _BC = 16, 128  # rows x columns of one tile: 2,048 elements, 4 warps


def swiglu_forward(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [rows, 2F] (gate | up), bias [2F] or None → silu(gate + b_g) · (up + b_u), [rows, F] in y's dtype."""
    rows, width = _check(y, bias)
    out = torch.empty(rows, width // 2, device=y.device, dtype=y.dtype)
    _launch(False, y, y, bias, out)  # y for the unused gradient
    return out


def swiglu_backward(g: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """g [rows, F], y [rows, 2F], bias [2F] or None → d(y) [rows, 2F]: [g·σ(a)·(1 + a·(1 − σ(a)))·b, g·silu(a)]
    with a = gate + b_g, b = up + b_u (megatron's `swiglu_back`)."""
    rows, width = _check(y, bias)
    if g.shape != (rows, width // 2) or g.dtype != y.dtype:
        raise ValueError(f"swiglu_backward: grad {tuple(g.shape)} {g.dtype} does not fit input {tuple(y.shape)} "
                         f"{y.dtype}")
    dy = torch.empty_like(y)
    _launch(True, g.contiguous(), y, bias, dy)
    return dy


def _launch(backward: bool, g, y, bias, out) -> None:
    import triton  # lazy: Triton ships with CUDA torch only

    rows, f = y.shape[0], y.shape[1] // 2
    _kernel()[(triton.cdiv(rows, _BR), triton.cdiv(f, _BC))](
        g, y, y if bias is None else bias, out, rows, F=f, HAS_BIAS=bias is not None, F64=y.dtype == torch.float64,
        BR=_BR, BC=_BC, BACKWARD=backward)


class BiasSwiGLU(torch.autograd.Function):
    """silu(gate + b_g)·(up + b_u) over y [rows, 2F]; saves y and the bias, as megatron's function does."""

    @staticmethod
    def forward(ctx, y, bias):
        ctx.save_for_backward(y, bias)
        return swiglu_forward(y, bias)

    @staticmethod
    def backward(ctx, grad):
        y, bias = ctx.saved_tensors
        dy = swiglu_backward(grad, y, bias)
        return dy, (dy.sum(0) if bias is not None and ctx.needs_input_grad[1] else None)


def bias_swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False):
    """megatron's `bias_swiglu_impl` signature: [s, b, 2F] or [n, 2F] → [s, b, F] or [n, F]."""
    if fp8_input_store or cpu_offload_input or not input.is_cuda:
        return fused_bias_swiglu.bias_swiglu_impl(input, bias, fp8_input_store, cpu_offload_input)
    shape = input.shape
    out = BiasSwiGLU.apply(input.reshape(-1, shape[-1]), bias)
    return out if len(shape) == 2 else out.view(shape[0], shape[1], -1)


def install() -> None:
    """Put the kernels into megatron's MLP (idempotent; CUDA with Triton only; MMPL_SWIGLU=compiled skips it)."""
    if KERNEL == "compiled":
        return
    if not torch.cuda.is_available():
        raise RuntimeError("the Triton SwiGLU kernels are for CUDA; on CPU keep bias_activation_fusion=False")
    mlp.bias_swiglu_impl = bias_swiglu_impl


def _check(y: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    if y.dim() != 2 or y.shape[1] % 2 or not y.is_contiguous() or (
            bias is not None and (bias.shape != (y.shape[1],) or bias.dtype != y.dtype or not bias.is_contiguous())):
        raise ValueError(f"swiglu kernels: input {tuple(y.shape)} (contiguous={y.is_contiguous()}) and bias "
                         f"{None if bias is None else (tuple(bias.shape), bias.dtype)} need [rows, 2F] and [2F]")
    return y.shape


def _kernel():
    """The Triton kernel, defined on first use (Triton is imported only where a GPU, or its interpreter, runs it)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton  # lazy: Triton ships with CUDA torch only
    import triton.language as tl  # lazy: as above

    # One program: a [BR, BC] tile of the F output columns; the gate and up halves of its rows are read side by side,
    # bias added, in fp32 (fp64 for fp64), rounded once on store. The forward writes silu(a)·b; the backward
    # (BACKWARD) reads the output's gradient g and writes d(y) = [g·σ(a)·(1 + a·(1 − σ(a)))·b, g·a·σ(a)].
    @triton.jit
    def swiglu_kernel(g, y, bias, out, rows, F: tl.constexpr, HAS_BIAS: tl.constexpr, F64: tl.constexpr,
                      BR: tl.constexpr, BC: tl.constexpr, BACKWARD: tl.constexpr):
        row = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
        col = tl.program_id(1) * BC + tl.arange(0, BC)
        keep = (row < rows)[:, None] & (col < F)[None, :]
        ftype = tl.float64 if F64 else tl.float32
        at = row[:, None] * (2 * F) + col[None, :]
        half = row[:, None] * F + col[None, :]
        a = tl.load(y + at, mask=keep, other=0.0).to(ftype)
        b = tl.load(y + at + F, mask=keep, other=0.0).to(ftype)
        if HAS_BIAS:
            a += tl.load(bias + col, mask=col < F, other=0.0).to(ftype)[None, :]
            b += tl.load(bias + F + col, mask=col < F, other=0.0).to(ftype)[None, :]
        sig = 1.0 / (1.0 + tl.exp(-a))
        if BACKWARD:
            grad = tl.load(g + half, mask=keep, other=0.0).to(ftype)
            tl.store(out + at, (grad * sig * (1.0 + a * (1.0 - sig)) * b).to(out.dtype.element_ty), mask=keep)
            tl.store(out + at + F, (grad * a * sig).to(out.dtype.element_ty), mask=keep)
        else:
            tl.store(out + half, (a * sig * b).to(out.dtype.element_ty), mask=keep)

    _KERNEL = swiglu_kernel
    return _KERNEL
