"""Our page preprocessing is bit-equal (fp32) to transformers' Qwen2-VL/Qwen2.5-VL PIL image processor."""

import numpy as np
import pytest
from PIL import Image

from megatron_mmpl.data.images import ImageProcessor, ImageProcessorConfig, smart_resize

pytestmark = pytest.mark.unit


def _hf(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kw)


def _image(rng, h, w, mode):
    arr = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
    return im.convert(mode) if mode in ("L", "P") else im


# (h, w, mode): below min_pixels, odd sizes, above max_pixels, extreme aspect, alpha, grayscale, palette
SIZES = [(28, 28, "RGB"), (100, 37, "RGB"), (300, 500, "RGBA"), (1000, 1400, "L"), (57, 1100, "P"),
         (224, 224, "RGB"), (13, 900, "RGB"), (641, 479, "RGB")]


@pytest.mark.parametrize("kw", [dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64), dict(max_pixels=28 * 28 * 300)])
def test_pixel_values_and_grid_equal_transformers(kw):
    hf = _hf(**kw)
    ours = ImageProcessor(ImageProcessorConfig.from_hf(hf))
    rng = np.random.default_rng(0)
    images = [_image(rng, h, w, mode) for h, w, mode in SIZES]
    ref = hf(images=images, return_tensors="np")
    got = [ours(im) for im in images]
    assert np.array_equal(ref["image_grid_thw"], np.array([g for _, g in got]))
    pv = np.concatenate([p for p, _ in got])
    assert pv.dtype == np.float32 and ref["pixel_values"].dtype == np.float32
    assert np.array_equal(ref["pixel_values"], pv)  # exact, fp32
    for (h, w, _), (_, g) in zip(SIZES, got):  # token counts without decoding pixels
        assert ours.num_tokens(h, w) == g[1] * g[2] // 4


def test_defaults_match_transformers_and_png_bytes_input():
    hf = _hf()
    assert ImageProcessorConfig.from_hf(hf) == ImageProcessorConfig()
    import io

    im = _image(np.random.default_rng(1), 90, 130, "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    a, ga = ImageProcessor()(buf.getvalue())
    b, gb = ImageProcessor()(im)
    assert ga == gb and np.array_equal(a, b)


def test_smart_resize_bounds_and_aspect_error():
    for h, w in [(2, 300), (5000, 5000), (123, 457)]:
        rh, rw = smart_resize(h, w)
        assert rh % 28 == 0 and rw % 28 == 0 and 56 * 56 <= rh * rw <= 28 * 28 * 1280
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)
