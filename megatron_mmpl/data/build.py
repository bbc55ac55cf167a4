"""`mmpl data build`: manifest of documents + QA → one sample per (QA item × target length) → bucketed shards.

Samples are laid out by data/compose.py (`document` or `haystack` mode, exact lengths), pages stored by
data/page_codec.py, and written in manifest order whatever the number of worker processes, so `--workers N`
gives the same shards as one. A killed build resumes with `--resume`: finished shards are kept, the rest redone.
The manifest format is in data/manifest.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import re
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_mmpl.data.compose import Composer, Dropped, Slot
from megatron_mmpl.data.images import ImageProcessor
from megatron_mmpl.data.length import count_tokens, crop_rows
from megatron_mmpl.data.manifest import BadInput, Document, PageReader, Problems, read_manifest_lines, scan_line
from megatron_mmpl.data.page_codec import PageCodec
from megatron_mmpl.data.schema import Sample
from megatron_mmpl.data.shards import DEFAULT_BUCKET_EDGES, ShardWriter
from megatron_mmpl.data.synth import NAMES, PageRenderer
from megatron_mmpl.data.tokenizer import special_ids, tokenizer_fingerprint

log = logging.getLogger(__name__)
OCR_QUESTION = "Transcribe the text of page {page} exactly."


@dataclass
class BuildOptions:
    """What a build makes (a resumed build must be given the same)."""

    targets: tuple[int, ...] = (8192, 16384, 32768)
    mode: str = "document"
    seed: int = 0
    image_format: str = "png"
    image_quality: int | str = 90
    ocr_from_pdf: bool = False
    ocr_per_doc: int = 1


class DocBuilder:
    """Builds every sample of one document (runs in a build worker): compose, read/render pages, encode."""

    def __init__(self, docs: list[Document], tokenizer, improc: ImageProcessor, opts: BuildOptions, strict: bool):
        self.docs, self.tok, self.improc, self.opts, self.strict = docs, tokenizer, improc, opts, strict
        self.composer = Composer(docs, tokenizer, improc, opts.mode)
        self.codec = PageCodec(opts.image_format, opts.image_quality)
        self.reader = PageReader()
        self._pages: OrderedDict[tuple[int, int], tuple[bytes, str]] = OrderedDict()

    def items(self, d: int) -> list[tuple[str, dict, int]]:
        """(key, qa, target) of every sample of doc d, in a fixed order (OCR items are chosen when built)."""
        doc, out = self.docs[d], []
        for qa in doc.qa:
            out += [(sample_key(doc.doc_id, f"q{qa['qi']}", t), qa, t) for t in self.opts.targets]
        if self.opts.ocr_from_pdf and doc.pdf is not None:
            for k in range(self.opts.ocr_per_doc):
                out += [(sample_key(doc.doc_id, f"ocr{k}", t), dict(ocr=k), t) for t in self.opts.targets]
        return out

    def __call__(self, d: int, skip: frozenset[str]) -> tuple[list[Sample], list[tuple[str, str, str]], int]:
        """(samples, drops as (reason, key, detail), pages read) of doc d, leaving out the keys in `skip`."""
        samples, drops, read0 = [], [], self.reader.rendered
        ocr: dict[int, dict | str] = {}
        for key, qa, t in self.items(d):
            if key in skip:
                continue
            try:
                if "ocr" in qa:
                    qa = ocr.setdefault(qa["ocr"], self._ocr_qa(d, qa["ocr"]))
                    if isinstance(qa, str):
                        raise Dropped(qa)
                rng = random.Random(f"{self.opts.seed}:{key}")
                slots = self.composer.compose(d, qa, t, rng)
                samples.append(self.assemble(key, d, qa, t, slots))
            except Dropped as e:
                drops.append((str(e), key, f"target {t}"))
            except (BadInput, OSError, ValueError) as e:  # a page that does not render or decode
                if self.strict:
                    raise BadInput(f"sample {key}: {type(e).__name__}: {e} (--strict)") from e
                drops.append(("page that does not decode", key, f"{type(e).__name__}: {e}"))
        return samples, drops, self.reader.rendered - read0

    def _ocr_qa(self, d: int, k: int) -> dict | str:
        """An ocr_transcribe QA whose answer is a page's text layer, or the reason there is none."""
        doc = self.docs[d]
        order = list(range(len(doc)))
        random.Random(f"{self.opts.seed}:{doc.doc_id}:ocr{k}").shuffle(order)
        for i in order[:16]:
            text = self.reader.text(doc, i)
            if len(text) >= 16:
                return dict(question=OCR_QUESTION, answer=text, task="ocr_transcribe", evidence_pages=[i])
        return "no text layer (--ocr-from-pdf)"

    def page(self, s: Slot) -> tuple[bytes, str]:
        """A whole page's stored bytes (cached: pages recur across targets and QA items)."""
        got = self._pages.pop((s.doc, s.page), None)
        if got is None:
            doc = self.docs[s.doc]
            src = self.reader.source_bytes(doc, s.page)
            if src is not None and self.codec.keeps(src[1]):
                got = src
            else:
                got = (self.codec.encode(self.reader.image(doc, s.page)), self.codec.ext)
            if len(self._pages) >= 256:
                self._pages.popitem(last=False)
        self._pages[(s.doc, s.page)] = got
        return got

    def assemble(self, key: str, d: int, qa: dict, target: int, slots: list[Slot]) -> Sample:
        pages, exts, sizes, sources = [], [], [], []
        for s in slots:
            doc = self.docs[s.doc]
            if s.crop:
                img = crop_rows(self.reader.image(doc, s.page), s.rows, self.improc, keep=s.crop)
                data, ext, size = self.codec.encode(img), self.codec.ext, img.size
            else:
                (data, ext), size = self.page(s), tuple(doc.sizes[s.page])
            pages.append(data), exts.append(ext), sizes.append(size)
            sources.append(f"{doc.doc_id}:{s.page}" + (f":{s.crop}{s.rows}" if s.crop else ""))
        msgs = self.composer.messages(slots, qa["question"], qa["answer"])
        n = count_tokens(msgs, sizes, self.tok, self.improc)
        per_row = self.composer.row_tokens(slots)
        assert n == self.composer.exact(slots, qa["question"], qa["answer"]) and 0 <= target - n < per_row, key
        evidence = [i for i, s in enumerate(slots) if s.evidence]
        meta = dict(generator="build", mode=self.opts.mode, doc_id=self.docs[d].doc_id, target_tokens=target,
                    sources=sources, page_labels=[self.composer.label(slots, i) for i in range(len(slots))],
                    depths=[round(e / max(1, len(slots) - 1), 4) for e in evidence], row_tokens=per_row)
        return Sample(key=key, pages=pages, messages=msgs, task=qa["task"], evidence_pages=evidence, n_tokens=n,
                      page_sizes=sizes, page_exts=exts, meta=meta)


def sample_key(doc_id: str, item: str, target: int) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{doc_id}-{item}-{target}")


_WORKER: dict = {}  # the build state a forked worker inherits


def _scan(args):
    return scan_line(*args)


def _build_doc(args):
    d, skip = args
    return _WORKER["builder"](d, skip)


def _pool(workers: int):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return mp.get_context("fork").Pool(workers)


def scan_manifest(manifest, workers: int, problems: Problems) -> list[Document]:
    """Documents of the manifest in order (bad ones skipped and counted), scanned over `workers` processes."""
    base = str(Path(manifest).resolve().parent)
    jobs = [(base, ln, line) for ln, line in read_manifest_lines(manifest)]
    if workers > 1:
        with _pool(workers) as pool:
            results = pool.map(_scan, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    else:
        results = [scan_line(*j) for j in jobs]
    docs, seen = [], set()
    for (_, ln, _), (doc, probs) in zip(jobs, results):
        problems.merge(probs)
        if doc is None:
            continue
        if doc.doc_id in seen:
            problems.add("bad manifest line", doc.doc_id, f"line {ln}: duplicate doc_id")
            continue
        seen.add(doc.doc_id)
        docs.append(doc)
    if not docs:
        raise ValueError(f"{manifest}: no usable documents (see the warnings above)")
    return docs


def write_build(manifest, out, *, targets: list[int], tokenizer, tokenizer_name: str, improc: ImageProcessor,
                seed: int = 0, max_seq_len: int | None = None, bucket_edges=None, overwrite: bool = False,
                shard_bytes: int = 256 << 20, mode: str = "document", image_format: str = "png",
                image_quality: int | str = 90, ocr_from_pdf: bool = False, workers: int = 1, resume: bool = False,
                strict: bool = False, progress: bool = False) -> dict:
    """Build every (QA item × target) sample of the manifest into shards under `out`; returns the index."""
    from tqdm import tqdm


    if max_seq_len is not None and max(targets) > max_seq_len:
        raise ValueError(f"target length {max(targets)} > max_seq_len={max_seq_len}: such samples could never be "
                         f"packed; drop the target or raise --max-seq-len")
    opts = BuildOptions(tuple(targets), mode, seed, image_format, image_quality, ocr_from_pdf)
    PageCodec(image_format, image_quality)  # bad format/quality: stop before any work
    t0 = time.perf_counter()
    problems = Problems(strict)
    docs = scan_manifest(manifest, workers, problems)
    info = dict(tokenizer=tokenizer_fingerprint(tokenizer), tokenizer_name=tokenizer_name,
                special_ids=special_ids(tokenizer).to_dict(), image_processor=improc.cfg.to_dict(),
                source=dict(generator="build", manifest=str(manifest), **asdict(opts)))
    params = dict(tokenizer=info["tokenizer"], image_processor=info["image_processor"], options=asdict(opts),
                  manifest_sha1=_sha(manifest))
    writer = ShardWriter(out, bucket_edges=bucket_edges or DEFAULT_BUCKET_EDGES, info=info, overwrite=overwrite,
                         shard_bytes=shard_bytes, resume=resume, params=params)
    dropped_log = writer.tmp / "dropped.jsonl"
    drops = Counter()
    done = set(writer.keys)
    if resume and dropped_log.exists():  # drops of the interrupted run are final (samples are deterministic)
        for line in dropped_log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            done.add(rec["key"])
            drops[rec["reason"]] += 1
    builder = DocBuilder(docs, tokenizer, improc, opts, strict)
    work = []
    for d in range(len(docs)):
        keys = {k for k, _, _ in builder.items(d)}
        if keys - done:
            work.append((d, frozenset(keys & done)))
    resumed = len(writer.keys)
    n_pages = n_read = 0
    bar = tqdm(total=len(work), unit="doc", desc="build", disable=not progress, smoothing=0.05)
    pool = None
    try:
        _WORKER["builder"] = builder
        if workers > 1:
            pool = _pool(workers)
            results = pool.imap(_build_doc, work, chunksize=1)  # ordered: same shards for any worker count
        else:
            results = (builder(*w) for w in work)
        with open(dropped_log, "a") as dlog:
            for samples, dropped, read in results:
                for s in samples:
                    writer.add(s)
                    n_pages += len(s.pages)
                for reason, key, detail in dropped:
                    drops[reason] += 1
                    log.info("sample %s dropped: %s (%s)", key, reason, detail)
                    dlog.write(json.dumps(dict(key=key, reason=reason, detail=detail)) + "\n")
                dlog.flush()
                n_read += read
                bar.update(1)
                bar.set_postfix(pages_s=f"{n_pages / max(1e-9, time.perf_counter() - t0):.1f}", refresh=False)
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if pool is not None:
            pool.terminate()
        writer.abort(keep=True)
        raise
    finally:
        bar.close()
        _WORKER.clear()
    seconds = time.perf_counter() - t0
    writer.info["build"] = dict(
        dropped=dict(sorted(drops.items())), skipped_input=dict(sorted(problems.counts.items())),
        documents=len(docs), workers=workers, seconds=round(seconds, 2), pages_this_run=n_pages,
        pages_read_this_run=n_read, pages_per_s=round(n_pages / max(seconds, 1e-9), 2),
        resumed_samples=resumed)
    return writer.close()


def _sha(path) -> str:

    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


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
