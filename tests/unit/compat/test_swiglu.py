"""compat/swiglu.py's Triton kernels (megatron's fused-SwiGLU slot on CUDA) compute megatron's function and its
gradient: against autograd of silu(gate + b_g)·(up + b_u) written out, fp64 to 1e-12, bf16 within one bf16 ulp of
the fp64 result on the same bf16 inputs. Run on CUDA when present, else in Triton's interpreter."""

import pytest
import torch
import torch.nn.functional as F

from tests.triton_kernels import triton_device

pytestmark = pytest.mark.unit


@pytest.fixture
def kernels(monkeypatch):
    from megatron_mmpl.compat import swiglu

    with triton_device(monkeypatch, swiglu) as dev:
        yield swiglu, dev


def _reference(y, bias, grad):
    """The forward and both gradients by autograd of the written-out function, in fp64."""
    y = y.detach().double().requires_grad_()
    bias = None if bias is None else bias.detach().double().requires_grad_()
    gate, up = (y + (0 if bias is None else bias)).chunk(2, -1)
    out = F.silu(gate) * up
    dy, *db = torch.autograd.grad(out, [y] + ([bias] if bias is not None else []), grad.double())
    return out.detach(), dy, (db[0] if db else None)


def _within(got, want, dtype):
    err = (got.double().cpu() - want).abs()
    if dtype == torch.float64:
        return (err.max() / want.abs().max()).item() <= 1e-12
    # one bf16 ulp (2⁻⁷ relative: the interpreter rounds bf16 by truncation), plus a floor near zero
    return bool((err <= 2**-7 * want.abs() + 2**-7 * 1e-3 * want.abs().max()).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernels_compute_swiglu_and_its_gradient(kernels, dtype, with_bias):
    """Rows not a multiple of the tile and F not a multiple of its width (edges masked), inputs wide enough that
    silu's both tails are hit."""
    swiglu, dev = kernels
    for rows, f in ((37, 24), (5, 200)):
        g = torch.Generator().manual_seed(rows)
        y = (4 * torch.randn(rows, 2 * f, generator=g, dtype=torch.float64)).to(dev, dtype)
        bias = (torch.randn(2 * f, generator=g, dtype=torch.float64).to(dev, dtype) if with_bias else None)
        grad = torch.randn(rows, f, generator=g, dtype=torch.float64).to(dev, dtype)
        out_ref, dy_ref, db_ref = _reference(y.cpu(), None if bias is None else bias.cpu(), grad.cpu())
        out = swiglu.swiglu_forward(y, bias)
        dy = swiglu.swiglu_backward(grad, y, bias)
        assert out.dtype == dy.dtype == dtype and out.shape == (rows, f) and dy.shape == y.shape
        assert _within(out, out_ref, dtype), (rows, f, "forward")
        assert _within(dy, dy_ref, dtype), (rows, f, "backward")


def test_megatron_slot_signature_with_and_without_bias(kernels):
    """`bias_swiglu_impl` as megatron's MLP calls it: [s, b, 2F] in, [s, b, F] out; the bias gradient is the row
    sum of d(y) (what autograd's broadcast reduction gives megatron's function), fp64 to 1e-12."""
    swiglu, dev = kernels
    if dev == "cpu":  # the slot runs the kernels on CUDA tensors only; on CPU it is megatron's own function
        pytest.skip("the slot dispatches CPU tensors to megatron's implementation")
    g = torch.Generator().manual_seed(0)
    y = torch.randn(7, 3, 64, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    bias = torch.randn(64, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    grad = torch.randn(7, 3, 32, generator=g, dtype=torch.float64)
    out = swiglu.bias_swiglu_impl(y, bias)
    assert out.shape == (7, 3, 32)
    dy, db = torch.autograd.grad(out, [y, bias], grad.to(dev))
    out_ref, dy_ref, db_ref = _reference(y.cpu(), bias.cpu(), grad)
    for got, want in ((out, out_ref), (dy, dy_ref), (db, db_ref)):
        assert _within(got, want, torch.float64)


def test_slot_on_cpu_tensors_is_megatrons_and_install_refuses_cpu(kernels, monkeypatch):
    """CPU tensors (and FP8 storage, activation offloading) fall through to megatron's implementation; install()
    on a machine without CUDA says why, and MMPL_SWIGLU=compiled leaves megatron's kernels in place."""
    swiglu, dev = kernels
    from megatron.core.transformer import mlp

    calls = []
    monkeypatch.setattr(swiglu.fused_bias_swiglu, "bias_swiglu_impl", lambda *a: calls.append(a) or "megatron's")
    assert swiglu.bias_swiglu_impl(torch.zeros(2, 8), None) == "megatron's" and len(calls) == 1
    if dev == "cpu":
        with pytest.raises(RuntimeError, match="for CUDA; on CPU keep bias_activation_fusion=False"):
            swiglu.install()
    before = mlp.bias_swiglu_impl
    monkeypatch.setattr(swiglu, "KERNEL", "compiled")
    swiglu.install()
    assert mlp.bias_swiglu_impl is before


def test_bad_input_is_named(kernels):
    swiglu, dev = kernels
    with pytest.raises(ValueError, match=r"input \(4, 7\).*need \[rows, 2F\] and \[2F\]"):
        swiglu.swiglu_forward(torch.zeros(4, 7, device=dev), None)
