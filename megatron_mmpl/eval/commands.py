"""`mmpl eval needle` (retrieval on a length × depth grid), `mmpl eval docvqa` (long-document VQA) — both greedy
generation from an exported HF checkpoint — and `mmpl eval report` (a run's training and evals in one page)."""

from __future__ import annotations

import json
import os


def _generation_args(p, max_new_tokens: int, batch_size: int) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory (`mmpl convert mcore-to-hf` output)")
    p.add_argument("--rope-scaling", default=None, metavar="none|yarn:F|linear:F",
                   help="RoPE length extension written into the loaded config, as model.rope_scaling does for "
                        "training (e.g. yarn:4 to read 4x the trained length)")
    p.add_argument("--trained-len", type=int, default=None,
                   help="the checkpoint's training window in tokens (yarn's original length; the report's 1x)")
    p.add_argument("--max-len", default=None, help="longest prompt in tokens, e.g. 131072 or 128k (documents "
                                                   "over it are shrunk page by page, or skipped and counted)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--batch-size", type=int, default=batch_size, help="prompts per generate call (similar "
                                                                      "lengths only)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (cuda: bf16 + sdpa; cpu: fp32)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many documents")
    p.add_argument("--json", default=None, help="write the result here (predictions beside it, .predictions.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--debug", action="store_true")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate an exported Hugging Face checkpoint")
    sub = p.add_subparsers(dest="eval_command", required=True)
    n = sub.add_parser("needle", help="needle accuracy on a length x depth grid (built, or read from shards), "
                                      "with a heat-map")
    src = n.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="needle shard directory (`mmpl data synth --kind needle`)")
    src.add_argument("--lengths", help="build documents at these lengths, e.g. 32k,64k,128k,256k,512k")
    n.add_argument("--depths", default="0,0.1,...,1.0", help="needle depths (fractions), e.g. 0,0.1,...,1.0")
    n.add_argument("--kind", default="visual", help="visual (a coloured page) | text (a code on a rendered page)")
    n.add_argument("--per-cell", type=int, default=4, help="documents per (length, depth) cell")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--page-px", type=int, default=56, help="visual needle page size (multiple of 28)")
    n.add_argument("--n-colours", type=int, default=4, help="visual needle colours (chance = 1/n)")
    n.add_argument("--heatmap", default=None, help="heat-map PNG (default <json stem>_heatmap.png)")
    _generation_args(n, max_new_tokens=8, batch_size=8)
    n.set_defaults(func=_needle)
    d = sub.add_parser("docvqa", help="long-document VQA by greedy generation, rule-based scores (no judge model)")
    d.add_argument("--data", required=True, help="a shard directory, MMLongBench-Doc's samples.json, or an "
                                                 "MMLongBench documentQA .jsonl")
    d.add_argument("--documents", default=None, help="MMLongBench-Doc PDF folder (default: documents/ beside "
                                                     "samples.json)")
    d.add_argument("--image-root", default=None, help="folder MMLongBench page_list paths are relative to "
                                                      "(default: the .jsonl's folder)")
    d.add_argument("--max-page-tokens", type=int, default=None,
                   help="cap each page at this many LM tokens (default: the checkpoint's image processor)")
    d.add_argument("--batch-tokens", type=int, default=None, help="cap batch size x longest prompt")
    _generation_args(d, max_new_tokens=64, batch_size=1)
    d.set_defaults(func=_docvqa)
    r = sub.add_parser("report", help="training loss and every eval of one or more runs: report.md + PNGs")
    r.add_argument("--run", required=True, action="append",
                   help="run directory (losses.tsv, eval.json, evals/*.json); repeat to compare runs")
    r.add_argument("--out", default=None, help="where report.md and the PNGs go (default: the first run)")
    r.add_argument("--png", default=None, help="also write the loss curve here (one run)")
    r.add_argument("--debug", action="store_true")
    r.set_defaults(func=_report)


def _common(args) -> dict:
    from megatron_mmpl.eval.generate import rope_scaling_arg
    from megatron_mmpl.eval.needle import parse_lengths  # lazy: CLI start-up

    max_len = None
    if args.max_len is not None:
        (max_len,) = parse_lengths(args.max_len)
    return dict(max_len=max_len, rope_scaling=rope_scaling_arg(args.rope_scaling, args.trained_len),
                trained_len=args.trained_len, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                device=args.device, limit=args.limit, progress=not args.no_progress,
                predictions=_beside(args.json, ".predictions.jsonl"))


def _beside(path: str | None, suffix: str) -> str | None:
    return None if path is None else os.path.splitext(path)[0] + suffix


def _write(result: dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def _needle(args) -> int:
    from megatron_mmpl.eval.needle import (  # lazy: CLI start-up
        evaluate_needle,
        parse_depths,
        parse_lengths,
    )
    from megatron_mmpl.eval.plots import heatmap  # lazy: CLI start-up

    common = _common(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    result = evaluate_needle(args.model, shards=args.shards, depths=parse_depths(args.depths),
                             lengths=parse_lengths(args.lengths) if args.lengths else None, kind=args.kind,
                             per_cell=args.per_cell, seed=args.seed, page_px=args.page_px, n_colours=args.n_colours,
                             **common)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"needle: {result['samples']} documents | accuracy {fmt(result['accuracy'])} (greedy generation, exact "
          f"match) | first token {fmt(result['first_token_accuracy'])} | among the choices "
          f"{fmt(result['choice_accuracy'])} | chance {fmt(result['chance'])}"
          + (f" | {result['skipped_over_max_len']} over --max-len, skipped" if result["skipped_over_max_len"] else ""))
    print("  by document length: " + ", ".join(f"{k} tokens {v['accuracy']:.2f} (n={v['samples']})"
                                             for k, v in result["by_length"].items()))
    _write(result, args.json)
    png = args.heatmap or _beside(args.json, "_heatmap.png")
    if png:
        title = f"needle accuracy: {os.path.basename(os.path.abspath(args.model))}"
        print(f"  heat-map: {png}" if heatmap(result["grid"], png, title, args.trained_len)
              else "  heat-map: skipped (pip install matplotlib)")
    return 0


def _docvqa(args) -> int:
    from megatron_mmpl.eval.docvqa import evaluate_docvqa  # lazy: CLI start-up

    common = _common(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    result = evaluate_docvqa(args.model, args.data, documents=args.documents, image_root=args.image_root,
                             batch_tokens=args.batch_tokens, max_page_tokens=args.max_page_tokens, **common)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    o = result["overall"]
    print(f"docvqa: {o['n']} questions | accuracy {fmt(o['accuracy'])} | F1 {fmt(o['f1'])} | exact match "
          f"{fmt(o['exact_match'])} | {result['skipped_over_max_len']} over --max-len, skipped (rule-based "
          "scores, no judge model)")
    for key in ("by_length", "by_family", "by_format"):
        print(f"  {key.replace('_', ' ')}: " + ", ".join(f"{k} {fmt(v['accuracy'])} (n={v['n']})"
                                                        for k, v in result[key].items()))
    _write(result, args.json)
    return 0


def _report(args) -> int:
    from megatron_mmpl.eval.report import (  # lazy: CLI start-up
        report,
        write_report,
    )

    if len(args.run) == 1 and args.out is None:
        print(report(args.run[0], args.png))
    else:
        print(f"report: {write_report(args.run, args.out)}")
    return 0
