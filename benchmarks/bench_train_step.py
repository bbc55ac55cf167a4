"""Training-step throughput on one GPU: our Megatron-Core Qwen2.5-VL LM vs transformers (SDPA), same shapes.

A 7B-shape proxy (all 7B widths, fewer layers) trains on one packed row of S tokens: forward, loss, backward
and an AdamW step, bf16 weights, in the same process for both models. Prints tokens/s, TFLOP/s (causal count,
training/flops.py) and peak memory per sequence length; the peer's number is the ratio's denominator.

    python benchmarks/bench_train_step.py                       # H100: 4 layers, S = 4K..32K
    python benchmarks/bench_train_step.py --layers 2 --seqlens 8192 --segments 4   # 4 packed samples per row
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import time

import torch


def _cfg(layers: int):
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset

    cfg = hf_config_from_preset("qwen25vl-7b")
    cfg.text_config.num_hidden_layers = layers
    cfg.vision_config.depth = 1
    cfg.vision_config.fullatt_block_indexes = [0]
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    return cfg


def _batch(cfg, seqlen: int, segments: int, device, answer_tokens: int):
    """One packed row; with answer_tokens > 0 only the last `answer_tokens` of each sample are supervised (-100
    elsewhere), as in long-document VQA."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (1, seqlen), generator=g).to(device)
    labels = torch.randint(0, 150000, (1, seqlen), generator=g)
    seg = seqlen // segments
    pos = torch.cat([torch.arange(seg)] * segments + [torch.arange(seqlen - seg * segments)]).to(device)
    cu = [i * seg for i in range(segments)] + [seqlen]
    if answer_tokens:
        keep = torch.zeros(seqlen, dtype=torch.bool)
        for end in cu[1:]:
            keep[max(0, end - answer_tokens):end] = True
        labels[0, ~keep] = -100
    return ids, labels.to(device), pos.expand(3, 1, seqlen).contiguous(), cu


def _time(step, warmup: int, iters: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters, torch.cuda.max_memory_allocated() / 2**30


def ours(cfg, seqlen, segments, warmup, iters, answer_tokens):
    from megatron_mmpl.models.qwen25vl.build import build_model
    from megatron_mmpl.parallel.context_parallel import packed_seq_params
    from megatron_mmpl.parallel.process_groups import Layout

    model = build_model(cfg, Layout(), dtype=torch.bfloat16).cuda().train()
    model.dummy_vision_on_text_only = False  # LM-only comparison
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids, labels, pos, cu = _batch(cfg, seqlen, segments, "cuda", answer_tokens)
    psp = packed_seq_params(cu)
    mask = (labels >= 0).float()

    def step():
        loss = (model(ids, pos, labels=labels, packed_seq_params=psp).float() * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, warmup, iters)


def peer(cfg, seqlen, segments, warmup, iters, answer_tokens):
    """transformers with SDPA; packed samples via position_ids restarts are not isolated by SDPA there, so the
    peer runs one sample per row (segments=1) — it is the cheaper case for the peer, never the harder one."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids, labels, pos, _ = _batch(cfg, seqlen, 1, "cuda", answer_tokens)

    def step():
        out = model(input_ids=ids, position_ids=pos, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, warmup, iters)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--segments", type=int, default=1, help="packed samples per row for ours")
    p.add_argument("--answer-tokens", type=int, default=32,
                   help="supervised tokens at the end of each sample (0: every token supervised)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    from megatron_mmpl.parallel.process_groups import initialize_parallel
    from megatron_mmpl.training.flops import FlopModel

    initialize_parallel()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = _cfg(args.layers)
    fm = FlopModel.from_hf(cfg)
    print(f"# bench_train_step {datetime.date.today()} on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"7B widths, {args.layers} LM layers, bf16, fwd+bwd+AdamW, segments/row {args.segments}, "
          f"supervised tokens/sample {args.answer_tokens or 'all'}")
    print(f"{'seqlen':>7} {'impl':>13} {'ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'peak GiB':>9} {'vs peer':>8}")
    for s in args.seqlens:
        rows = {}
        for name, fn, segs in (("transformers", peer, 1), ("megatron_mmpl", ours, args.segments)):
            seg = s // segs
            # ours runs the output layer at supervised positions only; transformers at every position
            head = args.answer_tokens * segs if (name == "megatron_mmpl" and args.answer_tokens) else None
            flops = fm.lm_flops([seg] * (segs - 1) + [s - seg * (segs - 1)], head_tokens=head)
            try:
                sec, mem = fn(cfg, s, segs, args.warmup, args.iters, args.answer_tokens)
            except torch.OutOfMemoryError:
                print(f"{s:>7} {name:>13} {'OOM':>9}")
                continue
            finally:  # the model and optimizer of `fn` are garbage now: give their memory back
                gc.collect()
                torch.cuda.empty_cache()
            rows[name] = s / sec
            ratio = rows[name] / rows["transformers"] if "transformers" in rows else float("nan")
            print(f"{s:>7} {name:>13} {sec * 1e3:>9.1f} {s / sec:>9.0f} {flops / sec / 1e12:>8.1f} {mem:>9.1f} "
                  f"{ratio:>8.2f}")


if __name__ == "__main__":
    main()
