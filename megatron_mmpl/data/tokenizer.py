"""Tokenizers: Qwen2's byte-level BPE built offline from tiktoken ranks, a tiny one for tests, or a checkpoint's own.

All three are transformers `Qwen2Tokenizer` objects (same pre-tokeniser, same special-token structure), so the
rest of the pipeline has one code path. `load_tokenizer("qwen2" | "tiny" | "tiny:<first_special_id>" | <hf dir>)`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_mmpl.storage.atomic import atomic_directory

# Qwen2.5(-VL) added tokens in id order, starting right after the 151,643 BPE ranks (<|endoftext|> = 151643).
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN_SPECIAL_COUNT = 14  # the first 14 are special (skipped by decode); tool-call/FIM markers are plain added tokens
QWEN_FIRST_ADDED_ID = 151643

# Words that are single tokens in the tiny tokenizer (answers of the visual needle and common prompt words).
TINY_WORDS = (
    "red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "black", "white", "gray", "brown",
    "circle", "square", "triangle", "cross", "diamond", "star", "ring", "bar",
    "system", "user", "assistant", "You", "are", "a", "helpful", "Which", "What", "page", "is", "the", "marked",
    "colour", "color", "shape", "of", "Answer", "with", "one", "word", "Page", "code", "value", "How", "many",
    "yes", "no", "Transcribe", "text", "on",
)
# tiny vocab: 256 bytes + ~200 merges < 480; added tokens at 480..501 (fits a 512-row embedding)
TINY_FIRST_ADDED_ID = 480


@dataclass(frozen=True)
class SpecialIds:
    """Ids the chat template, the loss mask and the rope index need."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    vision_pad: int
    image_pad: int
    video_pad: int

    def to_dict(self) -> dict:
        return asdict(self)


def special_ids(tok) -> SpecialIds:
    names = dict(endoftext="<|endoftext|>", im_start="<|im_start|>", im_end="<|im_end|>",
                 vision_start="<|vision_start|>", vision_end="<|vision_end|>", vision_pad="<|vision_pad|>",
                 image_pad="<|image_pad|>", video_pad="<|video_pad|>")
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
    missing = [names[k] for k, v in ids.items() if v is None or v == tok.unk_token_id and k != "endoftext"]
    if missing:
        raise ValueError(f"tokenizer {type(tok).__name__} lacks Qwen2.5-VL tokens {missing}; "
                         "use a Qwen2.5-VL tokenizer")
    return SpecialIds(**ids)


def _bl(token: bytes) -> str:
    """Bytes as GPT-2's byte-level alphabet (transformers' table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    enc = bytes_to_unicode()
    return "".join(enc[b] for b in token)


def qwen_tiktoken_path() -> Path:
    """qwen.tiktoken (Qwen's BPE ranks) as shipped inside the `dashscope` package (read as a file, not imported)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Qwen's BPE ranks come from the `dashscope` package (resources/qwen.tiktoken): pip install dashscope, "
            "or pass a Qwen2.5-VL checkpoint directory as the tokenizer"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the installed dashscope; reinstall dashscope")
    return path


def _hf_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], first_added_id: int):
    """A transformers Qwen2Tokenizer with Qwen's added tokens at first_added_id, first_added_id+1, ..."""
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = dict(vocab)
    clash = [v for v in vocab.values() if v >= first_added_id]
    if clash:
        raise ValueError(f"first added-token id {first_added_id} <= largest vocab id {max(clash)}; raise it")
    for i, t in enumerate(QWEN_ADDED_TOKENS):
        vocab[t] = first_added_id + i
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_tokens([AddedToken(t, special=i < QWEN_SPECIAL_COUNT, normalized=False)
                    for i, t in enumerate(QWEN_ADDED_TOKENS)])
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_ADDED_TOKENS[1:QWEN_SPECIAL_COUNT])})
    got = [tok.convert_tokens_to_ids(t) for t in QWEN_ADDED_TOKENS]
    want = [first_added_id + i for i in range(len(QWEN_ADDED_TOKENS))]
    if got != want:
        raise RuntimeError(f"added-token ids {got} != {want}: tokenizers placed them elsewhere")
    tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
    return tok


def build_qwen2_tokenizer(tiktoken_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
    """Qwen2/Qwen2.5-VL's tokenizer (151,643 BPE ranks + added tokens at their real ids), offline.

    The converted tokenizer is cached under `cache_dir` (default ~/.cache/megatron_mmpl) keyed by the ranks file hash.
    """
    from transformers import AutoTokenizer

    path = Path(tiktoken_path) if tiktoken_path else qwen_tiktoken_path()
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("MMPL_CACHE", Path.home() / ".cache" / "megatron_mmpl"))
    out = cache / f"qwen2-tokenizer-{digest}-tt"  # -tt: converted by transformers' TikTokenConverter
    if (out / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(out)
        tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
        return tok
    # transformers' tiktoken converter: ranks → byte-level BPE vocab + merges (ids equal tiktoken's own encoding:
    # tests/unit/data/test_chat_template.py)
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(str(path))
    if len(vocab) != QWEN_FIRST_ADDED_ID:
        raise ValueError(f"{path}: {len(vocab)} ranks, expected {QWEN_FIRST_ADDED_ID} (Qwen2's BPE)")
    tok = _hf_tokenizer(vocab, merges, QWEN_FIRST_ADDED_ID)
    with atomic_directory(out, keep_existing=True) as tmp:  # another process may build the same cache: theirs wins
        tok.save_pretrained(tmp)
    return tok


def _train_tiny_merges(words) -> list[tuple[str, str]]:
    """Deterministic BPE training over `words` (each also with a leading space) until each is one token."""
    seqs = [list(_bl(w.encode())) for w in words] + [list(_bl((" " + w).encode())) for w in words]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == pair:
                    s[i : i + 2] = [s[i] + s[i + 1]]
                i += 1


def build_tiny_tokenizer(first_added_id: int = TINY_FIRST_ADDED_ID, words=TINY_WORDS):
    """Byte-level BPE with 256 byte tokens + merges making `words` single tokens; Qwen's added tokens (same names,
    same order) start at `first_added_id` so a tiny model's vocab (e.g. 512) covers them."""
    merges = _train_tiny_merges(words)
    vocab = {_bl(bytes([b])): b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return _hf_tokenizer(vocab, merges, first_added_id)


def load_tokenizer(spec: str):
    """"qwen2" (offline Qwen2.5-VL tokenizer), "tiny" / "tiny:<first_added_id>", or a checkpoint directory."""
    if spec == "qwen2":
        return build_qwen2_tokenizer()
    if spec == "tiny" or spec.startswith("tiny:"):
        return build_tiny_tokenizer(int(spec.split(":")[1])) if ":" in spec else build_tiny_tokenizer()
    if Path(spec).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec)
    raise ValueError(f"tokenizer {spec!r}: use 'qwen2', 'tiny', 'tiny:<first_added_id>' or a checkpoint directory")


def tokenizer_fingerprint(tok) -> str:
    """Short id of what matters for token counts: vocab size, added-token ids and a probe encoding."""
    probe = tok.encode("Page 12: the Quick brown fox, 3.14 — naïve café\n\n  x", add_special_tokens=False)
    payload = json.dumps([len(tok), special_ids(tok).to_dict(), probe])
    return hashlib.sha1(payload.encode()).hexdigest()[:12]
