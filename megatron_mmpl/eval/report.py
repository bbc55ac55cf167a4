"""`mmpl eval report`: a run's (or several runs') training loss and evaluations gathered into one markdown table
and PNGs — loss curve, needle heat-maps, accuracy vs length with the evaluated lengths side by side.

Evaluations are the JSON results in `<run>/eval.json` and `<run>/evals/*.json` (`mmpl eval needle|docvqa --json`).
"""

from __future__ import annotations

import glob
import json
import os

from megatron_mmpl.eval.docvqa import bin_upper, fmt_tokens
from megatron_mmpl.eval.plots import accuracy_vs_length, heatmap, pyplot


def read_losses(run_dir: str) -> list[tuple[int, float]]:
    """(step, loss) of every step, the latest value when a step was logged twice (resumed runs)."""
    path = os.path.join(run_dir, "losses.tsv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir!r} the run_dir of a `mmpl train` run?")
    by_step = {}
    with open(path) as f:
        for line in f:
            step, loss = line.split()
            by_step[int(step)] = float(loss)
    return sorted(by_step.items())


def smoothed(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(runs: dict[str, list[tuple[int, float]]], path: str, title: str) -> bool:
    """Loss curve PNG of one or more runs (per step, and the mean of 10 steps); False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, losses) in enumerate(runs.items()):
        steps, values = zip(*losses)
        ax.plot(steps, values, color=f"C{i}", alpha=0.25, lw=0.8)
        ax.plot(steps, smoothed(list(values), 10), color=f"C{i}", lw=1.8, label=f"{label} (mean of 10 steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per answer token")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def collect_evals(run_dir: str) -> list[tuple[str, dict]]:
    """(name, result) of every evaluation JSON of a run, `eval` first."""
    paths = [os.path.join(run_dir, "eval.json")] + sorted(glob.glob(os.path.join(run_dir, "evals", "*.json")))
    out = []
    for p in paths:
        if os.path.isfile(p):
            with open(p) as f:
                out.append((os.path.splitext(os.path.basename(p))[0], json.load(f)))
    return out


def _pct(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _rope(result: dict) -> str:
    r = (result.get("settings") or {}).get("rope_scaling")
    return "as trained" if not r else f"{r.get('rope_type')} ×{r.get('factor'):g}"


def _needle_lines(needles, trained) -> list[str]:
    lengths = sorted({int(k) for _, r in needles for k in r.get("by_length", {})})
    head = [fmt_tokens(n) + (f" ({n / trained:g}×)" if trained else "") for n in lengths]
    lines = ["## Needle retrieval", "", "Accuracy by document length (greedy generation, exact match of the answer; "
             "lengths are the documents' target lengths).", "",
             "| evaluation | RoPE | " + " | ".join(head) + " | all | chance |",
             "|---|---|" + "---|" * len(head) + "---|---|"]
    for label, r in needles:
        cells = [_pct(r["by_length"].get(str(n), {}).get("accuracy")) for n in lengths]
        lines.append(f"| {label} | {_rope(r)} | " + " | ".join(cells) + f" | {_pct(r['accuracy'])} | "
                     f"{_pct(r.get('chance'))} |")
    return lines + [""]


def _docvqa_lines(docs) -> list[str]:
    lines = ["## Long-document VQA", "", f"Scoring: {docs[0][1]['scoring']}.", "",
             "| evaluation | RoPE | questions | accuracy | F1 | exact match | skipped (over --max-len) |",
             "|---|---|---|---|---|---|---|"]
    for label, r in docs:
        o = r["overall"]
        lines.append(f"| {label} | {_rope(r)} | {o['n']} | {_pct(o['accuracy'])} | {_pct(o['f1'])} | "
                     f"{_pct(o['exact_match'])} | {r.get('skipped_over_max_len', 0)} |")
    for title, key, order in (("actual prompt length", "by_length", bin_upper), ("task family", "by_family", str),
                              ("answer format", "by_format", str)):
        keys = sorted({k for _, r in docs for k in r[key]}, key=order)
        lines += ["", f"Accuracy by {title} (questions in brackets):", "",
                  "| evaluation | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for label, r in docs:
            cells = [f"{_pct(r[key][k]['accuracy'])} ({r[key][k]['n']})" if k in r[key] else "–" for k in keys]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(run_dirs: list[str], out_dir: str | None = None) -> str:
    """Write report.md (+ loss_curve.png, <eval>_heatmap.png, accuracy_vs_length.png) into out_dir; its path."""
    out_dir = out_dir or run_dirs[0]
    os.makedirs(out_dir, exist_ok=True)
    names = [os.path.basename(os.path.abspath(r)) for r in run_dirs]
    many = len(run_dirs) > 1
    lines = [f"# Evaluation report: {', '.join(names)}", "", "## Training", "",
             "| run | steps | loss at the first step | loss, mean of the last 10 steps |", "|---|---|---|---|"]
    losses, evals = {}, []
    for name, run in zip(names, run_dirs):
        if os.path.isfile(os.path.join(run, "losses.tsv")):
            ls = losses[name] = read_losses(run)
            last = ls[-10:]
            lines.append(f"| {name} | {ls[-1][0]} | {ls[0][1]:.4f} | {sum(v for _, v in last) / len(last):.4f} |")
        evals += [(f"{name}/{e}" if many else e, r) for e, r in collect_evals(run)]
    if losses and plot(losses, os.path.join(out_dir, "loss_curve.png"), "training loss"):
        lines += ["", "![loss curve](loss_curve.png)"]
    lines.append("")
    needles = [(lb, r) for lb, r in evals if r.get("kind", "needle") == "needle" and "by_length" in r]
    docs = [(lb, r) for lb, r in evals if r.get("kind") == "docvqa"]
    trained = next((r["settings"]["trained_len"] for _, r in evals if (r.get("settings") or {}).get("trained_len")),
                   None)
    if needles:
        lines += _needle_lines(needles, trained)
        for label, r in needles:
            if "grid" in r:
                png = label.replace("/", "_") + "_heatmap.png"
                if heatmap(r["grid"], os.path.join(out_dir, png), f"{label} ({_rope(r)})", trained):
                    lines += [f"![{label} heat-map]({png})", ""]
    if docs:
        lines += _docvqa_lines(docs)
    series = {f"{lb} ({_rope(r)})": ([int(k) for k in r["by_length"]],
                                     [v["accuracy"] for v in r["by_length"].values()]) for lb, r in needles}
    series.update({f"{lb} ({_rope(r)})": ([bin_upper(k) for k in r["by_length"]],
                                          [v["accuracy"] for v in r["by_length"].values()]) for lb, r in docs})
    chances = {r.get("chance") for _, r in needles} if needles and not docs else set()
    chance = chances.pop() if len(chances) == 1 else None  # one chance line only when all evals share it
    if series and accuracy_vs_length(series, os.path.join(out_dir, "accuracy_vs_length.png"),
                                     "accuracy vs document length", trained, chance):
        lines += ["![accuracy vs length](accuracy_vs_length.png)", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def report(run_dir: str, png: str | None = None) -> str:
    """Summary text of one run; writes report.md and its PNGs into the run directory (the loss curve also to
    `png` when given)."""
    losses = read_losses(run_dir)
    first, last = losses[0][1], sum(v for _, v in losses[-10:]) / len(losses[-10:])
    lines = [f"run {run_dir}: {losses[-1][0]} steps | loss {first:.3f} at step {losses[0][0]} -> {last:.3f} "
             f"(mean of the last {min(10, len(losses))} steps)"]
    for name, result in collect_evals(run_dir):
        chance = result.get("chance")
        if result.get("kind", "needle") == "needle":
            lines.append(f"{'held-out retrieval' if name == 'eval' else name}: accuracy {result['accuracy']:.3f} on "
                         f"{result['samples']} documents"
                         + (f" vs chance {chance:.3f} ({result['accuracy'] / chance:.1f}x)" if chance else ""))
            for k, v in (result.get("by_length") or {}).items():
                lines.append(f"  {k:>6} tokens: {v['accuracy']:.3f} (n={v['samples']})")
        else:
            o = result["overall"]
            lines.append(f"{name}: document VQA accuracy {_pct(o['accuracy'])}, F1 {_pct(o['f1'])} on {o['n']} "
                         "questions")
    md = write_report([run_dir])
    if png is not None:
        plot({os.path.basename(os.path.abspath(run_dir)): losses}, png, os.path.basename(os.path.abspath(run_dir)))
    png = png or os.path.join(run_dir, "loss_curve.png")
    lines.append(f"loss curve: {png}" if os.path.isfile(png) else "loss curve: skipped (pip install matplotlib)")
    lines.append(f"report: {md}")
    return "\n".join(lines)
