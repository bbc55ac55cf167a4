"""Needle retrieval on a length × depth grid, by greedy generation from the exported model.

Documents are built per cell (visual needle: one coloured page among grey ones; text needle: an access code
planted on one rendered page) or read from a shard directory (cells from each sample's target length and
evidence depth). A document counts as correct when the generated answer equals the reference (exact match
after cleaning); first-token accuracy and, for the visual needle, accuracy among the colour choices come along.
"""

from __future__ import annotations

import json
import re

from megatron_mmpl.data.shards import load_index
from megatron_mmpl.eval import metrics

KINDS = ("visual", "text")
DEFAULT_DEPTHS = [round(0.1 * i, 1) for i in range(11)]


def parse_lengths(spec: str) -> list[int]:
    """"32k,64k,128k" → [32768, 65536, 131072] (k = 1024, as MMLongBench counts)."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", part)
        if not m:
            raise ValueError(f"--lengths {spec!r}: {part!r} is not a token count like 4096 or 32k")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return out


def parse_depths(spec: str) -> list[float]:
    """"0,0.25,1" or with an ellipsis "0,0.1,...,1.0" (the step of the first two, up to the last) → fractions."""
    parts = [p.strip() for p in spec.split(",")]
    try:
        if "..." in parts:
            i = parts.index("...")
            if i < 2 or i != len(parts) - 2:
                raise ValueError
            a, b, end = float(parts[i - 2]), float(parts[i - 1]), float(parts[-1])
            step = b - a
            n = round((end - a) / step)
            if step <= 0 or abs(a + n * step - end) > 1e-9:
                raise ValueError
            head = [float(p) for p in parts[: i - 2]]
            depths = head + [round(a + k * step, 6) for k in range(n + 1)]
        else:
            depths = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--depths {spec!r}: give fractions like 0,0.5,1 or 0,0.1,...,1.0") from None
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad:
        raise ValueError(f"--depths {spec!r}: {bad} outside [0, 1]")
    return depths


def grid_items(kind: str, lengths: list[int], depths: list[float], per_cell: int, tokenizer, improc,
               seed: int = 0, page_px: int = 56, n_colours: int = 4):
    """per_cell documents for every (length, depth), built with the checkpoint's tokenizer and processor."""
    from megatron_mmpl.data.needle import needle_sample
    from megatron_mmpl.data.synth import synth_document
    from megatron_mmpl.eval.sources import sample_item

    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: choose {' | '.join(KINDS)}")
    items = []
    for length in lengths:
        for depth in depths:
            for i in range(per_cell):
                key = f"grid-{kind}-{length}-{depth}-{i}"
                if kind == "visual":
                    s = needle_sample(key, length, tokenizer, improc, seed, n_colours=n_colours, page_px=page_px,
                                      depth=depth)
                else:
                    s = synth_document(key, "extract_single", length, tokenizer, improc, seed, depths=[depth])
                it = sample_item(s)
                it.meta.update(grid_length=length, grid_depth=depth)
                items.append(it)
    return items


def shard_cells(items, depths: list[float]) -> None:
    """Cells for documents read from shards: the target length, the evidence depth snapped to the nearest grid
    depth."""
    for it in items:
        d = (it.meta.get("depths") or [None])[0]
        if d is None or "target_tokens" not in it.meta:
            raise ValueError(f"sample {it.key} carries no target_tokens/depths metadata; build needle shards with "
                             "`mmpl data synth --kind needle` or use --lengths/--depths")
        it.meta.update(grid_length=int(it.meta["target_tokens"]), grid_depth=min(depths, key=lambda g: abs(g - d)))


def score_needle(g, tokenizer) -> dict:
    """One document's record: exact match of the generated answer, its first token, the choice among colours."""
    it = g.prompt.item
    pred = metrics.extract_answer(g.text)
    target = tokenizer.encode(it.answer, add_special_tokens=False)[0]
    first = int(g.first_logits.argmax())
    rec = {"key": it.key, "length": it.meta["grid_length"], "depth": it.meta["grid_depth"],
           "tokens": len(g.prompt.input_ids), "answer": it.answer, "generated": g.text,
           "correct": metrics.exact_match(it.answer, pred, metrics.infer_format(it.answer)),
           "first_token_correct": float(first == target)}
    choices = it.meta.get("choices")
    if choices:  # the first token restricted to the candidate answers' first tokens
        firsts = [tokenizer.encode(c, add_special_tokens=False)[0] for c in choices]
        rec["choice_correct"] = float(firsts[int(g.first_logits[firsts].argmax())] == target)
        rec["chance"] = 1 / len(choices)
    return rec


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarize_grid(records: list[dict], lengths: list[int], depths: list[float]) -> dict:
    """Overall, per length (with the mean actual tokens) and the [length][depth] accuracy/count matrices."""
    cell = {(r["length"], r["depth"]): [] for r in records}
    for r in records:
        cell[(r["length"], r["depth"])].append(r["correct"])
    by_len = {}
    for length in lengths:
        rs = [r for r in records if r["length"] == length]
        if rs:
            by_len[str(length)] = {"accuracy": _mean([r["correct"] for r in rs]), "samples": len(rs),
                                   "mean_tokens": _mean([r["tokens"] for r in rs])}
    chances = [r["chance"] for r in records if "chance" in r]
    choice = [r["choice_correct"] for r in records if "choice_correct" in r]
    return {"samples": len(records), "accuracy": _mean([r["correct"] for r in records]),
            "first_token_accuracy": _mean([r["first_token_correct"] for r in records]),
            "choice_accuracy": _mean(choice), "chance": _mean(chances), "by_length": by_len,
            "grid": {"lengths": lengths, "depths": depths,
                     "accuracy": [[_mean(cell.get((L, d), [])) for d in depths] for L in lengths],
                     "samples": [[len(cell.get((L, d), [])) for d in depths] for L in lengths]}}


def evaluate_needle(model_dir: str, *, shards: str | None = None, lengths: list[int] | None = None,
                    depths: list[float] | None = None, kind: str = "visual", per_cell: int = 4, seed: int = 0,
                    page_px: int = 56, n_colours: int = 4, max_len: int | None = None,
                    rope_scaling: dict | None = None, trained_len: int | None = None, max_new_tokens: int = 8,
                    batch_size: int = 8, device: str = "auto", limit: int | None = None, progress: bool = True,
                    predictions: str | None = None) -> dict:
    """Needle accuracy of the HF model in `model_dir` on shards or a generated length × depth grid."""

    from megatron_mmpl.eval.generate import generate_all, load_model, load_processing, pick_device
    from megatron_mmpl.eval.sources import iter_samples, sample_item

    if (shards is None) == (lengths is None):
        raise ValueError("give either --shards (read needle documents) or --lengths (build them), not both")
    depths = depths or DEFAULT_DEPTHS
    if lengths is not None and max_len is not None and max(lengths) > max_len:
        raise ValueError(f"--lengths up to {max(lengths)} exceed --max-len {max_len}; raise --max-len or drop "
                         "the longer lengths")
    index = None
    if shards is not None:

        index = load_index(shards)
    tokenizer, improc = load_processing(model_dir, index)
    if shards is not None:
        items = [sample_item(s) for s in iter_samples(shards, limit)]
        if not items:
            raise ValueError(f"no samples in {shards}")
        shard_cells(items, depths)
        lengths = sorted({it.meta["grid_length"] for it in items})
    else:
        items = grid_items(kind, lengths, depths, per_cell, tokenizer, improc, seed, page_px, n_colours)[:limit]
    dev = pick_device(device)
    model = load_model(model_dir, dev, rope_scaling)
    skipped: list = []
    records = [score_needle(g, tokenizer) for g in generate_all(
        model, items, tokenizer, improc, max_new_tokens=max_new_tokens, max_len=max_len, batch_size=batch_size,
        progress=progress, skipped=skipped)]
    if not records:
        raise ValueError(f"no needle document fits in --max-len {max_len} tokens; raise --max-len")
    records.sort(key=lambda r: (r["length"], r["depth"], r["key"]))
    if predictions:
        with open(predictions, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return {"kind": "needle", "source": shards or f"grid:{kind}",
            "settings": {"model": model_dir, "device": str(dev), "rope_scaling": rope_scaling,
                         "trained_len": trained_len, "max_len": max_len, "max_new_tokens": max_new_tokens,
                         "per_cell": per_cell if shards is None else None, "seed": seed},
            "scoring": "greedy generation; correct = exact match of the cleaned first answer line",
            "skipped_over_max_len": len(skipped), **summarize_grid(records, lengths, depths)}
