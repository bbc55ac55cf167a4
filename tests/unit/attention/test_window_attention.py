"""attention/window_attention.py (the ViT's windows in one Triton kernel, forward and backward) against attention
written out per window: fp64 to 1e-12; in bf16 and fp32 no further from the fp64 truth than torch's SDPA on the same
rounded inputs, or a flash kernel's roundings done exactly (in the interpreter: with its truncating bf16
rounding), are (twice the larger error, plus a floor of half a bf16 ulp of the largest value). And through
`sdpa.sdpa_blocks` with a GroupPlan of windows: the same output and gradients as its SDPA path. Runs on CUDA when
present, else in Triton's interpreter."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.triton_kernels import require_triton, triton_device

pytestmark = pytest.mark.unit

# Triton's reductions (tl.max, tl.sum) are jit functions made when Triton is imported: the interpreter runs them
# only if that import happened under TRITON_INTERPRET=1. Without CUDA, a process that imported Triton before
# (torch.compile does) runs this file again in a fresh process with it set.
HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
here_only = pytest.mark.skipif(not HERE, reason="run by test_in_a_fresh_interpreter_process")


@pytest.mark.skipif(HERE, reason="the tests run in this process")
def test_in_a_fresh_interpreter_process():
    require_triton()
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert run.stdout.splitlines()[-1].startswith("5 passed, 1 skipped"), run.stdout[-1000:]  # only this one skips

SIZES = [(3, 64), (2, 48), (1, 5)]  # full windows, edge windows, a sliver: rows 0..293 back to back


@pytest.fixture
def wa(monkeypatch):
    from megatron_mmpl.attention import window_attention

    with triton_device(monkeypatch, window_attention) as dev:
        yield window_attention, dev


def _inputs(b, h, d, dtype, dev, seed=0):
    s = sum(n * r for n, r in SIZES)
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (2 * torch.randn(s, b, h, d, generator=g, dtype=torch.float64) for _ in range(4))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided like megatron's views ([s, h, b, d] storage)
    return [t.to(dev, dtype) for t in (q, k, v, dout)]


def _reference(q, k, v, dout, scale):
    """Per window: softmax(q·kᵀ·scale)·v and its gradients by autograd, fp64 on the CPU."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    outs, at = [], 0
    for n, rows in SIZES:
        for _ in range(n):
            qs, ks, vs = (t[at:at + rows].permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, rows, d]
            p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, -1)
            outs.append((p @ vs).permute(2, 0, 1, 3))
            at += rows
    out = torch.cat(outs)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout.cpu().double()))


def _flash_rounded(q, k, v, dout, scale, truncate: bool):
    """Per window in fp64 with a flash kernel's roundings to the input dtype: the probabilities before P·V and
    its gradients, the output (which the backward reads), the score gradient. Rounded to nearest even, or for bf16
    by truncation, as Triton's interpreter rounds."""
    dtype = q.dtype

    def rnd(t):
        if truncate and dtype == torch.bfloat16:
            t = (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)
        return t.to(dtype).double()

    q, k, v, dout = (t.detach().cpu().double() for t in (q, k, v, dout))
    res, at = [], 0
    for n, rows in SIZES:
        for _ in range(n):
            qs, ks, vs, gs = (t[at:at + rows].permute(1, 2, 0, 3) for t in (q, k, v, dout))
            p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, -1)
            o = rnd(rnd(p) @ vs)
            ds = rnd(p * (gs @ vs.transpose(-1, -2) - (gs * o).sum(-1, keepdim=True)))
            res.append([t.permute(2, 0, 1, 3) for t in (o, ds @ ks * scale, ds.transpose(-1, -2) @ qs * scale,
                                                        rnd(p).transpose(-1, -2) @ gs)])
            at += rows
    return [torch.cat(ts) for ts in zip(*res)]


def _sdpa(q, k, v, dout, scale):
    """torch's SDPA per window on the same inputs (the error a library kernel makes in this dtype; on CUDA the
    cuDNN/flash kernel this one replaces)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    outs, at = [], 0
    for n, rows in SIZES:
        for _ in range(n):
            qs, ks, vs = (t[at:at + rows].permute(1, 2, 0, 3) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).permute(2, 0, 1, 3))
            at += rows
    out = torch.cat(outs)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


@here_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_windows_equal_attention_written_out(wa, dtype):
    window_attention, dev = wa
    if dtype == torch.float64 and dev == "cuda":
        pytest.skip("fp64 dot products are checked in the interpreter")
    for b, h, d in ((1, 3, 80), (2, 2, 32)):
        scale = 1 / math.sqrt(d)
        q, k, v, dout = _inputs(b, h, d, dtype, dev, seed=d)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = window_attention.window_attention(q, k, v, SIZES, scale)
        got = (out, *torch.autograd.grad(out, (q, k, v), dout))
        assert out.shape == q.shape and out.is_contiguous() and all(t.dtype == dtype for t in got)
        want = _reference(q, k, v, dout, scale)
        errs = [(a.double().cpu() - w).abs().max().item() for a, w in zip(got, want)]
        if dtype == torch.float64:
            assert max(e / w.abs().max().item() for e, w in zip(errs, want)) <= 1e-12, errs
            continue
        lib = [max((a.double().cpu() - w).abs().max().item() for a in pair) for w, *pair in
               zip(want, _sdpa(q, k, v, dout, scale), _flash_rounded(q, k, v, dout, scale, dev == "cpu"))]
        floor = [(2**-8 if dtype == torch.bfloat16 else 2**-20) * w.abs().max().item() for w in want]
        for name, e, e_lib, f in zip(("out", "dq", "dk", "dv"), errs, lib, floor):
            assert e <= 2 * e_lib + f, (b, h, d, name, e, e_lib)


@here_only
def test_sdpa_blocks_runs_windows_here_and_agrees(wa, monkeypatch):
    """A plan of window blocks through `sdpa_blocks` takes the kernel (counted) and gives SDPA's output and
    gradients (fp64 to 1e-12; fp32 to 1e-5 on CUDA, where fp64 keeps SDPA); MMPL_WINDOW_ATTENTION=sdpa, dropout,
    GQA or a window over 128 rows keep SDPA."""
    window_attention, dev = wa
    from megatron_mmpl.attention import sdpa
    from megatron_mmpl.attention.segments import Block, group_blocks

    blocks, at = [], 0
    for n, rows in SIZES:
        for _ in range(n):
            blocks.append(Block(at, rows, at, rows, False, len(blocks)))
            at += rows
    plan = group_blocks(blocks, dev)
    dtype, tol = (torch.float32, 1e-5) if dev == "cuda" else (torch.float64, 1e-12)  # CUDA: fp64 stays on SDPA
    q, k, v, dout = _inputs(1, 2, 16, dtype, dev)
    calls = []
    real = window_attention.window_attention
    monkeypatch.setattr(window_attention, "window_attention", lambda *a: calls.append(a[3]) or real(*a))
    results = {}
    for kernel in ("triton", "sdpa"):
        monkeypatch.setattr(window_attention, "KERNEL", kernel)
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = sdpa.sdpa_blocks(qq, kk, vv, plan, 0.25)
        results[kernel] = (out, *torch.autograd.grad(out, (qq, kk, vv), dout))
    assert calls == [[(n, rows) for n, rows in SIZES]]
    for a, b in zip(results["triton"], results["sdpa"]):
        assert ((a - b).abs().max() / b.abs().max()).item() <= tol
    monkeypatch.setattr(window_attention, "KERNEL", "triton")
    assert window_attention.fits(q, k, SIZES, 0.0)
    assert not window_attention.fits(q, k, SIZES, 0.1)
    assert not window_attention.fits(q, k[:, :, :1], SIZES, 0.0)
    assert not window_attention.fits(q, k, [(1, 129)], 0.0)
    if dev == "cuda":
        assert not window_attention.fits(q.double(), k.double(), SIZES, 0.0)


@here_only
def test_windows_that_do_not_tile_are_named(wa):
    window_attention, dev = wa
    q = torch.zeros(10, 1, 2, 16, device=dev)
    with pytest.raises(ValueError, match=r"windows \[\(2, 4\)\] do not tile q \(10, 1, 2, 16\)"):
        window_attention.window_attention(q, q, q, [(2, 4)], 0.25)
