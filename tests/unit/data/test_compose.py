"""Sample layout: document mode keeps the document's own pages in order, haystack hides the evidence among other
documents' pages; every sample lands within one page-row of its target or is dropped with a reason."""

import random

import pytest

from megatron_mmpl.data.compose import Composer, Dropped
from megatron_mmpl.data.images import ImageProcessor
from megatron_mmpl.data.manifest import Document
from megatron_mmpl.data.tokenizer import build_tiny_tokenizer

pytestmark = pytest.mark.unit

QA = dict(question="What is the limit?", answer="7.5 bar", task="extract_single")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _docs(rng, n_docs=5):
    """Documents of 3-30 pages of mixed sizes (letter-ish, landscape, narrow); doc 0 is a page range 11..."""
    docs = []
    for d in range(n_docs):
        n = rng.randint(3, 30)
        sizes = [rng.choice([(400, 520), (520, 400), (300, 560), (448, 448)]) for _ in range(n)]
        first = 11 if d == 0 else 1
        docs.append(Document(f"doc{d}", f"Title {d}", sizes, list(range(first, first + n))))
    return docs


def _check_exact(c, slots, qa, target):
    n = c.exact(slots, qa["question"], qa["answer"])
    per_row = c.row_tokens(slots)
    cut = [i for i, s in enumerate(slots) if s.crop]
    if len(cut) == 2:  # the page-row gap: one whole page lost its last row, and another page is cut
        assert any(slots[i].rows == c.grid(slots[i])[1] - 1 for i in cut)
        assert c.mode == "haystack" or (cut[1] == cut[0] + 1 and slots[cut[1]].crop == "top")
    assert len(cut) <= 2 and not any(slots[i].evidence for i in cut)
    assert n <= target and target - n < per_row, (n, target, per_row)
    return len(cut)


def test_document_mode_own_pages_in_order_within_one_row(tok):
    improc = ImageProcessor()
    rng = random.Random(0)
    depths, checked, trims = [], 0, 0
    for trial in range(40):
        docs = _docs(rng)
        c = Composer(docs, tok, improc, "document")
        d = rng.randrange(len(docs))
        ev = sorted(rng.sample(range(len(docs[d])), rng.randint(1, 2)))
        qa = dict(QA, evidence_pages=ev)
        for target in (600, 2000, 6000, 20000):
            try:
                slots = c.compose(d, qa, target, random.Random(f"{trial}:{target}"))
            except Dropped as e:
                assert "longer than the target" in str(e) or "one page-row" in str(e)
                continue
            trims += _check_exact(c, slots, qa, target) == 2
            checked += 1
            own = [s for s in slots if s.doc == d]
            assert slots[0].doc == d and slots[0].header, "the sample opens with the QA's own document"
            pages = [s.page for s in own]
            assert pages == list(range(pages[0], pages[0] + len(pages))), "own pages contiguous and in order"
            assert [s.page for s in slots if s.evidence] == ev and all(s.doc == d for s in slots if s.evidence)
            labels = [c.label(slots, i) for i in range(len(slots))]
            assert [labels[i] for i, s in enumerate(slots) if s.doc == d] == [docs[d].page_numbers[p] for p in pages]
            if len(own) < len(docs[d]):  # a window: no other document is joined, one end may be cut
                assert len(own) == len(slots)
                cut = [i for i, s in enumerate(slots) if s.crop]
                assert cut in ([], [0], [len(slots) - 1], [len(slots) - 2, len(slots) - 1]), cut
                depths.append(round(ev[0] / max(1, len(docs[d]) - 1) - pages[0] / len(docs[d]), 2))
            else:  # the whole document, then the next ones in manifest order, each starting with its header
                others = [s for s in slots if s.doc != d]
                order = [(d + k) % len(docs) for k in range(1, len(docs))]
                assert [s.doc for s in others] == sorted([s.doc for s in others], key=order.index)
                assert all(s.header == (s.page == 0) for s in others)
            msgs = c.messages(slots, qa["question"], qa["answer"])
            text = "".join(p.get("text", "") for p in msgs[0]["content"])
            assert text.startswith(f"Document: Title {d}\n") and f"Page {labels[0]}: " in text
    assert checked > 60 and trims, "the page-row gap case was exercised"
    assert len(set(depths)) > 5, "window start (evidence depth) varies with the seed"


def test_haystack_mode_evidence_among_other_documents(tok):
    improc = ImageProcessor()
    rng = random.Random(1)
    seen_slots = set()
    for trial in range(30):
        docs = _docs(rng, n_docs=6)
        c = Composer(docs, tok, improc, "haystack")
        d = rng.randrange(len(docs))
        ev = sorted(rng.sample(range(len(docs[d])), 2))
        qa = dict(QA, evidence_pages=ev)
        for target in (1500, 8000):
            slots = c.compose(d, qa, target, random.Random(f"{trial}:{target}"))
            _check_exact(c, slots, qa, target)
            assert [(s.doc, s.page) for s in slots if s.evidence] == [(d, e) for e in ev]
            assert all(s.doc != d for s in slots if not s.evidence), "distractors come from other documents"
            assert len({(s.doc, s.page) for s in slots}) == len(slots), "no page twice"
            assert [c.label(slots, i) for i in range(len(slots))] == list(range(1, len(slots) + 1))
            seen_slots.add(tuple(i for i, s in enumerate(slots) if s.evidence))
    assert len(seen_slots) > 10, "evidence depths vary"


def test_drops_name_the_reason(tok):
    improc = ImageProcessor()
    docs = [Document("a", "A", [(400, 520)] * 4, [1, 2, 3, 4]), Document("b", "B", [(400, 520)] * 3, [1, 2, 3])]
    c = Composer(docs, tok, improc, "document")
    qa = dict(QA, evidence_pages=[0, 3])
    with pytest.raises(Dropped, match="longer than the target"):
        c.compose(0, qa, 500, random.Random(0))  # the evidence span alone is ~1,100 tokens
    with pytest.raises(Dropped, match="one page-row"):
        c.compose(0, qa, 50_000, random.Random(0))  # 7 pages in all cannot reach 50K
    with pytest.raises(Dropped, match="other documents"):
        Composer(docs[:1], tok, improc, "haystack").compose(0, qa, 3000, random.Random(0))
    with pytest.raises(ValueError, match="--mode"):
        Composer(docs, tok, improc, "shuffle")
