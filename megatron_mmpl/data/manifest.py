"""The build manifest: one JSON line per document, read into a catalogue of page sizes and QA items.

Line: {"doc_id": str, "pages": [image paths] | "pdf": path, "page_range": [first, last] (1-based, inclusive),
"title": optional str, "qa": [{"question", "answer", "task", "evidence_pages": [0-based indices into the doc's
pages]}]}. Relative paths are relative to the manifest. Bad input (an unreadable PDF or image, a page index out
of range, a QA with no evidence pages) is skipped and counted with one line naming the document, or stops the
build under `strict`. PDF page sizes come from the page boxes, so no page is rendered to read the manifest.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from megatron_mmpl.data.images import to_rgb
from megatron_mmpl.data.schema import TASKS

log = logging.getLogger(__name__)
PDF_DPI = 144  # MMLongBench renders PDF pages at 144 dpi


class BadInput(ValueError):
    """A manifest line, document, page or QA item that cannot be used (raised under --strict)."""


@dataclass
class Document:
    """One manifest document: where its pages are, their rendered sizes, its page labels and QA items."""

    doc_id: str
    title: str
    sizes: list[tuple[int, int]]
    """(width, height) of each page as stored (PDF pages at PDF_DPI)."""
    page_numbers: list[int]
    """1-based page number of each page in its own document (the PDF page number for a page range)."""
    pdf: str | None = None
    images: list[str] = field(default_factory=list)
    qa: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sizes)


@dataclass
class Problems:
    """Counts of skipped input by reason, one log line each; `strict` turns the first into an error."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str, doc_id: str, detail: str) -> None:
        if self.strict:
            raise BadInput(f"doc {doc_id}: {detail} (--strict; drop --strict to skip and count such input)")
        self.counts[reason] += 1
        log.warning("doc %s: %s; skipped (%s)", doc_id, detail, reason)

    def merge(self, items: list[tuple[str, str, str]]) -> None:
        for reason, doc_id, detail in items:
            self.add(reason, doc_id, detail)


def read_manifest_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) of the manifest's non-empty lines."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} not found; see `mmpl data build --help` for its format")
    return [(ln, line) for ln, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def scan_line(base: str, ln: int, line: str) -> tuple[Document | None, list[tuple[str, str, str]]]:
    """One manifest line → (Document or None, [(reason, doc_id, detail)]); never raises on bad input."""
    problems: list[tuple[str, str, str]] = []
    try:
        d = json.loads(line)
        doc_id = str(d["doc_id"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return None, [("bad manifest line", f"<line {ln}>", f"line {ln} is not a manifest line ({e})")]
    title = str(d.get("title") or doc_id)
    try:
        if "pdf" in d:
            doc = _scan_pdf(doc_id, title, str((Path(base) / d["pdf"]).resolve()), d.get("page_range"))
        elif "pages" in d:
            doc = _scan_images(doc_id, title, [str((Path(base) / p).resolve()) for p in d["pages"]])
        else:
            return None, [("bad manifest line", doc_id, f"line {ln} has neither 'pages' nor 'pdf'")]
    except BadInput as e:
        reason, _, detail = str(e).partition(": ")
        return None, [(reason, doc_id, detail)]
    for qi, q in enumerate(d.get("qa", [])):
        bad = _qa_problem(q, len(doc))
        if bad:
            problems.append((bad[0], doc_id, f"qa {qi}: {bad[1]}"))
        else:
            doc.qa.append(dict(question=q["question"], answer=q["answer"], task=q["task"],
                               evidence_pages=sorted(set(int(e) for e in q["evidence_pages"])), qi=qi))
    return doc, problems


def _qa_problem(q, n_pages: int) -> tuple[str, str] | None:
    if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("answer"), str):
        return "bad qa item", "needs string 'question' and 'answer'"
    if q.get("task") not in TASKS:
        return "bad qa item", f"task {q.get('task')!r} is not one of {TASKS}"
    ev = q.get("evidence_pages")
    if not ev:
        return "qa without evidence pages", "no evidence_pages: the answer must point at the pages that hold it"
    bad = [e for e in ev if not isinstance(e, int) or not 0 <= e < n_pages]
    if bad:
        return "page index out of range", f"evidence pages {bad} outside the doc's pages 0..{n_pages - 1}"
    return None


def _scan_pdf(doc_id: str, title: str, path: str, page_range) -> Document:
    pdfium = _pdfium()
    try:
        pdf = pdfium.PdfDocument(path)
    except Exception as e:  # noqa: BLE001 - pdfium raises PdfiumError, OSError, ...
        raise BadInput(f"unreadable PDF: cannot open {path} ({type(e).__name__}: {e})") from None
    try:
        n = len(pdf)
        first, last = (page_range or [1, n])[:2]
        last = n if last is None else last
        if not (isinstance(first, int) and isinstance(last, int) and 1 <= first <= last <= n):
            raise BadInput(f"page index out of range: page_range {page_range} outside the PDF's pages 1..{n}")
        scale = PDF_DPI / 72
        sizes = []
        for pno in range(first - 1, last):
            w, h = pdf[pno].get_size()
            sizes.append((math.ceil(w * scale), math.ceil(h * scale)))  # pypdfium2's render size
    finally:
        pdf.close()
    return Document(doc_id, title, sizes, list(range(first, last + 1)), pdf=path)


def _scan_images(doc_id: str, title: str, paths: list[str]) -> Document:
    sizes = []
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.append((im.width, im.height))
                im.verify()
        except Exception as e:  # noqa: BLE001 - missing file, unknown format, truncated data
            raise BadInput(f"image that does not decode: {p} ({type(e).__name__}: {e})") from None
    if not sizes:
        raise BadInput("bad manifest line: 'pages' is empty")
    return Document(doc_id, title, sizes, list(range(1, len(sizes) + 1)), images=paths)


def _pdfium():
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ImportError("PDF input needs pypdfium2: pip install 'megatron_mmpl[pdf]'") from None
    return pdfium


def pdf_page_count(path: str) -> int:
    doc = _pdfium().PdfDocument(path)
    try:
        return len(doc)
    finally:
        doc.close()


def render_pdf_page(path: str, page_no: int, dpi: int = PDF_DPI) -> Image.Image:
    """Page `page_no` (0-based) of a PDF at `dpi`, RGB."""
    pdf = _pdfium().PdfDocument(path)
    try:
        return pdf[page_no].render(scale=dpi / 72).to_pil().convert("RGB")
    finally:
        pdf.close()


class PageReader:
    """Renders or reads the pages of documents, keeping a few PDFs open (one reader per build worker)."""

    def __init__(self, max_open: int = 4):
        self._pdfs: OrderedDict[str, object] = OrderedDict()
        self.max_open = max_open
        self.rendered = 0

    def _pdf(self, path: str):
        pdf = self._pdfs.pop(path, None)
        if pdf is None:
            pdf = _pdfium().PdfDocument(path)
            if len(self._pdfs) >= self.max_open:
                self._pdfs.popitem(last=False)[1].close()
        self._pdfs[path] = pdf
        return pdf

    def image(self, doc: Document, i: int) -> Image.Image:
        """Page i of `doc` as stored: a PDF page rendered at PDF_DPI, or the image file (RGB)."""
        self.rendered += 1
        if doc.pdf is not None:
            im = self._pdf(doc.pdf)[doc.page_numbers[i] - 1].render(scale=PDF_DPI / 72).to_pil().convert("RGB")
        else:
            with Image.open(doc.images[i]) as f:
                f.load()
                im = to_rgb(f)  # transparency onto white, as the loader does
        if im.size != tuple(doc.sizes[i]):
            raise BadInput(f"page {i} is {im.size[0]}x{im.size[1]} px but the manifest scan saw "
                           f"{doc.sizes[i][0]}x{doc.sizes[i][1]}")
        return im

    def source_bytes(self, doc: Document, i: int) -> tuple[bytes, str] | None:
        """(file bytes, extension) of an image page, None for a PDF page."""
        if doc.pdf is not None:
            return None
        p = Path(doc.images[i])
        ext = p.suffix.lower().lstrip(".")
        return p.read_bytes(), "jpg" if ext == "jpeg" else ext

    def text(self, doc: Document, i: int) -> str:
        """The text layer of PDF page i ('' when it has none)."""
        page = self._pdf(doc.pdf)[doc.page_numbers[i] - 1]
        tp = page.get_textpage()
        try:
            text = tp.get_text_bounded()
        finally:
            tp.close()
        lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        return "\n".join(lines).strip()

    def close(self) -> None:
        for pdf in self._pdfs.values():
            pdf.close()
        self._pdfs.clear()
