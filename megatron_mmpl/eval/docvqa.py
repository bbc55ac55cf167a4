"""`mmpl eval docvqa`: long-document VQA by greedy generation, scored by rules (metrics.py; no judge model),
reported overall, by answer format, by task family and by the prompt's actual token length."""

from __future__ import annotations

import json
from dataclasses import replace

from megatron_mmpl.data.shards import load_index
from megatron_mmpl.eval import metrics

SCORING = ("rule-based, no judge model: answer = first line after any 'Answer:'; Int/Float by number (Float within "
           "1 % or as a percentage), Str by ANLS (threshold 0.5; equality for URLs, dates, file names, phones, "
           "emails, page refs), List sorted item by item (worst item), 'Not answerable' by phrase; F1 as "
           "MMLongBench-Doc (recall over answerable questions, precision over answered ones)")


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def length_bin(n: int) -> str:
    """The power-of-two interval holding n tokens, e.g. 40,000 → "(32K, 64K]"."""
    hi = 1 << max(0, (n - 1).bit_length())
    return f"({fmt_tokens(hi // 2)}, {fmt_tokens(hi)}]"


def bin_upper(label: str) -> int:
    hi = label.split(", ")[1].rstrip("]")
    return int(hi[:-1]) * 1024 if hi.endswith("K") else int(hi)


def group(records: list[dict], key) -> dict:
    by: dict[str, list] = {}
    for r in records:
        by.setdefault(key(r), []).append(r)
    return {k: metrics.summarize(v) for k, v in by.items()}


def summarize_records(records: list[dict]) -> dict:
    by_len = group(records, lambda r: length_bin(r["tokens"]))
    return {"overall": metrics.summarize(records),
            "by_format": group(records, lambda r: r["answer_format"]),
            "by_family": group(records, lambda r: r["family"]),
            "by_length": {k: by_len[k] for k in sorted(by_len, key=bin_upper)}}


def evaluate_docvqa(model_dir: str, data: str, *, documents: str | None = None, image_root: str | None = None,
                    max_len: int | None = None, rope_scaling: dict | None = None, trained_len: int | None = None,
                    max_new_tokens: int = 64, batch_size: int = 1, batch_tokens: int | None = None,
                    max_page_tokens: int | None = None, device: str = "auto", limit: int | None = None,
                    progress: bool = True, predictions: str | None = None) -> dict:
    """Generate an answer for every question of `data` and score it; `predictions` gets one JSON line each."""
    from megatron_mmpl.eval.generate import generate_all, load_model, load_processing, pick_device
    from megatron_mmpl.eval.sources import detect_format, load_items

    kind = detect_format(data)
    items = load_items(data, documents, image_root, limit)
    index = None
    if kind == "shards":

        index = load_index(data)
    tokenizer, improc = load_processing(model_dir, index)
    improc = with_page_cap(improc, max_page_tokens)
    dev = pick_device(device)
    model = load_model(model_dir, dev, rope_scaling)
    records, skipped = [], []
    for g in generate_all(model, items, tokenizer, improc, max_new_tokens=max_new_tokens, max_len=max_len,
                          batch_size=batch_size, batch_tokens=batch_tokens, progress=progress, skipped=skipped):
        it = g.prompt.item
        records.append({"key": it.key, "family": it.family, "answer_format": it.answer_format,
                        "tokens": len(g.prompt.input_ids), "page_tokens_cap": g.prompt.page_tokens_cap,
                        "answer": it.answer, "generated": g.text,
                        **metrics.score_record(it.answer, g.text, it.answer_format)})
    if predictions:
        with open(predictions, "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if not records:
        raise ValueError(f"no question of {data} fits in --max-len {max_len} tokens; raise --max-len")
    return {"kind": "docvqa", "data": data, "format": kind, "scoring": SCORING,
            "settings": {"model": model_dir, "device": str(dev), "rope_scaling": rope_scaling,
                         "trained_len": trained_len, "max_len": max_len, "max_new_tokens": max_new_tokens,
                         "max_page_tokens": max_page_tokens},
            "skipped_over_max_len": len(skipped), **summarize_records(records)}


def with_page_cap(improc, max_page_tokens: int | None):
    """The image processor with at most `max_page_tokens` LM tokens per page (None: unchanged)."""
    if max_page_tokens is None:
        return improc

    from megatron_mmpl.data.images import ImageProcessor

    cap = max_page_tokens * improc.cfg.factor**2
    if cap < improc.cfg.min_pixels:
        raise ValueError(f"--max-page-tokens {max_page_tokens} is below the processor's minimum "
                         f"({-(-improc.cfg.min_pixels // improc.cfg.factor**2)} tokens a page); raise it")
    return ImageProcessor(replace(improc.cfg, max_pixels=cap))
