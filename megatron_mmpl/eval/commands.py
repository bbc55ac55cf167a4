"""`mmpl eval needle` (retrieval accuracy of an HF checkpoint vs chance) and `mmpl eval report` (run summary)."""

from __future__ import annotations

import json
import os

from megatron_mmpl.eval.report import report


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate an exported Hugging Face checkpoint")
    sub = p.add_subparsers(dest="eval_command", required=True)
    n = sub.add_parser("needle", help="retrieval accuracy on held-out needle documents (`mmpl data synth --kind "
                                      "needle`), against chance")
    n.add_argument("--model", required=True, help="HF checkpoint directory (`mmpl convert mcore-to-hf` output)")
    n.add_argument("--shards", required=True, help="held-out shard directory")
    n.add_argument("--limit", type=int, default=None, help="evaluate at most this many documents")
    n.add_argument("--json", default=None, help="also write the result as JSON here")
    n.add_argument("--debug", action="store_true")
    n.set_defaults(func=_needle)
    r = sub.add_parser("report", help="summary of a run (loss, eval) and its loss-curve PNG")
    r.add_argument("--run", required=True, help="run directory (holds losses.tsv; eval.json if evaluated)")
    r.add_argument("--png", default=None, help="loss-curve PNG path (default <run>/loss_curve.png)")
    r.add_argument("--debug", action="store_true")
    r.set_defaults(func=_report)


def _needle(args) -> int:

    from megatron_mmpl.eval.needle import evaluate_needle

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"--model {args.model!r} has no config.json; export with `mmpl convert mcore-to-hf`")
    result = evaluate_needle(args.model, args.shards, args.limit)
    chance = f"{result['chance']:.3f}" if result["chance"] is not None else "n/a"
    choice = f"{result['choice_accuracy']:.3f}" if result["choice_accuracy"] is not None else "n/a"
    print(f"needle: {result['samples']} documents | accuracy {result['accuracy']:.3f} (greedy, full vocabulary) | "
          f"among the choices {choice} | chance {chance}")
    print("  by document length: " + ", ".join(f"{k} tokens {v['accuracy']:.2f} (n={v['samples']})"
                                             for k, v in result["by_length"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _report(args) -> int:

    print(report(args.run, args.png))
    return 0
