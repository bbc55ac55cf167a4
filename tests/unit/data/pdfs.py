"""Real PDFs with a text layer for build tests, written with reportlab (the `dev` extra)."""

from pathlib import Path

import pytest

PAGE_PT = (200, 260)  # small pages: 400x520 px at 144 dpi


def write_pdf(path: Path, n_pages: int, facts: dict[int, str] | None = None, title: str = "Manual") -> Path:
    """An n-page PDF; page i (0-based) reads its title, its page number, filler lines, and facts[i] if given."""
    canvas = pytest.importorskip("reportlab.pdfgen.canvas")
    c = canvas.Canvas(str(path), pagesize=PAGE_PT)
    for i in range(n_pages):
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
