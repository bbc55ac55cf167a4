"""How pages are stored in shards: PNG (lossless), JPEG or WebP at a quality (WebP also lossless).

A page whose three channels are equal is stored as one grey channel: the loader converts it back to RGB by
repeating that channel, so the decoded pixels are the same (about a third of the bytes for text pages).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

FORMATS = ("png", "jpeg", "webp")
EXTS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


@dataclass(frozen=True)
class PageCodec:
    """format: png | jpeg | webp; quality 1-100 (jpeg/webp), or 'lossless' (webp; png always is)."""

    format: str = "png"
    quality: int | str = 90

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"--image-format {self.format!r}: choose one of {', '.join(FORMATS)}")
        q = self.quality
        if q == "lossless":
            if self.format == "jpeg":
                raise ValueError("--image-quality lossless: JPEG has no lossless mode; use png or webp")
        elif not (isinstance(q, int) and 1 <= q <= 100):
            raise ValueError(f"--image-quality {q!r}: use 1..100, or 'lossless' for webp")

    @property
    def ext(self) -> str:
        return EXTS[self.format]

    @property
    def lossless(self) -> bool:
        return self.format == "png" or self.quality == "lossless"

    def encode(self, image: Image.Image) -> bytes:
        """The page's bytes in this format (grey when its channels are equal)."""
        image = as_grey_if_equal(image)
        buf = io.BytesIO()
        if self.format == "png":
            image.save(buf, format="PNG", compress_level=6)
        elif self.format == "jpeg":
            image.save(buf, format="JPEG", quality=int(self.quality), subsampling=0 if self.quality >= 90 else 2)
        elif self.quality == "lossless":
            image.save(buf, format="WEBP", lossless=True, quality=100, method=4)
        else:
            image.save(buf, format="WEBP", quality=int(self.quality), method=4)
        return buf.getvalue()

    def keeps(self, source_ext: str) -> bool:
        """Whether a source file already in this format is stored as is (no re-encoding, no extra loss)."""
        return source_ext == self.ext and self.format in ("png", "jpeg")


def parse_quality(s: str) -> int | str:
    """'lossless' or an integer quality, from the command line."""
    if s == "lossless":
        return s
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"--image-quality {s!r}: use 1..100, or 'lossless' for webp") from None


def as_grey_if_equal(image: Image.Image) -> Image.Image:
    """An RGB image whose R, G and B are equal everywhere, as mode L (L → RGB repeats it: same pixels)."""
    if image.mode == "L":
        return image
    if image.mode != "RGB":
        return image
    a = np.asarray(image)
    if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
        return Image.fromarray(np.ascontiguousarray(a[..., 0]), mode="L")
    return image
