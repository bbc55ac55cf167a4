"""Which pages make one sample, at exactly its target length: the `document` and `haystack` sample modes.

document (default): the QA's own document, its pages in order. Longer than the target: a window of its pages that
holds the evidence at a random depth. Shorter: joined with the next documents of the manifest, each under its own
header. haystack: the evidence pages at random depths among pages of other documents. In both, one page is cut
(to whole merged rows) so the sample ends within one page-row (tokens of one row of 28-px patches) of the target;
a sample that cannot is dropped with a reason. Every page is labelled `Page N:` — its page number in its own
document (document mode) or its position in the sample (haystack).
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, replace

from megatron_mmpl.data.chat_template import render
from megatron_mmpl.data.images import ImageProcessor
from megatron_mmpl.data.length import VISION_MARKERS
from megatron_mmpl.data.manifest import Document

MODES = ("document", "haystack")
MAX_MISSES = 32  # haystack: stop drawing distractors after this many in a row that do not fit


@dataclass(frozen=True)
class Slot:
    """One page of a sample: page `page` of catalogue doc `doc`, whole or cut to `rows` merged rows."""

    doc: int
    page: int
    evidence: bool = False
    crop: str | None = None  # "top" | "bottom": which part of the page is kept
    rows: int = 0
    header: bool = False  # document mode: this page starts a document (its header goes before it)


class Dropped(Exception):
    """A sample that cannot be made at its target; str() is the reason (counted by the build)."""


class Composer:
    """Lays out samples over a catalogue of documents for one tokenizer, image processor and mode."""

    def __init__(self, docs: list[Document], tokenizer, improc: ImageProcessor, mode: str = "document"):
        if mode not in MODES:
            raise ValueError(f"--mode {mode!r}: choose {' or '.join(MODES)}")
        self.docs, self.tok, self.improc, self.mode = docs, tokenizer, improc, mode
        self._text_cost: dict[str, int] = {}
        self.offsets = list(itertools.accumulate((len(doc) for doc in docs), initial=0))  # first page of each doc

    # ---- geometry and costs
    def grid(self, slot: Slot) -> tuple[int, int, int]:
        """(tokens per merged row, rows of the whole page, processed width px) of the slot's page."""
        w, h = self.docs[slot.doc].sizes[slot.page]
        rh, rw = self.improc.resized_size(h, w)
        f = self.improc.cfg.factor
        return rw // f, rh // f, rw

    def image_tokens(self, slot: Slot) -> int:
        per_row, rows, _ = self.grid(slot)
        return per_row * (slot.rows if slot.crop else rows)

    def row_tokens(self, slots: list[Slot]) -> int:
        """Tokens of one merged row of the cut page (the last page when none is cut): the length tolerance."""
        cut = [s for s in slots if s.crop] or slots[-1:]
        return min(self.grid(s)[0] for s in cut) if cut else 0

    def text_cost(self, text: str) -> int:
        n = self._text_cost.get(text)
        if n is None:
            n = self._text_cost[text] = len(self.tok._tokenizer.encode(text, add_special_tokens=False).ids)
        return n

    def est_cost(self, slot: Slot, label: int) -> int:
        """Estimated tokens a whole page adds (pads, markers, label, header); the exact count comes at the end."""
        c = self.image_tokens(slot) + VISION_MARKERS + self.text_cost(f"Page {label}: \n")
        return c + (self.text_cost(self.header(slot.doc)) if slot.header else 0)

    def header(self, doc: int) -> str:
        return f"Document: {self.docs[doc].title}\n"

    def label(self, slots: list[Slot], i: int) -> int:
        s = slots[i]
        return self.docs[s.doc].page_numbers[s.page] if self.mode == "document" else i + 1

    # ---- messages and exact length
    def messages(self, slots: list[Slot], question: str, answer: str) -> list[dict]:
        """The conversation: [header] `Page N: ` <page> per slot, then the question; the answer as assistant."""
        content: list[dict] = []
        for i, s in enumerate(slots):
            if s.header:
                content.append({"type": "text", "text": self.header(s.doc)})
            content += [{"type": "text", "text": f"Page {self.label(slots, i)}: "}, {"type": "image"},
                        {"type": "text", "text": "\n"}]
        q = question.replace("{page}", str(self.first_evidence_label(slots)))
        content.append({"type": "text", "text": q})
        return [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text",
                                                                                         "text": answer}]}]

    def first_evidence_label(self, slots: list[Slot]) -> int:
        return next((self.label(slots, i) for i, s in enumerate(slots) if s.evidence), 0)

    def exact(self, slots: list[Slot], question: str, answer: str, zero: int | None = None) -> int:
        """Exact token length; slot `zero` counted with no image pads (markers and label still in)."""
        toks = [0 if i == zero else self.image_tokens(s) for i, s in enumerate(slots)]
        ids, _ = render(self.messages(slots, question, answer), toks, self.tok)
        return len(ids)

    # ---- the two modes
    def compose(self, d: int, qa: dict, target: int, rng: random.Random) -> list[Slot]:
        """The slots of the sample for QA `qa` of doc `d` at `target` tokens; raises Dropped."""
        q, a = qa["question"], qa["answer"]
        ev = qa["evidence_pages"]
        if self.mode == "document":
            base = self.exact([], q, a) + self.text_cost(self.header(d))
            slots, nexts = self._document_pages(d, ev, target - base, rng)
        else:
            slots, nexts = self._haystack_pages(d, ev, target - self.exact([], q, a), rng)
        while self.exact(slots, q, a) > target:  # the estimates were a few tokens short: give back a page
            slots, nexts = self._give_back(slots, nexts)
        return self._finish(slots, nexts, q, a, target, rng)

    def _give_back(self, slots: list[Slot], nexts):
        """Drop one whole non-evidence page at an end (document) or anywhere (haystack); it becomes a cut page."""
        if self.mode == "haystack" or not slots[-1].evidence:
            cut = next((i for i in range(len(slots) - 1, -1, -1) if not slots[i].evidence), None)
            if cut is not None:
                return slots[:cut] + slots[cut + 1:], [("after", slots[cut])] + nexts
        elif not slots[0].evidence:
            rest = [replace(slots[1], header=slots[0].header)] + slots[2:]
            return rest, [("before", replace(slots[0], header=False))] + nexts
        raise Dropped("evidence pages and QA longer than the target")

    def _document_pages(self, d: int, ev: list[int], budget: int, rng: random.Random):
        doc = self.docs[d]
        sl = [Slot(d, i, evidence=i in ev) for i in range(len(doc))]
        cost = [self.est_cost(s, doc.page_numbers[s.page]) for s in sl]  # the doc's own header is in the base
        if sum(cost) <= budget:  # the whole document, then the next documents of the manifest
            room, slots = budget - sum(cost), [replace(sl[0], header=True)] + sl[1:]
            nxt = None
            for j in [(d + k) % len(self.docs) for k in range(1, len(self.docs))]:
                for i in range(len(self.docs[j])):
                    s = Slot(j, i, header=i == 0)
                    c = self.est_cost(s, self.docs[j].page_numbers[i])
                    if c > room:
                        nxt = s
                        break
                    slots.append(s)
                    room -= c
                if nxt is not None:
                    break
            nexts = [("after", nxt)] if nxt is not None else []
            return slots, nexts
        e0, e1 = ev[0], ev[-1]
        span = sum(cost[e0:e1 + 1])
        if span > budget:
            raise Dropped("evidence pages and QA longer than the target")
        rest = budget - span
        before = rng.random() * rest  # the evidence lands at a random depth of the window
        a, b = e0, e1 + 1
        while a > 0 and cost[a - 1] <= before:
            before -= cost[a - 1]
            rest -= cost[a - 1]
            a -= 1
        while b < len(sl) and cost[b] <= rest:
            rest -= cost[b]
            b += 1
        while a > 0 and cost[a - 1] <= rest:  # reached the end: the rest goes before
            rest -= cost[a - 1]
            a -= 1
        nexts = [("after", sl[b])] if b < len(sl) else []
        nexts += [("before", sl[a - 1])] if a > 0 else []
        return [replace(sl[a], header=True)] + sl[a + 1:b], nexts

    def _haystack_pages(self, d: int, ev: list[int], budget: int, rng: random.Random):
        evid = [Slot(d, e, evidence=True) for e in ev]
        room = budget - sum(self.est_cost(s, 99) for s in evid)
        if room < 0:
            raise Dropped("evidence pages and QA longer than the target")
        offsets = self.offsets
        others = offsets[-1] - len(self.docs[d])
        if others == 0:
            raise Dropped("haystack needs pages of other documents; the manifest has one document")
        chosen, misses, spare, used = [], 0, [], set()
        for _ in range(20 * MAX_MISSES + 4 * others):
            g = rng.randrange(offsets[-1])
            j = bisect.bisect_right(offsets, g) - 1
            if j == d or g in used:
                continue
            used.add(g)
            s = Slot(j, g - offsets[j])
            c = self.est_cost(s, 99)
            if c <= room:
                chosen.append(s)
                room -= c
                misses = 0
            else:
                spare.append(s)
                misses += 1
                if misses > MAX_MISSES:
                    break
        n = len(chosen) + len(evid)
        at = sorted(rng.sample(range(n), len(evid)))
        it_c, it_e = iter(chosen), iter(evid)
        slots = [next(it_e) if i in at else next(it_c) for i in range(n)]
        return slots, [("after", s) for s in spare[:4]]

    def _finish(self, slots: list[Slot], nexts, q: str, a: str, target: int, rng: random.Random) -> list[Slot]:
        """Cut one page to the rows that bring the sample to within one page-row of `target`."""
        if slots and target - self.exact(slots, q, a) < self.row_tokens(slots):
            return slots
        for swap in (False, True, "trim"):
            for where, s in nexts:
                cand = self._candidate(slots, where, s, swap, rng)
                if cand is None:
                    continue
                cand, i = cand
                per_row, full_rows, rw = self.grid(cand[i])
                per_row = min(per_row, self.row_tokens(cand) if any(x.crop for x in cand) else per_row)
                rows = min(full_rows, (target - self.exact(cand, q, a, zero=i)) // per_row)
                if rows < 1 or rows * self.improc.cfg.factor * rw < self.improc.cfg.min_pixels:
                    continue
                out = cand[:i] + [replace(cand[i], rows=rows)] + cand[i + 1:]
                n = self.exact(out, q, a)
                if n <= target and target - n < per_row:
                    return out
        raise Dropped("cannot fill to within one page-row of the target (too few pages to draw from)")

    def _candidate(self, slots: list[Slot], where: str, s: Slot, swap: bool, rng: random.Random):
        """(slots with page `s` added to be cut, its index), or None. Added after (top kept) or before the window
        (bottom kept); with `swap` a whole page makes room: the window's far end, a joined document's last page
        (document mode) or any distractor (haystack); with "trim" the last whole page loses one row."""
        slots = list(slots)
        if swap == "trim":  # the page-row gap: a whole page loses its last row, then `s` is cut after it
            i = next((k for k in range(len(slots) - 1, -1, -1) if not slots[k].evidence and not slots[k].crop), None)
            if where == "before" or i is None or (self.mode == "document" and i != len(slots) - 1):
                return None
            slots[i] = replace(slots[i], crop="top", rows=self.grid(slots[i])[1] - 1)
            if slots[i].rows < 1:
                return None
        elif swap:
            if self.mode == "haystack":
                drop = [i for i, x in enumerate(slots) if not x.evidence]
                i = rng.choice(drop) if drop else None
            elif where == "before" or all(x.doc == slots[0].doc for x in slots):
                i = len(slots) - 1 if where == "before" else 0  # shift the window by one page
            else:
                i = len(slots) - 1 if slots[-1].doc != slots[0].doc else None  # a joined document ends earlier
            if i is None or not slots or slots[i].evidence or (i == 0 and len(slots) == 1):
                return None
            if i == 0:
                slots = [replace(slots[1], header=slots[0].header)] + slots[2:]
            else:
                del slots[i]
        if where == "before":
            return [replace(s, crop="bottom", header=slots[0].header), replace(slots[0], header=False)] + slots[1:], 0
        i = rng.randrange(len(slots) + 1) if self.mode == "haystack" else len(slots)
        return slots[:i] + [replace(s, crop="top")] + slots[i:], i
