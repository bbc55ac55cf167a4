"""The gated SiLU of both towers at the 32K job's shapes (3B), bf16: megatron's compiled `bias_swiglu_impl`
against compat/swiglu.py's Triton kernels (the trainer's default on CUDA), forward and forward + backward, with the
bytes each pass must move at least and the rate that makes. Each pair is timed A B B A in this one process (a
second process on the device machines can run 6-15 % slower, docs/PERFORMANCE.md 2026-12-07).

    python benchmarks/bench_swiglu.py [--reps 20]
"""

from __future__ import annotations

import argparse

import torch
from bench_vit_tower import timed  # this folder is on sys.path when a bench runs as a script
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl as megatrons

from megatron_mmpl.compat.swiglu import bias_swiglu_impl as ours

SHAPES = {  # rows, F (the gated half), bias: the 3B's ViT MLP over 128,960 patches (F padded to 3456); its LM at 32K
    "vit": (128960, 3456, True),
    "lm": (32768, 11008, False),
}


def time_one(impl, y, bias, inputs, dout, reps: int) -> tuple[float, float]:
    """Seconds per forward (no grad) and per forward + backward of one implementation."""
    with torch.no_grad():
        fwd = timed(lambda: impl(y, bias), warmup=2, reps=reps)
    return fwd, timed(lambda: torch.autograd.grad(impl(y, bias), inputs, dout), warmup=2, reps=reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16; ms per call (mean of {args.reps}, "
          f"A B B A)")
    print("| shape | kernel | forward ms | GB/s | forward + backward ms | GB/s | max |Δ| fwd / bwd vs megatron's |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, (rows, f, with_bias) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        y = torch.randn(rows, 1, 2 * f, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        bias = (torch.randn(2 * f, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                if with_bias else None)
        dout = torch.randn(rows, 1, f, device="cuda", dtype=torch.bfloat16, generator=g)
        inputs = [y] + ([bias] if with_bias else [])
        results = {}
        for impl in (megatrons, ours):
            out = impl(y, bias)
            results[impl] = (out.detach(), torch.autograd.grad(out, inputs, dout))
        err_f = (results[ours][0].float() - results[megatrons][0].float()).abs().max().item()
        err_b = max((a.float() - b.float()).abs().max().item() for a, b in zip(results[ours][1], results[megatrons][1]))
        times = {megatrons: [], ours: []}
        for impl in (megatrons, ours, ours, megatrons):
            times[impl].append(time_one(impl, y, bias, inputs, dout, args.reps))
        fwd_bytes = rows * 3 * f * 2  # read [rows, 2F], write [rows, F]
        bwd_bytes = rows * 5 * f * 2  # read [rows, 2F] and the grad [rows, F], write [rows, 2F]
        for impl, label in ((megatrons, "megatron's compiled"), (ours, "Triton (compat/swiglu.py)")):
            fwd, both = (sum(x) / 2 for x in zip(*times[impl]))
            print(f"| {name} {rows}×{2 * f}{' + bias' if with_bias else ''} | {label} | {fwd * 1e3:.3f} | "
                  f"{fwd_bytes / fwd / 1e9:.0f} | {both * 1e3:.3f} | {(fwd_bytes + bwd_bytes) / both / 1e9:.0f} | "
                  f"{err_f:.2e} / {err_b:.2e} |", flush=True)


if __name__ == "__main__":
    main()
