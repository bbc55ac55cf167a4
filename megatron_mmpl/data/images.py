"""Qwen2.5-VL image preprocessing: smart_resize, rescale + normalise, patchify — bit-equal to transformers' PIL path.

One page image → `pixel_values [gh*gw, C*T*P*P] float32` (T = temporal patch, the still image repeated) and its
grid (1, gh, gw). An image costs gh*gw / merge² LM tokens.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(h, w) rounded to multiples of `factor` with h*w in [min_pixels, max_pixels], aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {width}x{height}: aspect ratio {max(height, width) / min(height, width):.0f} > 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing knobs of Qwen2.5-VL (defaults = the released checkpoints')."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = field(default=CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=CLIP_STD)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        d = dict(d)
        for k in ("image_mean", "image_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_hf(cls, proc) -> ImageProcessorConfig:
        """From a transformers Qwen2VLImageProcessor(-Pil) (size = {shortest_edge, longest_edge} in pixels)."""
        return cls(
            min_pixels=int(proc.size["shortest_edge"]), max_pixels=int(proc.size["longest_edge"]),
            patch_size=int(proc.patch_size), temporal_patch_size=int(proc.temporal_patch_size),
            merge_size=int(proc.merge_size), image_mean=tuple(proc.image_mean), image_std=tuple(proc.image_std),
        )


class ImageProcessor:
    """Page image → (pixel_values, grid_thw). The per-channel normalisation is a 256-entry table per channel,
    computed with transformers' exact arithmetic (uint8 → float64 × 1/255 → float32; (x − mean) / std in float32)."""

    def __init__(self, cfg: ImageProcessorConfig | None = None):
        self.cfg = cfg or ImageProcessorConfig()
        v = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.cfg.image_mean, dtype=np.float32)
        std = np.asarray(self.cfg.image_std, dtype=np.float32)
        self._lut = ((v[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)  # [C, 256]

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        c = self.cfg
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)

    def num_tokens(self, height: int, width: int) -> int:
        """LM tokens (image pads) of an image of this size."""
        h, w = self.resized_size(height, width)
        return (h // self.cfg.factor) * (w // self.cfg.factor)

    def __call__(self, image: Image.Image | bytes) -> tuple[np.ndarray, tuple[int, int, int]]:
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(image))
        c = self.cfg
        rgb = to_rgb(image)
        h, w = self.resized_size(rgb.height, rgb.width)
        if (h, w) != (rgb.height, rgb.width):
            rgb = rgb.resize((w, h), resample=Image.Resampling.BICUBIC)
        x = np.asarray(rgb)  # [h, w, C] uint8
        f = np.empty(x.shape, np.float32)
        for ch in range(3):  # uint8 -> normalised float32 by table, contiguous
            f[..., ch] = self._lut[ch][x[..., ch]]
        gh, gw, m, p, t = h // c.patch_size, w // c.patch_size, c.merge_size, c.patch_size, c.temporal_patch_size
        # [h, w, C] -> [gh/m, m, p, gw/m, m, p, C] -> [gh/m, gw/m, m, m, C, p, p]: merge groups stay contiguous
        f = f.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        out = np.empty((gh // m, gw // m, m, m, 3, t, p, p), np.float32)
        for k in range(t):  # the still image repeated over the temporal patch
            out[:, :, :, :, :, k] = f
        return out.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
