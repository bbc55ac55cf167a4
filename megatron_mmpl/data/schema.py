"""One long-document sample: ordered page images + a conversation, a task tag, evidence pages and build metadata.

On disk (WebDataset): `<key>.json` holds everything but the pixels; `<key>.<iiii>.<ext>` is page i (png/jpg/webp).
The i-th image part of the conversation is page i.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

TASKS = ("extract_single", "extract_multi", "reason", "ocr_transcribe")
TASK_FAMILIES = {
    "extraction": ("extract_single", "extract_multi"),
    "reasoning": ("reason",),
    "ocr": ("ocr_transcribe",),
}
PAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def task_family(task: str) -> str:
    for fam, tasks in TASK_FAMILIES.items():
        if task in tasks:
            return fam
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


@dataclass
class Sample:
    key: str
    pages: list[bytes]
    """Encoded page images (PNG/JPEG/WebP bytes), in document order."""
    messages: list[dict]
    """Chat messages; image parts ({"type": "image"}) refer to pages in order."""
    task: str
    evidence_pages: list[int] = field(default_factory=list)
    """Indices (into `pages`) of the pages that hold the answer."""
    n_tokens: int = 0
    """Exact token length of the rendered conversation (text + image tokens), computed at build time."""
    page_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each stored page."""
    page_exts: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    """Build metadata: source documents, target length, evidence depths, generator, seed, ..."""

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"sample {self.key}: task {self.task!r} is not one of {TASKS}")
        n_img = sum(1 for m in self.messages if not isinstance(m["content"], str)
                    for p in m["content"] if p.get("type") == "image")
        if n_img != len(self.pages):
            raise ValueError(f"sample {self.key}: {len(self.pages)} pages but {n_img} image parts in the messages")
        bad = [i for i in self.evidence_pages if not 0 <= i < len(self.pages)]
        if bad:
            raise ValueError(f"sample {self.key}: evidence pages {bad} outside 0..{len(self.pages) - 1}")
        if "." in self.key or "/" in self.key:
            raise ValueError(f"sample key {self.key!r} must not contain '.' or '/' (WebDataset splits keys on them)")

    def header(self) -> dict:
        return dict(messages=self.messages, task=self.task, evidence_pages=self.evidence_pages,
                    n_tokens=self.n_tokens, page_sizes=[list(s) for s in self.page_sizes],
                    page_exts=self.page_exts, meta=self.meta)

    def to_members(self) -> list[tuple[str, bytes]]:
        """(member name, bytes) in the order they go into the tar."""
        self.validate()
        exts = self.page_exts or ["png"] * len(self.pages)
        members = [(f"{self.key}.json", json.dumps(self.header(), ensure_ascii=False).encode())]
        members += [(f"{self.key}.{i:04d}.{ext}", b) for i, (b, ext) in enumerate(zip(self.pages, exts))]
        return members

    @classmethod
    def from_members(cls, key: str, members: dict[str, bytes]) -> Sample:
        """Inverse of to_members; `members` maps the suffix after `<key>.` to bytes."""
        if "json" not in members:
            raise ValueError(f"sample {key}: no {key}.json member")
        h = json.loads(members["json"])
        pages = []
        for i, ext in enumerate(h["page_exts"]):
            name = f"{i:04d}.{ext}"
            if name not in members:
                raise ValueError(f"sample {key}: page member {key}.{name} missing")
            pages.append(members[name])
        return cls(key=key, pages=pages, messages=h["messages"], task=h["task"], evidence_pages=h["evidence_pages"],
                   n_tokens=h["n_tokens"], page_sizes=[tuple(s) for s in h["page_sizes"]],
                   page_exts=h["page_exts"], meta=h.get("meta", {}))


def document_messages(n_pages: int, question: str, answer: str | None) -> list[dict]:
    """The long-document prompt: all pages, then the question; the answer as the assistant turn."""
    content = [{"type": "image"} for _ in range(n_pages)] + [{"type": "text", "text": question}]
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs
