"""Synthetic long documents: Pillow-rendered text pages with facts planted at controlled depths, and QA over them.

Tasks: extract_single (one fact), extract_multi (2-3 facts on different pages), reason (compare two values / count
the pages that mention a name), ocr_transcribe (transcribe one page). Everything is a function of the seed. The
page resolution follows the target length (~24 pages up to 1,280 tokens a page, then more pages), and the last
page is a filler cropped so the sample ends within one merged row of the target.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from megatron_mmpl.data.images import ImageProcessor
from megatron_mmpl.data.length import VISION_MARKERS, count_tokens, crop_to_budget, encode_png, page_cost
from megatron_mmpl.data.needle import needle_sample
from megatron_mmpl.data.schema import TASKS, Sample, document_messages
from megatron_mmpl.data.shards import DEFAULT_BUCKET_EDGES, ShardWriter
from megatron_mmpl.data.tokenizer import special_ids, tokenizer_fingerprint

_SYLL = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "sei", "dan", "por", "lix", "em", "ul", "tra", "bes", "ong", "fi")
NAMES = ("Falcon", "Orion", "Lynx", "Cedar", "Harbor", "Quartz", "Nimbus", "Aurora", "Basalt", "Comet", "Delta",
         "Ember", "Fjord", "Granite", "Helix", "Indigo", "Juniper", "Kestrel", "Lumen", "Meadow", "Nova", "Onyx",
         "Pioneer", "Quill", "Raven", "Sierra", "Tundra", "Umber", "Vertex", "Willow", "Xenon", "Yarrow", "Zephyr")
PAGE_ASPECT = 8.5 / 11  # width / height of a letter page


@dataclass
class DocPlan:
    """Geometry of one synthetic document at a target length."""

    page_w: int
    page_h: int
    n_pages: int
    filler_budget: int  # tokens left for a cropped filler page at the end (0: none)


def page_geometry(target_tokens: int, improc: ImageProcessor, pages_hint: int = 24, max_page_tokens: int = 1280):
    """(width, height) px of a page: about target/pages_hint tokens, at most max_page_tokens, letter aspect."""
    f = improc.cfg.factor
    per_page = max(4, min(max_page_tokens, target_tokens // pages_hint))
    gh = max(2, round(math.sqrt(per_page / PAGE_ASPECT)))
    gw = max(2, per_page // gh)
    return gw * f, gh * f


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLL) for _ in range(rng.randint(1, 3)))


def _filler_line(rng: random.Random, n_words: int) -> str:
    words = [_word(rng) for _ in range(n_words)]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


class PageRenderer:
    """Renders lines of text onto a grayscale page sized for the target length."""

    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.margin = max(2, width // 24)
        self.font_px = max(6, width // 40)
        self.font = ImageFont.load_default(size=self.font_px)
        self.line_h = int(self.font_px * 1.35)
        self.lines_per_page = max(1, (height - 2 * self.margin) // self.line_h)
        self.words_per_line = max(2, int((width - 2 * self.margin) // (self.font_px * 4.8)))

    def render(self, lines: list[str], height: int | None = None) -> Image.Image:
        img = Image.new("L", (self.w, height or self.h), 255)
        d = ImageDraw.Draw(img)
        for i, line in enumerate(lines):
            d.text((self.margin, self.margin + i * self.line_h), line, font=self.font, fill=0)
        return img

    def filler(self, rng: random.Random) -> list[str]:
        return [_filler_line(rng, rng.randint(self.words_per_line // 2, self.words_per_line))
                for _ in range(self.lines_per_page)]


def _plant(lines: list[str], fact: str, rng: random.Random) -> None:
    lines[rng.randrange(len(lines))] = fact


def _qa(task: str, n_pages: int, rng: random.Random, depths: list[float] | None):
    """Question, answer, {page: [fact lines]}, evidence pages and depths for one task."""

    def pick_pages(k):
        if depths:
            ps = sorted({min(n_pages - 1, round(d * (n_pages - 1))) for d in depths[:k]})
            if len(ps) == k:
                return ps
        return sorted(rng.sample(range(n_pages), k))

    names = rng.sample(NAMES, 3)
    facts: dict[int, list[str]] = {}
    if task == "extract_single":
        (p,) = pick_pages(1)
        code = rng.randint(1000, 9999)
        facts[p] = [f"The access code for project {names[0]} is {code}."]
        return f"What is the access code for project {names[0]}?", str(code), facts, [p]
    if task == "extract_multi":
        k = min(n_pages, rng.choice((2, 3)))
        ps = pick_pages(k)
        codes = [rng.randint(1000, 9999) for _ in ps]
        for p, n, c in zip(ps, names, codes):
            facts.setdefault(p, []).append(f"The access code for project {n} is {c}.")
        q = f"What are the access codes for projects {', '.join(names[:k])}? Answer in that order, comma-separated."
        return q, ", ".join(map(str, codes)), facts, ps
    if task == "reason":
        if rng.random() < 0.5 and n_pages >= 2:
            ps = pick_pages(2)
            a, b = rng.sample(range(10, 999), 2)
            facts[ps[0]] = [f"Project {names[0]} has a budget of {a} million dollars."]
            facts[ps[1]] = [f"Project {names[1]} has a budget of {b} million dollars."]
            q = f"Which project has the larger budget, {names[0]} or {names[1]}? Answer with the project name."
            return q, names[0] if a > b else names[1], facts, ps
        k = rng.randint(1, min(5, n_pages))
        ps = pick_pages(k)
        for p in ps:
            facts[p] = [f"Inspector {names[2]} signed this page."]
        return f"On how many pages does inspector {names[2]} sign? Answer with a number.", str(k), facts, ps
    if task == "ocr_transcribe":
        (p,) = pick_pages(1)
        return f"Transcribe the text of page {p + 1}.", None, {}, [p]
    raise ValueError(f"task {task!r}: choose from {TASKS}")


def synth_document(key: str, task: str, target_tokens: int, tokenizer, improc: ImageProcessor, seed: int,
                   depths: list[float] | None = None) -> Sample:
    """One sample of `task` whose exact length is <= target_tokens (within one merged page row of it)."""
    rng = random.Random(f"{seed}:{key}")
    w, h = page_geometry(target_tokens, improc)
    r = PageRenderer(w, h)
    cost = page_cost(w, h, improc)
    # question/answer lengths are known before the pages: size the document around them
    probe_q, probe_a, _, _ = _qa(task, 2, random.Random(0), None)
    overhead = count_tokens(document_messages(0, probe_q, probe_a or "x" * 8), [], tokenizer, improc)
    n_pages = max(1, (target_tokens - overhead - 64) // cost)
    q, a, facts, evidence = _qa(task, n_pages, rng, depths)
    page_lines = [r.filler(rng) for _ in range(n_pages)]
    for p, fl in facts.items():
        for f in fl:
            _plant(page_lines[p], f, rng)
    if task == "ocr_transcribe":
        p = evidence[0]
        page_lines[p] = page_lines[p][: max(1, min(len(page_lines[p]), 6))]  # short page: answer stays small
        a = "\n".join(page_lines[p])
    pages = [encode_png(r.render(lines)) for lines in page_lines]
    sizes = [(w, h)] * n_pages
    while True:  # drop pages if the real question/answer made us overshoot
        msgs = document_messages(len(pages), q, a)
        n = count_tokens(msgs, sizes, tokenizer, improc)
        if n <= target_tokens or len(pages) == len(evidence) + 1 or len(pages) == 1:
            break
        drop = max(i for i in range(len(pages)) if i not in evidence)
        del pages[drop], sizes[drop]
    if n > target_tokens:
        raise ValueError(f"{key}: cannot fit task {task} into {target_tokens} tokens (needs {n}); raise the target")
    extra = crop_to_budget(r.render(r.filler(rng)), target_tokens - n, improc)
    if extra is not None:  # a cropped filler page after the last page tops the sample up to the target
        pages.append(encode_png(extra))
        sizes.append(extra.size)
        msgs = document_messages(len(pages), q, a)
        n = count_tokens(msgs, sizes, tokenizer, improc)
    assert n <= target_tokens, (n, target_tokens)
    meta = dict(generator="synth", seed=seed, target_tokens=target_tokens, page_px=[w, h],
                depths=[round(p / max(1, n_pages - 1), 4) for p in evidence])
    return Sample(key=key, pages=pages, messages=msgs, task=task, evidence_pages=evidence, n_tokens=n,
                  page_sizes=sizes, page_exts=["png"] * len(pages), meta=meta)


def filler_page(width: int, height: int, seed) -> Image.Image:
    """A page of filler text (distractor material for `mmpl data build` tests)."""
    r = PageRenderer(width, height)
    return r.render(r.filler(random.Random(seed)))


def image_tokens_of(sample: Sample, improc: ImageProcessor) -> list[int]:
    return [improc.num_tokens(h, w) for w, h in sample.page_sizes]


__all__ = ["synth_document", "page_geometry", "filler_page", "PageRenderer", "VISION_MARKERS", "image_tokens_of"]


def write_synth(out, *, targets: list[int], per_target: int, tokenizer, tokenizer_name: str,
                improc: ImageProcessor, seed: int = 0, kind: str = "text", tasks=TASKS, bucket_edges=None,
                n_colours: int = 4, page_px: int = 56, overwrite: bool = False, progress=None) -> dict:
    """Synthesise `per_target` samples per (target length, task) into bucketed shards; returns the index."""

    info = dict(tokenizer=tokenizer_fingerprint(tokenizer), tokenizer_name=tokenizer_name,
                special_ids=special_ids(tokenizer).to_dict(), image_processor=improc.cfg.to_dict(),
                source=dict(generator=f"synth:{kind}", seed=seed, targets=list(targets), per_target=per_target))
    writer = ShardWriter(out, bucket_edges=bucket_edges or DEFAULT_BUCKET_EDGES, info=info, overwrite=overwrite,
                         shard_bytes=64 << 20)
    try:
        for t in targets:
            for task in (("extract_single",) if kind == "needle" else tasks):
                for i in range(per_target):
                    key = f"{kind}-{task}-{t}-{i:06d}"
                    if kind == "needle":
                        s = needle_sample(key, t, tokenizer, improc, seed, n_colours=n_colours, page_px=page_px)
                    elif kind == "text":
                        s = synth_document(key, task, t, tokenizer, improc, seed)
                    else:
                        raise ValueError(f"synth kind {kind!r}: text | needle")
                    writer.add(s)
                    if progress:
                        progress(s)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
