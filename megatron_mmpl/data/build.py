"""`mmpl data build`: documents + QA (JSONL manifest) → samples at target lengths → bucketed shards.

Manifest line: {"doc_id": str, "pages": [image paths] | "pdf": path, "page_range": [first, last] (1-based,
inclusive), "qa": [{"question", "answer", "task", "evidence_pages": [0-based page indices of this doc]}]}.
Relative paths are relative to the manifest. For each QA item and target length, the evidence pages are kept (in
order) at random depths among distractor pages drawn from OTHER documents, filled until the next page would not fit;
the last distractor is cropped to top the sample up (MMLongBench-style standard lengths). Lengths are exact.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from megatron_mmpl.data.images import ImageProcessor
from megatron_mmpl.data.length import count_tokens, crop_to_budget, encode_png, page_cost
from megatron_mmpl.data.schema import TASKS, Sample, document_messages
from megatron_mmpl.data.shards import DEFAULT_BUCKET_EDGES, ShardWriter
from megatron_mmpl.data.synth import NAMES, PageRenderer
from megatron_mmpl.data.tokenizer import special_ids, tokenizer_fingerprint

log = logging.getLogger(__name__)
PDF_DPI = 144


@dataclass
class Page:
    doc: str
    index: int
    source: str  # file path, or "pdf:<path>#<page>"
    width: int
    height: int

    def read(self) -> tuple[bytes, str]:
        """(encoded bytes, extension), the original file bytes where possible."""
        if self.source.startswith("pdf:"):
            path, _, n = self.source[4:].rpartition("#")
            return encode_png(render_pdf_page(path, int(n))), "png"
        data = Path(self.source).read_bytes()
        ext = Path(self.source).suffix.lower().lstrip(".")
        return (data, "jpg" if ext == "jpeg" else ext) if ext in ("png", "jpg", "jpeg", "webp") else (
            encode_png(Image.open(io.BytesIO(data))), "png")

    def image(self) -> Image.Image:
        data, _ = self.read()
        return Image.open(io.BytesIO(data))


def render_pdf_page(path: str, page_no: int, dpi: int = PDF_DPI) -> Image.Image:
    """Page `page_no` (0-based) of a PDF at `dpi` (MMLongBench renders at 144)."""
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ImportError("PDF input needs pypdfium2: pip install 'megatron_mmpl[pdf]'") from None
    pdf = pdfium.PdfDocument(path)
    try:
        return pdf[page_no].render(scale=dpi / 72).to_pil().convert("RGB")
    finally:
        pdf.close()


def load_manifest(path: str | Path) -> dict[str, dict]:
    """doc_id → {"pages": [Page], "qa": [...]}, with page sizes read from headers (PDF pages rendered once)."""
    path = Path(path)
    docs: dict[str, dict] = {}
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            doc_id = str(d["doc_id"])
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}:{ln}: not a manifest line ({e}); see `mmpl data build --help`") from None
        if doc_id in docs:
            raise ValueError(f"{path}:{ln}: duplicate doc_id {doc_id!r}")
        pages = []
        if "pages" in d:
            for i, p in enumerate(d["pages"]):
                src = str((path.parent / p).resolve())
                with Image.open(src) as im:
                    pages.append(Page(doc_id, i, src, im.width, im.height))
        elif "pdf" in d:
            pdf = str((path.parent / d["pdf"]).resolve())
            first, last = d.get("page_range", [1, None])
            n = _pdf_len(pdf)
            last = n if last is None else min(last, n)
            for i, pno in enumerate(range(first - 1, last)):
                im = render_pdf_page(pdf, pno)
                pages.append(Page(doc_id, i, f"pdf:{pdf}#{pno}", im.width, im.height))
        else:
            raise ValueError(f"{path}:{ln}: doc {doc_id} has neither 'pages' nor 'pdf'")
        for q in d.get("qa", []):
            if q.get("task") not in TASKS:
                raise ValueError(f"{path}:{ln}: task {q.get('task')!r} not in {TASKS}")
            bad = [e for e in q.get("evidence_pages", []) if not 0 <= e < len(pages)]
            if bad:
                raise ValueError(f"{path}:{ln}: evidence pages {bad} outside the doc's {len(pages)} pages")
        docs[doc_id] = dict(pages=pages, qa=d.get("qa", []))
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def _pdf_len(path: str) -> int:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(path)
    try:
        return len(pdf)
    finally:
        pdf.close()


def build_sample(key: str, doc_id: str, qa: dict, target: int, docs: dict, tokenizer, improc: ImageProcessor,
                 rng: random.Random, crop_fill: bool = True) -> Sample | None:
    """One sample at `target` tokens, or None when the evidence alone does not fit."""
    evidence = [docs[doc_id]["pages"][i] for i in qa["evidence_pages"]]
    q, a = qa["question"], qa["answer"]
    base = count_tokens(document_messages(len(evidence), q, a), [(p.width, p.height) for p in evidence],
                        tokenizer, improc)
    if base > target:
        return None
    pool = [p for d, v in docs.items() if d != doc_id for p in v["pages"]]
    rng.shuffle(pool)
    room, chosen, misses = target - base, [], 0
    for p in pool:  # first fit over a shuffled pool, giving up after 32 pages that do not fit
        c = page_cost(p.width, p.height, improc)
        if c <= room:
            chosen.append(p)
            room -= c
            misses = 0
        else:
            misses += 1
            if misses > 32:
                break
    cropped = None
    if crop_fill and room > 2:
        for p in pool:
            if p not in chosen:
                cropped = crop_to_budget(p.image(), room, improc)
                if cropped is not None:
                    break
    n_pages = len(chosen) + len(evidence) + (cropped is not None)
    slots = sorted(rng.sample(range(n_pages), len(evidence)))
    order, it_d, it_e = [], iter(chosen), iter(evidence)
    for i in range(n_pages):
        order.append(next(it_e) if i in slots else next(it_d, None))
    pages, exts, sizes, sources = [], [], [], []
    for p in order:
        if p is None:  # the cropped filler takes the one remaining distractor slot
            pages.append(encode_png(cropped)), exts.append("png"), sizes.append(cropped.size)
            sources.append("crop")
            continue
        data, ext = p.read()
        pages.append(data), exts.append(ext), sizes.append((p.width, p.height)), sources.append(f"{p.doc}:{p.index}")
    msgs = document_messages(len(pages), q, a)
    n = count_tokens(msgs, sizes, tokenizer, improc)
    assert n <= target, (key, n, target)
    meta = dict(generator="build", doc_id=doc_id, target_tokens=target, sources=sources,
                depths=[round(s / max(1, n_pages - 1), 4) for s in slots])
    return Sample(key=key, pages=pages, messages=msgs, task=qa["task"], evidence_pages=slots, n_tokens=n,
                  page_sizes=sizes, page_exts=exts, meta=meta)


def write_build(manifest, out, *, targets: list[int], tokenizer, tokenizer_name: str, improc: ImageProcessor,
                seed: int = 0, max_seq_len: int | None = None, bucket_edges=None, crop_fill: bool = True,
                overwrite: bool = False, shard_bytes: int = 256 << 20) -> dict:
    """Build every (QA item × target) sample of the manifest into shards; returns the index."""

    if max_seq_len is not None and max(targets) > max_seq_len:
        raise ValueError(f"target length {max(targets)} > max_seq_len={max_seq_len}: such samples could never be "
                         f"packed; drop the target or raise --max-seq-len")
    docs = load_manifest(manifest)
    info = dict(tokenizer=tokenizer_fingerprint(tokenizer), tokenizer_name=tokenizer_name,
                special_ids=special_ids(tokenizer).to_dict(), image_processor=improc.cfg.to_dict(),
                source=dict(generator="build", manifest=str(manifest), seed=seed, targets=list(targets)))
    writer = ShardWriter(out, bucket_edges=bucket_edges or DEFAULT_BUCKET_EDGES, info=info, overwrite=overwrite,
                         shard_bytes=shard_bytes)
    skipped = 0
    try:
        for doc_id, d in docs.items():
            for qi, qa in enumerate(d["qa"]):
                for t in targets:
                    key = re.sub(r"[^A-Za-z0-9_-]", "_", f"{doc_id}-q{qi}-{t}")
                    s = build_sample(key, doc_id, qa, t, docs, tokenizer, improc, random.Random(f"{seed}:{key}"),
                                     crop_fill)
                    if s is None:
                        skipped += 1
                        log.warning("%s: evidence + question do not fit in %d tokens; skipped", key, t)
                        continue
                    writer.add(s)
    except BaseException:
        writer.abort()
        raise
    writer.info["source"]["skipped_too_long_for_target"] = skipped
    return writer.close()


def write_synth_manifest(out_dir, n_docs: int = 4, pages_per_doc: int = 6, page_px=(224, 280), seed: int = 0):
    """Small page-image documents + a manifest (one extract_single QA per doc), to exercise `mmpl data build`."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for d in range(n_docs):
        rng = random.Random(f"{seed}:doc{d}")
        r = PageRenderer(*page_px)
        page_lines = [r.filler(rng) for _ in range(pages_per_doc)]
        ev = rng.randrange(pages_per_doc)
        name, code = rng.choice(NAMES), rng.randint(1000, 9999)
        page_lines[ev][rng.randrange(len(page_lines[ev]))] = f"The access code for project {name} is {code}."
        paths = []
        for i, ls in enumerate(page_lines):
            p = out / f"doc{d}" / f"page{i:03d}.png"
            p.parent.mkdir(exist_ok=True)
            r.render(ls).save(p)
            paths.append(str(p.relative_to(out)))
        qa = [dict(question=f"What is the access code for project {name}?", answer=str(code),
                   task="extract_single", evidence_pages=[ev])]
        lines.append(json.dumps(dict(doc_id=f"doc{d}", pages=paths, qa=qa)))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out / "manifest.jsonl"
