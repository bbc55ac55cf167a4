"""Visual needle for the embedded default: one coloured page among many grey ones; the answer is its colour word.

Built so a ~1-2M-parameter Qwen2.5-VL-shaped model can learn it on CPU in a few hundred steps: 56×56-px pages
(16 patches → 4 LM tokens each), distractor pages carry only grey strokes, the marked page a large saturated
square of one of `n_colours` colours (each colour word is one token of the tiny tokenizer). Chance = 1/n_colours.
Retrieval spans the whole context: the marked page's depth is uniform over the document.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from megatron_mmpl.data.images import ImageProcessor
from megatron_mmpl.data.length import count_tokens, encode_png, page_cost
from megatron_mmpl.data.schema import Sample, document_messages

PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
    "purple": (140, 60, 180), "orange": (240, 140, 20), "cyan": (30, 190, 200), "pink": (240, 120, 180),
}
QUESTION = "Which colour is the marked page? Answer with one word."


def needle_page(rng: random.Random, size: int, colour: tuple[int, int, int] | None) -> Image.Image:
    """A grey 'text' page; with `colour`, a filled square of that colour covers its centre."""
    bg = rng.randint(215, 255)
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):  # grey strokes, like lines of text
        y = rng.randrange(2, size - 2)
        g = rng.randint(40, 160)
        d.line((rng.randrange(0, size // 3), y, rng.randrange(2 * size // 3, size), y), fill=(g, g, g), width=2)
    if colour is not None:
        s = rng.randint(size // 3, size // 2)
        x0, y0 = rng.randrange(2, size - s - 1), rng.randrange(2, size - s - 1)
        jitter = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in colour)
        d.rectangle((x0, y0, x0 + s, y0 + s), fill=jitter)
    return img


def needle_sample(key: str, target_tokens: int, tokenizer, improc: ImageProcessor, seed: int,
                  n_colours: int = 4, page_px: int = 56, depth: float | None = None) -> Sample:
    """One sample: as many pages as fit in target_tokens, one of them coloured; answer = its colour word.
    `depth` in [0, 1] places the coloured page (0: first page, 1: last); None draws it uniformly."""
    if not 2 <= n_colours <= len(PALETTE):
        raise ValueError(f"n_colours={n_colours}: choose 2..{len(PALETTE)}")
    if page_px % improc.cfg.factor:
        raise ValueError(f"page_px={page_px} must be a multiple of {improc.cfg.factor} (patch × merge)")
    rng = random.Random(f"needle:{seed}:{key}")
    names = list(PALETTE)[:n_colours]
    answer = rng.choice(names)
    overhead = count_tokens(document_messages(0, QUESTION, answer), [], tokenizer, improc)
    n_pages = (target_tokens - overhead) // page_cost(page_px, page_px, improc)
    if n_pages < 2:
        raise ValueError(f"target {target_tokens} tokens fits {n_pages} needle page(s); raise it to >= {overhead + 12}")
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth={depth}: choose a fraction of the document in [0, 1]")
    marked = rng.randrange(n_pages) if depth is None else round(depth * (n_pages - 1))
    pages = [encode_png(needle_page(rng, page_px, PALETTE[answer] if i == marked else None), level=1)
             for i in range(n_pages)]
    msgs = document_messages(n_pages, QUESTION, answer)
    sizes = [(page_px, page_px)] * n_pages
    n = count_tokens(msgs, sizes, tokenizer, improc)
    assert n <= target_tokens, (n, target_tokens)
    meta = dict(generator="needle", kind="visual_needle", seed=seed, target_tokens=target_tokens, choices=names,
                chance=1 / n_colours, marked_page=marked, depths=[round(marked / max(1, n_pages - 1), 4)])
    return Sample(key=key, pages=pages, messages=msgs, task="extract_single", evidence_pages=[marked], n_tokens=n,
                  page_sizes=sizes, page_exts=["png"] * n_pages, meta=meta)
