"""Real PDFs with a text layer for build tests, written with reportlab (the `dev` extra)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PAGE_PT = (200, 260)  # small pages: 400x520 px at 144 dpi


def write_pdf(path: Path, n_pages: int, facts: dict[int, str] | None = None, title: str = "Manual",
              photo_every: int = 0) -> Path:
    """An n-page PDF; page i (0-based) reads its title, its page number, filler lines, and facts[i] if given;
    every `photo_every`-th page also holds a colour photo-like picture (smooth colours plus sensor noise)."""
    canvas = pytest.importorskip("reportlab.pdfgen.canvas")
    from reportlab.lib.utils import ImageReader

    c = canvas.Canvas(str(path), pagesize=PAGE_PT)
    rng = np.random.default_rng(0)
    for i in range(n_pages):
        if photo_every and i % photo_every == 0:
            y, x = np.mgrid[0:120, 0:200] / 40.0
            rgb = np.stack([np.sin(x + i), np.cos(y * 1.3), np.sin(x * y / 3)], -1) * 90 + 128
            rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
            c.drawImage(ImageReader(Image.fromarray(rgb)), 14, 80, width=172, height=60)
        c.setFont("Helvetica-Bold", 11)
        c.drawString(14, PAGE_PT[1] - 24, f"{title}, section {i // 4 + 1}")
        c.setFont("Helvetica", 8)
        for k in range(8):
            c.drawString(14, PAGE_PT[1] - 48 - 12 * k, f"Line {k + 1} of page {i + 1}: setting {(i * 7 + k) % 13}.")
        if facts and i in facts:
            c.drawString(14, 60, facts[i])
        c.drawString(PAGE_PT[0] / 2 - 8, 14, str(i + 1))
        c.showPage()
    c.save()
    return path
