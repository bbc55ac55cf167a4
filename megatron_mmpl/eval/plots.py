"""PNG figures of evaluations: the needle heat-map (accuracy per length × depth cell) and accuracy vs length.
Each returns False when matplotlib is missing (the `dev` extra has it)."""

from __future__ import annotations

from megatron_mmpl.eval.docvqa import fmt_tokens


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _tok(n: int) -> str:

    return fmt_tokens(int(n))


def heatmap(grid: dict, path: str, title: str, trained_len: int | None = None) -> bool:
    """grid: {"lengths", "depths", "accuracy": [[acc | None]], "samples": [[n]]} → rows = lengths (longest on
    top), columns = depths; each cell shows its accuracy; empty cells are grey."""
    plt = pyplot()
    if plt is None:
        return False
    import numpy as np

    lengths, depths = grid["lengths"], grid["depths"]
    acc = np.array([[np.nan if a is None else a for a in row] for row in grid["accuracy"]], dtype=float)[::-1]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(depths), 1.2 + 0.45 * len(lengths)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    labels = [_tok(v) + (f" ({v / trained_len:g}×)" if trained_len else "") for v in lengths[::-1]]
    ax.set_yticks(range(len(lengths)), labels)
    ax.set_xlabel("needle depth (fraction of the document)")
    ax.set_ylabel("document length (tokens)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy", fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def accuracy_vs_length(series: dict[str, tuple[list[int], list[float]]], path: str, title: str,
                       trained_len: int | None = None, chance: float | None = None) -> bool:
    """One line per evaluation: accuracy at each length (log2 x axis); dashed lines at the training length and
    at chance."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xticks(ticks, [_tok(t) for t in ticks])
    if trained_len:
        ax.axvline(trained_len, color="0.5", ls="--", lw=1, label=f"training length {_tok(trained_len)}")
    if chance:
        ax.axhline(chance, color="0.5", ls=":", lw=1, label=f"chance {chance:.2f}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
