"""QKV bias + split + RoPE of q and k at the ViT's and the LM's shapes (32K job, 3B), bf16, forward and backward:
megatron's path (broadcast bias add, views, the compiled RoPE of compat/cuda_rope.py on q and on k), the one
compiled kernel of attention/qkv_rope.py with the backward autograd derives for it, and the same forward with the
backward written out (RoPE's transpose on dq and dk, the three gradients laid back into the QKV buffer's layout,
the bias gradient's row sum) as one inductor-compiled function (MMPL_QKV_ROPE_BACKWARD=compiled), and as one Triton
kernel (attention/qkv_rope_backward.py, the trainer's default on CUDA) with ATen's row sum.

On 2026-12-04 (H200) the derived backward took 4.97 ms per ViT block against 0.77 ms for its forward
(benchmarks/bench_vit_tower.py --profile). This bench says whether a written-out backward, or the layout of the
gradients the attention hands back (contiguous, or the [b, h, s, d] transposes SDPA returns), is what costs.

    python benchmarks/bench_qkv_rope.py [--shapes vit lm] [--reps 20]
    python benchmarks/bench_qkv_rope.py --device cpu --seq-div 512 --reps 2    # a smoke run of the script
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_vit_tower import timed as cuda_timed  # this folder is on sys.path when a bench runs as a script

from megatron_mmpl.attention.qkv_rope import (
    QKVBiasRope,
    compiled_qkv_bias_rope,
    compiled_qkv_bias_rope_grad,
    sequence_dynamic,
)
from megatron_mmpl.attention.qkv_rope_backward import qkv_rope_grad_triton

SHAPES = {  # seq, head groups, q heads per group, head dim: the 3B's ViT over 128,960 patches; its LM at 32K
    "vit": (128960, 16, 1, 80),
    "lm": (32768, 2, 8, 128),
}


def megatron_path(mixed, bias, freqs, qpg: int, d: int):
    from megatron_mmpl.compat.cuda_rope import fused_apply_rotary_pos_emb

    s, b = mixed.shape[:2]
    x = (mixed + bias).view(s, b, -1, (qpg + 2) * d)
    q, k, v = torch.split(x, [qpg * d, d, d], dim=3)
    q = q.reshape(s, b, -1, d)
    return fused_apply_rotary_pos_emb(q, freqs), fused_apply_rotary_pos_emb(k, freqs), v


class CompiledBackward(QKVBiasRope):
    """QKVBiasRope with inductor's compiled backward (MMPL_QKV_ROPE_BACKWARD=compiled)."""

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (freqs,) = ctx.saved_tensors
        return (*compiled_qkv_bias_rope_grad(*ctx.layout)(*sequence_dynamic(dq, dk, dv, freqs)), None, None, None)


class TritonBackward(QKVBiasRope):
    """QKVBiasRope with the Triton kernel (the trainer's default on CUDA) and ATen's bias row sum."""

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (freqs,) = ctx.saved_tensors
        per_group, d, has_bias = ctx.layout
        dmixed = qkv_rope_grad_triton(dq, dk, dv, freqs, per_group, d)
        return dmixed, (dmixed.sum((0, 1)) if has_bias else None), None, None, None


def timed(fn, reps: int, dev: str) -> float:
    """ms per call: CUDA events (bench_vit_tower's timer) on the GPU, wall-clock for the CPU smoke run."""
    if dev == "cuda":
        return cuda_timed(fn, warmup=3, reps=reps) * 1e3
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--seq-div", type=int, default=1, help="divide the sequence lengths (a quick run)")
    args = p.parse_args()
    from megatron_mmpl.compat import cuda_rope

    if args.device == "cuda":
        cuda_rope.install()
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# {where}, torch {torch.__version__}, bf16; ms per call (mean of {args.reps})")
    print("| shape | path | grads | forward ms | forward + backward ms | max |Δ| / max |g| vs megatron's: QKV / bias |")
    print("|---|---|---|---:|---:|---:|")
    for name in args.shapes:
        run_shape(name, args.reps, args.device, args.seq_div)


def run_shape(name: str, reps: int, dev: str, seq_div: int) -> None:
    dt = torch.bfloat16
    s, ng, qpg, d = SHAPES[name]
    s //= seq_div
    width = ng * (qpg + 2) * d
    g = torch.Generator(device=dev).manual_seed(0)
    mixed = torch.randn(s, 1, width, device=dev, dtype=dt, generator=g, requires_grad=True)
    bias = torch.randn(width, device=dev, dtype=dt, generator=g, requires_grad=True)
    half = torch.rand(s, 1, 1, d // 2, device=dev, generator=g) * 100
    freqs = torch.cat([half, half], dim=-1)  # non-interleaved RoPE: both halves the same angles
    shapes = [(s, 1, ng * qpg, d), (s, 1, ng, d), (s, 1, ng, d)]
    grads = {
        "contiguous": [torch.randn(sh, device=dev, dtype=dt, generator=g) for sh in shapes],
        # SDPA's [b, h, s, d] gradients seen as [s, b, h, d]
        "sdpa [b, h, s, d]": [torch.randn(sh[1], sh[2], sh[0], sh[3], device=dev, dtype=dt, generator=g)
                              .permute(2, 0, 1, 3) for sh in shapes],
    }
    paths = {
        "megatron": lambda: megatron_path(mixed, bias, freqs, qpg, d),
        "fused, derived backward": lambda: compiled_qkv_bias_rope(qpg, d, True)(*sequence_dynamic(mixed, freqs), bias),
        "fused, written-out backward, inductor": lambda: CompiledBackward.apply(mixed, bias, freqs, qpg, d),
        "fused, written-out backward, Triton (default)": lambda: TritonBackward.apply(mixed, bias, freqs, qpg, d),
    }
    for layout, dys in grads.items():
        ref = None
        for pname, fn in paths.items():
            with torch.no_grad():
                fwd = timed(fn, reps, dev)

            def step(fn=fn, dys=dys):
                mixed.grad = bias.grad = None
                torch.autograd.backward(list(fn()), dys)

            both = timed(step, reps, dev)
            got = (mixed.grad.float(), bias.grad.float())
            if ref is None:
                ref, err = got, "—"
            else:
                err = " / ".join(f"{((a - r).abs().max() / r.abs().max()).item():.1e}" for a, r in zip(got, ref))
            print(f"| {name} | {pname} | {layout} | {fwd:.3f} | {both:.3f} | {err} |", flush=True)

if __name__ == "__main__":
    main()
