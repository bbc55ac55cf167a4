"""ViT window attention at the real job's shape: which kernel runs 64-patch windows in head dim 80 fastest.

Qwen2.5-VL's ViT attends within windows of 8×8 patches; at 32K LM tokens one image set is ~131K patches, i.e.
~2,048 windows × 16 heads per layer. The trainer runs equal windows as one batched SDPA call; this benchmark times
that call (forward + backward, bf16) under each SDPA backend and against a plain batched-matmul softmax, so the
choice of kernel is measured rather than guessed.

    python benchmarks/bench_vit_window_attention.py [--windows 2048 --heads 16 --window 64 --head-dim 80]
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bmm_attention(q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def timed(fn, q, k, v, reps: int = 20) -> float:
    grad = torch.randn_like(q)
    for _ in range(3):
        fn(q, k, v).backward(grad)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(q, k, v).backward(grad)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=80)
    a = ap.parse_args()
    shape = (a.windows, a.heads, a.window, a.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    ref = bmm_attention(q.float(), k.float(), v.float())
    flops = 4 * a.windows * a.heads * a.window * a.window * a.head_dim * 3.5  # fwd 2 GEMMs of 2·S²·D, bwd 2.5× fwd
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, q/k/v {shape} bf16, fwd+bwd")
    print("| kernel | ms | TFLOP/s | max abs err vs fp32 |")
    print("|---|---:|---:|---:|")
    cases = [(f"sdpa {b.name.lower()}", b) for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                                      SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)]
    for name, backend in cases:
        def fn(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            ms = timed(fn, q, k, v)
            err = (fn(q, k, v).float() - ref).abs().max().item()
            print(f"| {name} | {ms:.2f} | {flops / ms / 1e9:.1f} | {err:.2e} |")
        except RuntimeError as e:
            print(f"| {name} | not available: {str(e).splitlines()[0][:80]} | | |")
    for name, fn in (("bmm + fp32 softmax", bmm_attention),
                     ("bmm compiled", torch.compile(bmm_attention, dynamic=False))):
        ms = timed(fn, q, k, v)
        err = (fn(q, k, v).float() - ref).abs().max().item()
        print(f"| {name} | {ms:.2f} | {flops / ms / 1e9:.1f} | {err:.2e} |")


if __name__ == "__main__":
    main()
