"""A run's summary: initial/final loss (from losses.tsv), eval accuracy vs chance (eval.json), loss-curve PNG."""

from __future__ import annotations

import json
import os


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


def plot(losses: list[tuple[int, float]], path: str, title: str) -> bool:
    """Loss curve PNG; False when matplotlib is not installed (the `dev` extra has it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps, values = zip(*losses)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, color="0.75", lw=0.8, label="per step")
    ax.plot(steps, smoothed(list(values), 10), color="C0", lw=1.8, label="mean of 10 steps")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per answer token")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(run_dir: str, png: str | None = None) -> str:
    """Summary text; writes the loss-curve PNG."""
    losses = read_losses(run_dir)
    first, last = losses[0][1], sum(v for _, v in losses[-10:]) / len(losses[-10:])
    lines = [f"run {run_dir}: {losses[-1][0]} steps | loss {first:.3f} at step {losses[0][0]} -> {last:.3f} "
             f"(mean of the last {min(10, len(losses))} steps)"]
    result = None
    eval_path = os.path.join(run_dir, "eval.json")
    if os.path.isfile(eval_path):
        with open(eval_path) as f:
            result = json.load(f)
        chance = result.get("chance")
        lines.append(f"held-out retrieval: accuracy {result['accuracy']:.3f} on {result['samples']} documents"
                     + (f" vs chance {chance:.3f} ({result['accuracy'] / chance:.1f}x)" if chance else ""))
        for k, v in (result.get("by_length") or {}).items():
            lines.append(f"  {k:>6} tokens: {v['accuracy']:.3f} (n={v['samples']})")
    png = png or os.path.join(run_dir, "loss_curve.png")
    if plot(losses, png, os.path.basename(os.path.abspath(run_dir))):
        lines.append(f"loss curve: {png}")
    else:
        lines.append("loss curve: skipped (pip install matplotlib)")
    return "\n".join(lines)
