"""The ViT MLP's GEMMs at Qwen2.5-VL's width 3420 (not a multiple of 8) vs zero-padded 3456, one GPU, bf16.

fc1 [n, 1280] → [n, 2F] (gate; up), SwiGLU, fc2 [n, F] → [n, 1280], forward + backward, n patches. Zero-padding
gate/up rows and fc2 columns is exact (silu(0)·0 = 0 and zero gradients), so this says whether padding pays.

    python benchmarks/bench_vit_mlp_width.py [--patches 131072]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def bench(n: int, width: int, hidden: int = 1280) -> tuple[float, float]:
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    w1 = torch.randn(2 * width, hidden, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    w2 = torch.randn(hidden, width, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    dy = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        y = x @ w1.t()
        a, b = y.chunk(2, dim=-1)
        out = (F.silu(a) * b) @ w2.t()
        out.backward(dy)

    ms = do_bench(step, warmup=25, rep=200, return_mode="median")
    flops = 6 * n * hidden * 3 * width  # three GEMMs forward, twice that backward
    return ms, flops / ms / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=int, default=131072)
    args = p.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}, {args.patches} patches, bf16, fwd+bwd")
    base = None
    for width in (3420, 3456):
        ms, tf = bench(args.patches, width)
        base = base or ms
        print(f"width {width}: {ms:.2f} ms, {tf:.0f} TFLOP/s (counting {width}), {base / ms:.2f}x")


if __name__ == "__main__":
    main()
