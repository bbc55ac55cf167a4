"""Rule-based answer scores for long-document VQA, in the manner of MMLongBench-Doc — no judge model anywhere.

Per answer: a type-aware score (Int: the number; Float: within 1 % relative, also read as a percentage; Str: ANLS
with threshold 0.5, or equality for URLs/dates/file names/phones/emails/page refs; List: equal length, sorted,
the worst item's score; "Not answerable": the prediction says so) and a strict exact match of the cleaned
strings. Over a set: accuracy (mean score), exact match, and F1 with "Not answerable" as MMLongBench-Doc counts
it (recall over answerable questions; precision over the questions the model did answer).
"""

from __future__ import annotations

import ast
import math
import re

NOT_ANSWERABLE = "Not answerable"
ANLS_THRESHOLD = 0.5
FLOAT_REL_TOL = 0.01
# answer_format spellings: MMLongBench-Doc (samples.json) | MMLongBench (DocVQA JSONL) → one name
FORMATS = {"Str": "Str", "String": "Str", "Int": "Int", "Integer": "Int", "Float": "Float", "List": "List",
           "None": "None"}
_UNANSWERABLE = ("not answerable", "unanswerable", "cannot be answered", "can not be answered",
                 "not enough information")
_EXACT = (
    re.compile(r"https?://"), re.compile(r"\.(py|ipynb)$"), re.compile(r"^page"),
    re.compile(r"^\d+([-\s]\d+)?$"),  # phone-like digit groups
    re.compile(r"(a\.m\.|p\.m\.)"),
    re.compile(r"^\d{4}[-/\s]\d{1,2}([-/\s]\d{1,2})?$"),  # YYYY-MM(-DD)
    re.compile(r"^[\w.%+-]+@[\w.-]+\.[a-z]{2,}$"),  # email
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def answer_format(fmt: str) -> str:
    """The canonical format name (Str | Int | Float | List | None) of either benchmark's spelling."""
    if fmt not in FORMATS:
        raise ValueError(f"answer_format {fmt!r} is not one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def infer_format(answer, task: str | None = None) -> str:
    """The format of a reference answer that carries none (our shards): lists for extract_multi or list values."""
    if isinstance(answer, list) or task == "extract_multi":
        return "List"
    text = str(answer).strip()
    if is_unanswerable(text):
        return "None"
    if re.fullmatch(r"-?\d+", text):
        return "Int"
    if re.fullmatch(r"-?\d*\.\d+%?|-?\d+%", text):
        return "Float"
    return "Str"


def extract_answer(generated: str) -> str:
    """The answer part of a generation: after an "Answer:" prefix if there is one, its first non-empty line."""
    text = generated.strip()
    m = re.search(r"answer\s*:", text, flags=re.IGNORECASE)
    if m:
        text = text[m.end():].strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line.strip("*").strip()


def clean(s) -> str:
    """Lower case, no parenthesised asides, quotes, currency sign, trailing %/period, thousands commas."""
    s = str(s).lower().strip()
    s = re.sub(r"\s*\([^)]*\)", "", s).strip()
    s = s.strip("'\"`").strip()
    s = s.lstrip("$£€").rstrip(".").rstrip("%").strip()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    return " ".join(s.split())


def is_unanswerable(pred: str) -> bool:
    p = clean(pred)
    return any(phrase in p for phrase in _UNANSWERABLE)


def needs_exact(gt_clean: str) -> bool:
    """References scored by equality, not ANLS: URLs, file names, page refs, phone numbers, times, dates, emails."""
    return any(p.search(gt_clean) for p in _EXACT)


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(gt: str, pred: str, threshold: float = ANLS_THRESHOLD) -> float:
    """1 − normalised edit distance, 0 when that similarity is at or below `threshold`."""
    n = max(len(gt), len(pred))
    sim = 1.0 if n == 0 else 1.0 - levenshtein(gt, pred) / n
    return sim if sim > threshold else 0.0


def first_number(s: str) -> float | None:
    m = _NUMBER.search(clean(s).replace(",", ""))
    return float(m.group()) if m else None


def float_match(gt: float, pred: float | None, rel_tol: float = FLOAT_REL_TOL) -> bool:
    """pred within rel_tol of gt, or of gt read as a percentage the other way (gt/100, gt·100)."""
    if pred is None:
        return False
    return any(math.isclose(pred, g, rel_tol=rel_tol, abs_tol=1e-9) for g in (gt, gt / 100, gt * 100))


def as_list(value) -> list:
    """A list answer: a list, a Python/JSON list literal, or items separated by commas, semicolons or "and"."""
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
            if isinstance(parsed, (list, tuple)):
                return list(parsed)
        except (ValueError, SyntaxError):
            pass
        text = text.strip("[]")
    return [p.strip() for p in re.split(r",|;|\band\b|\n", text) if p.strip()]


def _item_score(gt, pred) -> float:
    g, p = clean(gt), clean(pred)
    if re.fullmatch(r"-?\d+(\.\d+)?", g):
        return float(float_match(float(g), first_number(p)))
    if needs_exact(g):
        return float(g == p)
    return anls(g, p)


def score(gt, pred: str, fmt: str) -> float:
    """The type-aware score in [0, 1] of an extracted prediction against the reference (see the module doc)."""
    fmt = answer_format(fmt)
    if fmt == "None" or (isinstance(gt, str) and is_unanswerable(gt)):
        return float(is_unanswerable(pred))
    if fmt in ("Int", "Float"):
        ref = first_number(str(gt))
        if ref is None:
            raise ValueError(f"reference answer {gt!r} has answer_format {fmt} but no number; fix the data's format")
        if fmt == "Int":
            n = first_number(pred)
            return float(n is not None and n == ref)
        return float(float_match(ref, first_number(pred)))
    if fmt == "List":
        gts, preds = sorted(as_list(gt), key=clean), sorted(as_list(pred), key=clean)
        if len(gts) != len(preds):
            return 0.0
        return min(_item_score(g, p) for g, p in zip(gts, preds))
    return _item_score(gt, pred)


def exact_match(gt, pred: str, fmt: str) -> float:
    """Strict: the cleaned strings are equal (lists: as sorted cleaned lists; unanswerable: both say so)."""
    fmt = answer_format(fmt)
    if fmt == "None" or (isinstance(gt, str) and is_unanswerable(gt)):
        return float(is_unanswerable(pred))
    if fmt == "List":
        return float(sorted(map(clean, as_list(gt))) == sorted(map(clean, as_list(pred))))
    return float(clean(gt) == clean(pred))


def summarize(records: list[dict]) -> dict:
    """n, accuracy, exact_match and F1 of records with "score", "exact", "answerable" and "pred_answered"."""
    n = len(records)
    if n == 0:
        return {"n": 0, "accuracy": None, "exact_match": None, "f1": None}
    answerable = [r for r in records if r["answerable"]]
    answered = [r for r in records if r["pred_answered"]]
    hit = sum(r["score"] for r in answerable)
    recall = hit / len(answerable) if answerable else None
    precision = hit / len(answered) if answered else None
    if recall is None or precision is None:
        f1 = None
    else:
        f1 = 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
    return {"n": n, "accuracy": sum(r["score"] for r in records) / n,
            "exact_match": sum(r["exact"] for r in records) / n, "f1": f1}


def score_record(gt, generated: str, fmt: str) -> dict:
    """Everything scored for one answer: extracted prediction, score, exact match and the F1 flags."""
    pred = extract_answer(generated)
    fmt = answer_format(fmt)
    return {"pred": pred, "score": score(gt, pred, fmt), "exact": exact_match(gt, pred, fmt),
            "answerable": not (fmt == "None" or (isinstance(gt, str) and is_unanswerable(gt))),
            "pred_answered": not is_unanswerable(pred)}
