"""Model inputs for evaluation: an item's pages + question → token ids and pixels (shrinking every page alike when
the document exceeds --max-len), batches of similar length, and left-padded transformers inputs.

transformers ≥ 5 builds Qwen2.5-VL's 3D M-RoPE positions only when given `mm_token_type_ids` (0 text, 1 image);
without them it silently falls back to 1D positions — so the collated batch always carries them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from megatron_mmpl.data.chat_template import render
from megatron_mmpl.data.images import ImageProcessor, smart_resize
from megatron_mmpl.eval.sources import DocItem, page_image


@dataclass
class Prompt:
    item: DocItem
    input_ids: np.ndarray
    """[s] int64, ending with the generation prompt."""
    pixel_values: np.ndarray | None
    """[patches, C·T·P·P] float32 over all pages."""
    grids: list[tuple[int, int, int]]
    page_tokens_cap: int | None
    """Tokens per page the pages were shrunk to (None: native resolution)."""


def _tokens(sizes, improc: ImageProcessor, max_pixels: int | None = None) -> list[int]:
    c = improc.cfg
    out = []
    for w, h in sizes:
        rh, rw = smart_resize(h, w, c.factor, c.min_pixels, max_pixels or c.max_pixels)
        out.append((rh // c.factor) * (rw // c.factor))
    return out


def prompt_length(item: DocItem, sizes, tokenizer, improc: ImageProcessor, max_pixels: int | None = None) -> int:
    """Exact token count of the item's prompt (with the generation prompt) for pages of these sizes."""
    ids, _ = render(item.messages, _tokens(sizes, improc, max_pixels), tokenizer, add_generation_prompt=True)
    return len(ids)


def fit_max_pixels(item: DocItem, sizes, tokenizer, improc: ImageProcessor, max_len: int) -> int | None:
    """The largest per-page pixel budget (a whole number of merged tokens) under which the prompt fits in
    max_len tokens; the native budget when it fits as it is; None when even the smallest pages do not fit."""
    c = improc.cfg
    if prompt_length(item, sizes, tokenizer, improc) <= max_len:
        return c.max_pixels
    per_token = c.factor**2
    lo, hi = -(-c.min_pixels // per_token), c.max_pixels // per_token  # tokens per page, bounds
    if lo > hi or prompt_length(item, sizes, tokenizer, improc, lo * per_token) > max_len:
        return None
    while lo < hi:  # largest cap that fits
        mid = (lo + hi + 1) // 2
        if prompt_length(item, sizes, tokenizer, improc, mid * per_token) <= max_len:
            lo = mid
        else:
            hi = mid - 1
    return lo * per_token


def build_prompt(item: DocItem, tokenizer, improc: ImageProcessor, max_len: int | None = None) -> Prompt | None:
    """Load the pages and build the prompt; None when it cannot fit in max_len tokens."""
    pages = [page_image(p) for p in item.load_pages()]
    sizes = [p.size for p in pages]
    cap = None
    if max_len is not None:
        max_pixels = fit_max_pixels(item, sizes, tokenizer, improc, max_len)
        if max_pixels is None:
            return None
        if max_pixels != improc.cfg.max_pixels:
            improc = ImageProcessor(replace(improc.cfg, max_pixels=max_pixels))
            cap = max_pixels // improc.cfg.factor**2
    pvs, grids = zip(*(improc(p) for p in pages)) if pages else ((), ())
    m2 = improc.cfg.merge_size**2
    ids, _ = render(item.messages, [t * h * w // m2 for t, h, w in grids], tokenizer, add_generation_prompt=True)
    return Prompt(item, ids, np.concatenate(pvs) if pvs else None, list(grids), cap)


def plan_batches(lengths: list[int], batch_size: int, batch_tokens: int | None = None,
                 min_ratio: float = 0.8) -> list[list[int]]:
    """Indices grouped longest first: at most batch_size per batch, batch × longest ≤ batch_tokens, and the
    shortest at least min_ratio × the longest (little padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use 1 or more")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if (b and len(b) < batch_size and lengths[i] >= min_ratio * lengths[b[0]]
                and (batch_tokens is None or (len(b) + 1) * lengths[b[0]] <= batch_tokens)):
            b.append(i)
        else:
            batches.append([i])
    return batches


def collate(prompts: list[Prompt], pad_id: int, image_token_id: int, device) -> dict:
    """transformers inputs, left-padded: input_ids, attention_mask (not for one prompt: SDPA then runs causal
    without a materialised mask, which a 128K prefill needs), mm_token_type_ids,
    pixel_values and image_grid_thw (all images of the batch in order)."""
    n = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p.input_ids):] = torch.from_numpy(p.input_ids)
        mask[i, n - len(p.input_ids):] = 1
    batch = {"input_ids": ids.to(device), "mm_token_type_ids": (ids == image_token_id).long().to(device)}
    if len(prompts) > 1:
        batch["attention_mask"] = mask.to(device)
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.from_numpy(np.concatenate(pixels)).to(device)
        batch["image_grid_thw"] = torch.tensor([g for p in prompts for g in p.grids], dtype=torch.long,
                                               device=device)
    return batch
