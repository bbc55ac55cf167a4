"""`mmpl data inspect`: the index as a table and the sample-length histogram (text; PNG with matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_mmpl.data.shards import load_index, load_shard_samples


def summary(index: dict) -> str:
    lines = [f"samples {index['samples']:,}  tokens {index['tokens']:,}  tokenizer {index.get('tokenizer_name')} "
             f"({index.get('tokenizer')})  edges {index['bucket_edges']}",
             f"{'bucket':>8} {'range':>17} {'samples':>9} {'tokens':>14} {'share':>6}  tasks (samples)"]
    for name, b in index["buckets"].items():
        tasks = ", ".join(f"{t} {c['samples']}" for t, c in sorted(b["tasks"].items()))
        lines.append(f"{name:>8} {b['lo']:>8}-{b['hi']:<8} {b['samples']:>9,} {b['tokens']:>14,} "
                     f"{b['tokens'] / max(1, index['tokens']):>6.1%}  {tasks}")
    lines.append("tasks: " + ", ".join(f"{t} {c['samples']} samples / {c['tokens'] / max(1, index['tokens']):.1%} "
                                       f"tokens" for t, c in sorted(index["tasks"].items())))
    if index.get("bytes"):
        per = index["bytes"] / max(1, index["tokens"])
        lines.append(f"stored: {index['bytes']:,} bytes, {per:.1f} bytes per token")
    b = index.get("build")
    if b:
        src = index.get("source", {})
        lines.append(f"build: mode {src.get('mode')}, pages {src.get('image_format')} (quality "
                     f"{src.get('image_quality')}), {b['documents']:,} documents, {b['workers']} worker(s), "
                     f"{b['pages_this_run']:,} pages in {b['seconds']:.1f} s = {b['pages_per_s']:.1f} pages/s"
                     + (f", {b['resumed_samples']:,} samples kept from the interrupted run" if b["resumed_samples"]
                        else ""))
        lines.append("dropped samples: " + (", ".join(f"{r} {n}" for r, n in b["dropped"].items()) or "none"))
        lines.append("skipped input: " + (", ".join(f"{r} {n}" for r, n in b["skipped_input"].items()) or "none"))
    return "\n".join(lines)


def lengths(root: str | Path, index: dict) -> np.ndarray:
    return np.array([s[3] for sh in index["shards"] for s in load_shard_samples(root, sh)], dtype=np.int64)


def text_histogram(ls: np.ndarray, bins: int = 20, width: int = 50) -> str:
    if len(ls) == 0:
        return "(no samples)"
    counts, edges = np.histogram(ls, bins=bins)
    top = max(1, counts.max())
    return "\n".join(f"{int(edges[i]):>8}-{int(edges[i + 1]):<8} {'#' * int(round(width * c / top)):<{width}} {c}"
                     for i, c in enumerate(counts))


def write_png(ls: np.ndarray, index: dict, path: str | Path) -> bool:
    """Histogram PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(ls, bins=min(60, max(10, len(ls) // 5)), color="#4477aa")
    for e in index["bucket_edges"]:
        if e <= ls.max() * 1.05:
            ax.axvline(e, color="#aa3377", lw=0.8, ls="--")
    ax.set_xlabel("sample length (tokens)")
    ax.set_ylabel("samples")
    ax.set_title(f"{len(ls):,} samples, {int(ls.sum()):,} tokens (dashed: bucket edges)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def inspect(root: str | Path, png: str | Path | None = None) -> str:
    index = load_index(root)
    ls = lengths(root, index)
    out = [summary(index), "", "length histogram:", text_histogram(ls)]
    if png is not None:
        out.append(f"histogram PNG: {png}" if write_png(ls, index, png) else
                   "histogram PNG skipped: matplotlib is not installed (pip install matplotlib)")
    return "\n".join(out)
