"""Core-attention throughput per backend: fwd+bwd TF/s on packed rows (bf16, GQA), megatron's local attention as peer.

    python benchmarks/bench_attention.py                         # H100: 32K and 128K, heads 28/4, head dim 128
    python benchmarks/bench_attention.py --seqlens 8192 --layouts single docs4k
    python benchmarks/bench_attention.py --device cpu --tiny      # smoke test of the script itself (no timing value)

Layouts of one packed row: `single` (one sample fills the row), `docs4k` / `docs1k` (samples of 4096 / 1024
tokens: many short segments, flex's case). FLOPs count only unmasked work: fwd = 4·heads·d·Σ visible (q,k)
pairs, bwd = 2.5·fwd (FlashAttention's convention); TF/s = (fwd+bwd FLOPs) / time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch

LAYOUTS = {"single": None, "docs4k": 4096, "docs1k": 1024}


def _cu(seqlen: int, layout: str) -> list[int]:
    seg = LAYOUTS[layout] or seqlen
    return list(range(0, seqlen, seg)) + [seqlen]


def _flops(cu: list[int], heads: int, d: int, causal: bool = True) -> float:
    pairs = sum((b - a) * (b - a + 1) / 2 if causal else (b - a) ** 2 for a, b in zip(cu[:-1], cu[1:]))
    return 4 * heads * d * pairs * 3.5


def _config(heads, kv_heads, d, dtype):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=kv_heads,
                             kv_channels=d, attention_dropout=0.0, hidden_dropout=0.0, bf16=dtype == torch.bfloat16,
                             params_dtype=dtype, masked_softmax_fusion=True, use_cpu_initialization=True)


def _module(backend, cfg):
    from megatron.core.transformer.enums import AttnMaskType

    if backend == "megatron_local":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    from megatron_mmpl.attention import sdpa
    from megatron_mmpl.attention.core_attention import CoreAttention

    sdpa.EXPAND_KV_ON_GPU = backend != "sdpa-gqa"  # sdpa-gqa: SDPA's enable_gqa instead of repeated K/V heads
    return CoreAttention(cfg, 1, AttnMaskType.causal, "self", backend=backend.replace("-gqa", ""))


def _time(fn, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def bench_one(backend, seqlen, layout, heads, kv_heads, d, dtype, device, warmup, iters):
    from megatron_mmpl.parallel.context_parallel import packed_seq_params

    cu = _cu(seqlen, layout)
    cfg = _config(heads, kv_heads, d, dtype)
    mod = _module(backend, cfg).to(device).train()
    q = torch.randn(seqlen, 1, heads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(seqlen, 1, kv_heads, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(seqlen, 1, kv_heads, d, device=device, dtype=dtype, requires_grad=True)
    if backend == "megatron_local":  # no packed rows: a [1,1,s,s] block-diagonal causal mask (True = masked)
        seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), torch.tensor(cu, device=device).diff())
        pos = torch.arange(seqlen, device=device)
        mask = ~((seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :]))[None, None]
        kwargs = {}
    else:
        mask, kwargs = None, {"packed_seq_params": packed_seq_params(cu)}
    grad = torch.randn(seqlen, 1, heads * d, device=device, dtype=dtype)

    def step():
        out = mod(q, k, v, mask, **kwargs)
        out.backward(grad)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        # what is already allocated (inputs, and megatron's persistent global buffer after megatron_local) is
        # not this backend's working memory
        held = torch.cuda.memory_allocated()
    sec = _time(step, warmup, iters, device)
    mem = (torch.cuda.max_memory_allocated() - held) / 2**30 if device.type == "cuda" else float("nan")
    return sec, _flops(cu, heads, d) / sec / 1e12, mem


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--layouts", nargs="+", default=["single", "docs4k"], choices=list(LAYOUTS))
    p.add_argument("--backends", nargs="+", default=["sdpa", "sdpa-gqa", "flex", "megatron_local"],
                   help="CoreAttention backends (sdpa, sdpa-gqa, flex, te) and megatron_local (the stock peer)")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 256 tokens, 4/2 heads, dim 16, fp32, sdpa")
    args = p.parse_args(argv)
    if args.tiny:
        args.seqlens, args.heads, args.kv_heads, args.head_dim, args.dtype = [256], 4, 2, 16, "fp32"
        args.warmup, args.iters, args.layouts = 1, 2, ["single", "docs1k"]
        args.backends = [b for b in args.backends if b != "flex"]  # torch has no CPU backward for flex
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)

    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    initialize_parallel()  # megatron_local needs the global memory buffer and a TP group
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# bench_attention {datetime.date.today()} on {name}, torch {torch.__version__}, {args.dtype}, "
          f"heads {args.heads}/{args.kv_heads}, head dim {args.head_dim}, causal, fwd+bwd")
    print(f"{'layout':>8} {'seqlen':>8} {'backend':>15} {'ms':>10} {'TF/s':>8} {'work GiB':>9} {'vs sdpa':>8}")
    for seqlen in args.seqlens:
        for layout in args.layouts:
            base = None
            for backend in args.backends:
                try:
                    sec, tfs, mem = bench_one(backend, seqlen, layout, args.heads, args.kv_heads, args.head_dim,
                                              dtype, device, args.warmup, args.iters)
                except torch.OutOfMemoryError:
                    print(f"{layout:>8} {seqlen:>8} {backend:>15} {'OOM':>10}")
                    torch.cuda.empty_cache()
                    continue
                base = tfs if backend == "sdpa" else base
                ratio = f"{tfs / base:.2f}" if base else "-"
                print(f"{layout:>8} {seqlen:>8} {backend:>15} {sec * 1e3:>10.2f} {tfs:>8.1f} {mem:>9.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
