"""Exact sample length (text + image tokens) and filling a token budget with pages, as done at build time."""

from __future__ import annotations

import io

from PIL import Image

from megatron_mmpl.data.chat_template import render
from megatron_mmpl.data.images import ImageProcessor, to_rgb

VISION_MARKERS = 2  # <|vision_start|> and <|vision_end|> around each image's pad tokens


def count_tokens(messages: list[dict], page_sizes, tokenizer, improc: ImageProcessor) -> int:
    """Token length of the rendered conversation; page_sizes are (width, height)."""
    ids, _ = render(messages, [improc.num_tokens(h, w) for w, h in page_sizes], tokenizer)
    return len(ids)


def page_cost(width: int, height: int, improc: ImageProcessor) -> int:
    """Tokens one page adds to a sample: its pad tokens plus the two vision markers."""
    return improc.num_tokens(height, width) + VISION_MARKERS


def crop_to_budget(image: Image.Image, budget: int, improc: ImageProcessor) -> Image.Image | None:
    """The top of `image`, at its processed resolution, with as many merged rows as fit in `budget` tokens
    (markers included); None if not even two rows fit. Its size is a fixed point of smart_resize."""
    h, w = improc.resized_size(image.height, image.width)
    rows = min(h // improc.cfg.factor, (budget - VISION_MARKERS) // (w // improc.cfg.factor))
    if rows < 2 or rows * improc.cfg.factor * w < improc.cfg.min_pixels:
        return None
    return crop_rows(image, rows, improc)


def crop_rows(image: Image.Image, rows: int, improc: ImageProcessor, keep: str = "top") -> Image.Image:
    """The top (or bottom) `rows` merged rows of `image` at its processed resolution (rows · width/28 tokens)."""
    f = improc.cfg.factor
    h, w = improc.resized_size(image.height, image.width)
    img = to_rgb(image)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
    top = 0 if keep == "top" else h - rows * f
    out = img.crop((0, top, w, top + rows * f))
    assert improc.resized_size(out.height, out.width) == (out.height, out.width)
    return out


def encode_png(image: Image.Image, level: int = 3) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()
