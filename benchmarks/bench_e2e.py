"""The real job on one GPU: the whole Qwen2.5-VL (ViT + LM) through the trainer's own path vs transformers.

Ours: `mmpl train`'s `train()` — loader with workers over rendered-page shards, ViT, LM, chunked loss on answer
tokens, megatron DDP + distributed optimizer with fp32 master weights. Peer, on the same samples of the same
shard: transformers' Qwen2_5_VLForConditionalGeneration (sdpa, gradient checkpointing, fused AdamW, bf16).
Each (implementation, length) runs in a fresh process. Prints tokens/s, LM and ViT TFLOP/s, combined MFU (model
FLOPs counted once by training/flops.py, recompute not counted, the same count for both), HFU (the same plus the
forward work each side's recompute reruns: ours per the trainer's settings, the peer's gradient checkpointing
every layer and block), peak memory beside the planner's figure, data wait, ours/peer.

    python benchmarks/bench_e2e.py --seqs 8192 32768                         # 3B, both sides
    python benchmarks/bench_e2e.py --seqs 131072 --layers 12 --no-peer       # 3B widths, 12 LM layers, full ViT
    python benchmarks/bench_e2e.py --seqs 32768 --no-peer --profile          # + torch.profiler of 2 steps
    python benchmarks/bench_e2e.py --seqs 32768 --set model.recompute=full   # any trainer override
    python benchmarks/bench_e2e.py --seqs 32768 --flops-only 140.4           # CPU: FLOPs per row, HFU/MFU
Shards are made once per length under --data (synthetic rendered text pages, Qwen tokenizer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

RESULT = "BENCH_E2E_RESULT "


def shards_for(root: str, seq: int) -> str:
    """Rendered-page samples just under `seq` tokens (extraction and reasoning QA), built once."""
    path = os.path.join(root, f"text-{seq}")
    if os.path.isfile(os.path.join(path, "index.json")):
        return path
    from megatron_mmpl.data.images import ImageProcessor
    from megatron_mmpl.data.synth import write_synth
    from megatron_mmpl.data.tokenizer import load_tokenizer

    write_synth(path, targets=[seq], per_target=2, tokenizer=load_tokenizer("qwen2"), tokenizer_name="qwen2",
                improc=ImageProcessor(), seed=0, kind="text", tasks=["extract_single", "extract_multi", "reason"])
    return path


def train_config(args, seq: int, run_dir: str):
    from megatron_mmpl.config import load_config

    over = [
        f"run_dir={run_dir}", f"model.hf_config={args.model}", "model.dtype=bf16",
        f"data.shards={shards_for(args.data, seq)}", "data.recipe=pool_native", "data.min_len=1",
        f"data.max_len={seq}", f"data.max_seq_len={seq}", "data.global_batch_size=1",
        "schedule.train_steps=100000", "optim.warmup=1", "checkpoint.interval=1000000",
        "logging.interval=1", "logging.progress_bar=false", "logging.phase_times=true",
    ]
    if args.layers:
        over.append(f"model.hf_overrides={{text_config.num_hidden_layers: {args.layers}}}")
    return load_config(None, [o for o in over if _known(o)] + list(args.set))


def _known(override: str) -> bool:
    """Whether this package's config has the field (so an older checkout, --code DIR, runs the same bench)."""
    import dataclasses
    import typing

    from megatron_mmpl.config import Config

    cls = Config
    for part in override.split("=")[0].split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
        if not dataclasses.is_dataclass(cls):
            return True
    return True


def run_ours(args, seq: int) -> dict:
    import torch

    from megatron_mmpl.training.train import train

    try:
        from megatron_mmpl.training.memory import plan_this_run
    except ImportError:  # an older checkout (--code): no planner in the trainer
        def plan_this_run(*_):
            return None

    run_dir = tempfile.mkdtemp(prefix=f"e2e-{seq}-")
    cfg = train_config(args, seq, run_dir)
    steps = args.warmup + args.steps
    if args.profile:  # after the timed steps, so the profiler's overhead stays out of the figures
        cfg.logging.profile_steps = [steps + 1, steps + 2]
    train(cfg, max_steps=steps + (2 if args.profile else 0))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    timed = [r for r in rows if args.warmup < r["step"] <= steps]
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in timed[0] if isinstance(timed[0][k], (int, float))}
    planned = plan_this_run(train_config(args, seq, run_dir), _spec(cfg), 1)
    out = dict(impl="megatron_mmpl", seq=seq, tokens_per_s=mean["tokens_per_s"],
               lm_tflops=mean["tflops_per_gpu"], vit_tflops=mean["vit_tflops_per_gpu"],
               mfu=(mean.get("mfu") or 0) + (mean.get("vit_mfu") or 0), hfu=mean.get("hfu"),
               peak_gib=max(r["max_mem_gib"] for r in rows),
               planned_gib=planned.peak.total / 2**30 if planned else None,
               recompute=planned.recompute if planned else cfg.model.recompute,
               vit_recompute=getattr(planned, "vit_recompute", cfg.model.vit_recompute),
               data_wait=mean["data_wait"],
               phases={k[:-2]: mean[k] for k in mean if k.endswith("_s") and k != "tokens_per_s"},
               device=torch.cuda.get_device_name())
    prof = os.path.join(run_dir, "profile", "kernels.txt")
    if args.profile and os.path.isfile(prof):
        out["profile"] = open(prof).read()
    return out


def _spec(cfg):
    from megatron_mmpl.config.hf_config import resolve_hf_config

    try:
        from megatron_mmpl.models.qwen25vl.spec import ModelSpec
    except ImportError:  # an older checkout (--code): it has no planner in the trainer either
        return None
    return ModelSpec.from_hf(resolve_hf_config(cfg.model))


def peer_flop_model(spec):
    """The peer's FLOPs: transformers' gradient checkpointing reruns every decoder layer and every ViT block (both
    are GradientCheckpointingLayers)."""
    from megatron_mmpl.training.flops import FlopModel, Training

    return FlopModel(spec, Training(lm_layers_rebuilt=spec.layers, vit_blocks_rebuilt=spec.vision.depth))


def run_peer(args, seq: int) -> dict:
    """transformers on the same shard's samples, read through our loader (same batches, HF-style labels)."""
    import time

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.config.hf_config import resolve_hf_config
    from megatron_mmpl.data.loader import build_train_loader
    from megatron_mmpl.data.tokenizer import load_tokenizer
    from megatron_mmpl.models.qwen25vl.spec import ModelSpec
    from megatron_mmpl.training.flops import peak_tflops

    cfg = train_config(args, seq, tempfile.mkdtemp())
    cfg.data.num_workers = 0
    hf = resolve_hf_config(cfg.model)
    for c in (hf, hf.text_config, hf.vision_config):
        c._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(hf).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    loader = iter(build_train_loader(cfg.data, load_tokenizer("qwen2"), dp_rank=0, dp_size=1, hf_config=hf))
    fm = peer_flop_model(ModelSpec.from_hf(hf))
    lm_flops = vit_flops = rebuilt = tokens = 0.0
    torch.cuda.reset_peak_memory_stats()
    t_start = None
    warmup, steps = args.peer_warmup, args.peer_steps
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        b = next(loader)
        labels = torch.full_like(b["labels"], -100)
        labels[:, 1:] = b["labels"][:, :-1]  # HF shifts inside the loss: its label t is the token at t
        segs = b["cu_seqlens"].diff().tolist()
        if step >= warmup:
            tokens += sum(segs)
            lm_flops += fm.lm_flops(segs, head_tokens=int((b["labels"] >= 0).sum()))
            vit_flops += fm.vit_flops(b["image_grid_thw"].tolist())
            rebuilt += fm.rebuilt_flops(segs, b["image_grid_thw"].tolist())
        out = model(input_ids=b["input_ids"].cuda(), pixel_values=b["pixel_values"].cuda().to(torch.bfloat16),
                    image_grid_thw=b["image_grid_thw"].cuda(), labels=labels.cuda())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    sec = time.perf_counter() - t_start
    peak = peak_tflops(None)
    tf = (lm_flops + vit_flops) / sec / 1e12
    return dict(impl="transformers", seq=seq, tokens_per_s=tokens / sec, lm_tflops=lm_flops / sec / 1e12,
                vit_tflops=vit_flops / sec / 1e12, mfu=tf / peak if peak else None,
                hfu=(lm_flops + vit_flops + rebuilt) / sec / 1e12 / peak if peak else None,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, device=torch.cuda.get_device_name())


def flops_only(args) -> None:
    """The model and rebuilt FLOPs of the rows each side would train on (training/flops.py), printed per length."""
    from megatron_mmpl.config.hf_config import resolve_hf_config
    from megatron_mmpl.data.loader import build_train_loader
    from megatron_mmpl.data.tokenizer import load_tokenizer
    from megatron_mmpl.models.qwen25vl.spec import ModelSpec
    from megatron_mmpl.plan.memory import Hardware, plan_config, recompute_label, vit_recompute_label
    from megatron_mmpl.training.flops import FlopModel, Training

    for seq in args.seqs:
        shards_for(args.data, seq)
        cfg = train_config(args, seq, tempfile.mkdtemp())
        cfg.data.num_workers = 0
        hf = resolve_hf_config(cfg.model)
        spec = ModelSpec.from_hf(hf)
        plan = plan_config(cfg, Hardware(1, 1, args.flops_only), shape=spec)
        for k, v in plan.model_settings.items():
            setattr(cfg.model, k, v)
        ours = FlopModel(spec, Training.of(cfg.model, spec))
        peer = peer_flop_model(spec)
        rows = iter(build_train_loader(cfg.data, load_tokenizer("qwen2"), dp_rank=0, dp_size=1, hf_config=hf))
        model = rebuilt = peer_rebuilt = 0.0
        for _ in range(args.steps):
            b = next(rows)
            segs, grids = b["cu_seqlens"].diff().tolist(), b["image_grid_thw"].tolist()
            model += ours.lm_flops(segs, head_tokens=int((b["labels"] >= 0).sum())) + ours.vit_flops(grids)
            rebuilt += ours.rebuilt_flops(segs, grids)
            peer_rebuilt += peer.rebuilt_flops(segs, grids)
        fits = "fits" if plan.fits else "does NOT fit"
        print(f"{seq}: recompute LM {recompute_label(cfg)} / ViT {vit_recompute_label(cfg, spec)} (auto for "
              f"{args.flops_only:g} GiB, {fits}); per row {model / args.steps / 1e12:.1f} model TFLOP + "
              f"{rebuilt / args.steps / 1e12:.1f} rebuilt: HFU = {1 + rebuilt / model:.3f} x MFU; the peer's "
              f"gradient checkpointing {1 + peer_rebuilt / model:.3f} x")


def child(args) -> None:
    fn = run_ours if args.child == "ours" else run_peer
    try:
        out = fn(args, args.seqs[0])
    except Exception as e:  # OOM and the like: one line for the table
        import torch

        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)
        out = dict(impl=args.child, seq=args.seqs[0], error="OOM" if oom else f"{type(e).__name__}: {e}"[:300])
    print(RESULT + json.dumps(out), flush=True)


def spawn(args, impl: str, seq: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--seqs", str(seq), "--model", args.model,
           "--data", args.data, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--peer-warmup", str(args.peer_warmup), "--peer-steps", str(args.peer_steps)]
    cmd += (["--layers", str(args.layers)] if args.layers else []) + (["--profile"] if args.profile else [])
    cmd += [x for s in args.set for x in ("--set", s)]
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    if args.code:  # another checkout of megatron_mmpl (e.g. the commit before a change) runs "ours"
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(args.code), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    sys.stdout.write("".join(f"  | {ln}\n" for ln in proc.stdout.splitlines()[-12:] if not ln.startswith(RESULT)))
    if not lines:
        return dict(impl=impl, seq=seq, error=f"exit {proc.returncode}")
    return json.loads(lines[-1][len(RESULT):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen25vl-3b")
    p.add_argument("--layers", type=int, default=None, help="LM layers (default: the model's; the ViT stays whole)")
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--data", default="runs/bench_e2e/data")
    # 3: the first step on a new sample recompiles torch.compile'd functions once for its patch count (1-2 s)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--peer-warmup", type=int, default=1, help="the peer's warmup steps (it is 4-5x slower)")
    p.add_argument("--peer-steps", type=int, default=2)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler over 2 steps after the timed ones")
    p.add_argument("--set", action="append", default=[], help="trainer override for ours, e.g. model.recompute=full")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--code", default=None, help="directory holding another megatron_mmpl package to run as ours")
    p.add_argument("--flops-only", type=float, default=None, metavar="GPU_GIB",
                   help="no training, no GPU: the FLOPs per row of the shard's first --steps rows under the recompute "
                        "that auto picks for a GPU of this many GiB (140.4: an H200, 79.2: an H100) and the HFU/MFU "
                        "ratio of both sides")
    p.add_argument("--child", choices=("ours", "peer"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.flops_only:
        return flops_only(args)
    import torch

    for seq in args.seqs:
        shards_for(args.data, seq)  # build data before any timing
    results = []
    print(f"# bench_e2e {datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__}; "
          f"{args.model}{f' with {args.layers} LM layers' if args.layers else ''}, full ViT; overrides {args.set}; "
          f"ours {args.warmup} warmup + {args.steps} timed steps, peer {args.peer_warmup} + {args.peer_steps}; "
          "one packed row per step")
    for seq in args.seqs:
        for impl in ("ours",) + (() if args.no_peer else ("peer",)):
            results.append(spawn(args, impl, seq))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "profile"}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    for r in results:
        if r.get("profile"):
            print(f"\n## profile, seq {r['seq']}\n{r['profile'][:6000]}")


def table(results: list[dict]) -> str:
    lines = ["| seq | impl | tokens/s | LM TFLOP/s | ViT TFLOP/s | MFU (LM+ViT) | HFU | peak GiB | planned GiB "
             "| data wait | recompute LM / ViT | vs peer |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['impl']} | {r['error']} | | | | | | | | | |")
            continue
        peer = next((x for x in results if x["seq"] == r["seq"] and x.get("impl") == "transformers"
                     and "error" not in x), None)
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}" if peer else "—"
        lm, vit = r["lm_tflops"], r["vit_tflops"]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "—"
        hfu = f"{r['hfu']:.1%}" if r.get("hfu") is not None else "—"
        planned = f"{r['planned_gib']:.1f}" if r.get("planned_gib") else "—"
        wait = f"{r['data_wait']:.1%}" if "data_wait" in r else "—"
        recompute = f"{r['recompute']} / {r['vit_recompute']}" if "vit_recompute" in r else "—"
        lines.append(f"| {r['seq']} | {r['impl']} | {r['tokens_per_s']:,.0f} | {lm:.0f} | {vit:.0f} | {mfu} | {hfu} "
                     f"| {r['peak_gib']:.1f} | {planned} | {wait} | {recompute} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
