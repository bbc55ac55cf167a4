"""Evaluation items from the inputs a user has: our shard directories, MMLongBench-Doc (`samples.json` over a
folder of PDFs) and MMLongBench's standard-length DocVQA JSONL (pages as image paths). One item = the prompt's
messages (pages, then the question), the reference answer with its format, a task family and lazily loaded pages.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from megatron_mmpl.data.manifest import PDF_DPI, pdf_page_count, render_pdf_page
from megatron_mmpl.data.schema import Sample, document_messages, task_family
from megatron_mmpl.data.shards import load_index, load_shard_samples, read_members
from megatron_mmpl.eval.metrics import NOT_ANSWERABLE, answer_format, infer_format

# The instruction after a public benchmark's question (our shards carry the question the model was trained on).
PUBLIC_PROMPT = ("{question}\nAnswer as briefly as you can: one word, number or phrase, or a list for several "
                 "items. If the document does not contain the answer, write \"" + NOT_ANSWERABLE + "\".")


@dataclass
class DocItem:
    """One question over one document."""

    key: str
    messages: list[dict]
    """The user turn(s) of the prompt, no answer; image parts are the pages in order."""
    answer: str | list
    answer_format: str
    """Str | Int | Float | List | None (see metrics.FORMATS)."""
    family: str
    page_sizes: list[tuple[int, int]]
    """(width, height) of each page (for PDFs: from the page box at the render dpi, ±1 px)."""
    load_pages: Callable[[], list] = field(repr=False)
    """→ the pages as PIL images or encoded bytes."""
    meta: dict = field(default_factory=dict)


def detect_format(data: str) -> str:
    """shards (a directory with index.json) | mmlongbench-doc (a .json list) | mmlongbench (a .jsonl file)."""
    p = Path(data)
    if p.is_dir():
        if (p / "index.json").is_file():
            return "shards"
        if (p / "samples.json").is_file():
            return "mmlongbench-doc"
    elif p.suffix == ".json" and p.is_file():
        return "mmlongbench-doc"
    elif p.suffix == ".jsonl" and p.is_file():
        return "mmlongbench"
    raise FileNotFoundError(f"--data {data!r} is none of: a shard directory (index.json), MMLongBench-Doc's "
                            "samples.json (or its directory), an MMLongBench DocVQA .jsonl")


def load_items(data: str, documents: str | None = None, image_root: str | None = None,
               limit: int | None = None) -> list[DocItem]:
    kind = detect_format(data)
    if kind == "shards":
        items = [sample_item(s) for s in iter_samples(data, limit)]
    elif kind == "mmlongbench-doc":
        items = mmlongbench_doc_items(data, documents, limit)
    else:
        items = mmlongbench_items(data, image_root, limit)
    if not items:
        raise ValueError(f"--data {data!r} holds no questions")
    return items


def iter_samples(shards: str, limit: int | None = None):
    """The Samples of a shard directory, in index order."""

    index = load_index(shards)
    n = 0
    for shard in index["shards"]:
        with open(os.path.join(shards, shard["path"]), "rb") as f:
            for key, offset, nbytes, _ in load_shard_samples(shards, shard):
                if limit is not None and n >= limit:
                    return
                _, members = read_members(f, offset, nbytes)
                yield Sample.from_members(key, members)
                n += 1


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def sample_item(sample) -> DocItem:
    """A built Sample (shards, needle grids): its question turns as the prompt, its last turn as the answer."""

    *question, answer_msg = sample.messages
    if answer_msg["role"] != "assistant":
        raise ValueError(f"sample {sample.key}: last message is {answer_msg['role']!r}, not the assistant answer")
    answer = _text(answer_msg["content"])
    return DocItem(key=sample.key, messages=question, answer=answer, answer_format=infer_format(answer, sample.task),
                   family=task_family(sample.task), page_sizes=list(sample.page_sizes),
                   load_pages=lambda: list(sample.pages),
                   meta={**sample.meta, "task": sample.task, "evidence_pages": sample.evidence_pages})


def _literal(value, what: str):
    """samples.json stores lists as Python literals in strings ("[3, 5]", "['Chart']")."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError):
            raise ValueError(f"{what}={value!r} is not a list literal") from None
    return value


@functools.lru_cache(maxsize=2)
def _pdf_pages(path: str) -> tuple[Image.Image, ...]:
    """Every page of a PDF rendered at 144 dpi (cached: consecutive questions often share a document)."""
    return tuple(render_pdf_page(path, i) for i in range(pdf_page_count(path)))


@functools.lru_cache(maxsize=64)
def _pdf_sizes(path: str) -> tuple[tuple[int, int], ...]:

    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ImportError("MMLongBench-Doc PDFs need pypdfium2: pip install 'megatron_mmpl[pdf]'") from None
    pdf = pdfium.PdfDocument(path)
    try:
        return tuple((round(w * PDF_DPI / 72), round(h * PDF_DPI / 72)) for w, h in (p.get_size() for p in pdf))
    finally:
        pdf.close()


def mmlongbench_doc_items(samples_json: str, documents: str | None = None, limit: int | None = None):
    """MMLongBench-Doc: samples.json (doc_id, question, answer, answer_format, evidence_pages, ...) over
    `documents/<doc_id>` PDFs (default: the `documents` folder beside samples.json). Every page is shown."""
    path = Path(samples_json)
    if path.is_dir():
        path = path / "samples.json"
    docs = Path(documents) if documents else path.parent / "documents"
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected MMLongBench-Doc's list of questions, got {type(entries).__name__}")
    items = []
    for i, e in enumerate(entries[:limit] if limit is not None else entries):
        missing = [k for k in ("doc_id", "question", "answer", "answer_format") if k not in e]
        if missing:
            raise ValueError(f"{path}: question {i} lacks {missing}; is this MMLongBench-Doc's samples.json?")
        pdf = docs / e["doc_id"]
        if not pdf.is_file():
            raise FileNotFoundError(f"{pdf} not found (question {i}); pass --documents <folder of the PDFs>")
        evidence = _literal(e.get("evidence_pages", "[]"), f"question {i} evidence_pages")
        # MMLongBench-Doc's breakdown: unanswerable; else one evidence page = single-page, any other = cross-page
        family = ("unanswerable" if e["answer"] == NOT_ANSWERABLE else
                  "single-page" if len(evidence) == 1 else "cross-page")
        items.append(DocItem(
            key=f"{Path(e['doc_id']).stem}-{i}", answer=e["answer"], answer_format=answer_format(e["answer_format"]),
            messages=document_messages(len(_pdf_sizes(str(pdf))), PUBLIC_PROMPT.format(question=e["question"]), None),
            family=family, page_sizes=list(_pdf_sizes(str(pdf))),
            load_pages=functools.partial(_pdf_pages, str(pdf)),
            meta={"doc_id": e["doc_id"], "doc_type": e.get("doc_type"), "evidence_pages": evidence,
                  "evidence_sources": _literal(e.get("evidence_sources", "[]"), f"question {i} evidence_sources")}))
    return items


def _open_pages(paths: list[str]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def mmlongbench_items(jsonl: str, image_root: str | None = None, limit: int | None = None):
    """MMLongBench's DocVQA files (`documentQA/<dataset>_K<n>.jsonl`): page_list (image paths under
    `image_root`, default the file's folder), question, answer, answer_format; family = the dataset name."""
    path = Path(jsonl)
    root = Path(image_root) if image_root else path.parent
    m = re.fullmatch(r"(.+?)_K(\d+)", path.stem)
    dataset, nominal = (m.group(1), int(m.group(2)) * 1024) if m else (path.stem, None)
    items = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if limit is not None and len(items) >= limit:
            break
        e = json.loads(line)
        missing = [k for k in ("page_list", "question", "answer", "answer_format") if k not in e]
        if missing:
            raise ValueError(f"{path}:{ln}: lacks {missing}; is this an MMLongBench documentQA file?")
        pages = [str(root / p) for p in e["page_list"]]
        absent = [p for p in pages if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(f"{path}:{ln}: page {absent[0]} not found; pass --image-root <folder the "
                                    "page_list paths are relative to>")
        sizes = []
        for p in pages:
            with Image.open(p) as im:
                sizes.append(im.size)
        doc = e.get("doc_name")
        question = (f"Based on document {doc}: " if doc else "") + e["question"]
        items.append(DocItem(
            key=str(e.get("id", f"{path.stem}-{ln}")), answer=e["answer"],
            answer_format=answer_format(e["answer_format"]),
            messages=document_messages(len(pages), PUBLIC_PROMPT.format(question=question), None),
            family=dataset, page_sizes=sizes, load_pages=functools.partial(_open_pages, pages),
            meta={"doc_name": doc, "nominal_tokens": nominal}))
    return items


def page_image(page) -> Image.Image:
    return page if isinstance(page, Image.Image) else Image.open(io.BytesIO(page))

