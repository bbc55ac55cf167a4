"""Test inputs for evaluation, made here (nothing downloaded): a tiny exported HF checkpoint with the tiny
tokenizer, an MMLongBench-Doc layout (samples.json over PDFs) and an MMLongBench documentQA JSONL over page images."""

import json
from pathlib import Path

from PIL import Image, ImageDraw

# The quickstart model's token ids (examples/recipes/quickstart.yaml): the tiny tokenizer's added tokens.
TOKENS = dict(image_token_id=492, video_token_id=493, vision_start_token_id=489, vision_end_token_id=490)


def write_tiny_export(out: Path, seed: int = 0, text_config: dict | None = None) -> Path:
    """A random tiny Qwen2.5-VL (vocab 512) saved like `mmpl convert mcore-to-hf` saves one."""
    from megatron_mmpl.config.hf_config import apply_overrides
    from megatron_mmpl.data.processor_files import write_processor_files
    from megatron_mmpl.models.qwen25vl.presets import preset_dict
    from megatron_mmpl.models.qwen25vl.testing import tiny_hf_model

    tc = text_config or apply_overrides(preset_dict("tiny"), {"vocab_size": 512})["text_config"]
    model = tiny_hf_model("tiny", seed=seed, attn_implementation="sdpa", text_config=tc, **TOKENS)
    model.save_pretrained(out)
    write_processor_files(Path(out), model.config, "tiny")
    return Path(out)


def _page(text: str, size=(112, 140)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((6, 6), text, fill="black")
    return img


# (doc, question, answer, answer_format, evidence_pages) as MMLongBench-Doc writes them (lists as strings)
DOC_QUESTIONS = [
    ("report.pdf", "Which group is larger?", "Latinos interviewed by cellphone", "Str", "[2]"),
    ("report.pdf", "How many references are from the center?", "8", "Int", "[1, 3]"),
    ("report.pdf", "Which group dropped most, and by how much?", "['White', '10%']", "List", "[2]"),
    ("slides.pdf", "What was the share in 2024?", "Not answerable", "None", "[]"),
    ("slides.pdf", "What share of time went to family?", "21%", "Float", "[1]"),
]


def write_mmlongbench_doc(root: Path) -> Path:
    """root/samples.json + root/documents/{report,slides}.pdf (3 and 2 pages, 112x140 pt)."""
    docs = root / "documents"
    docs.mkdir(parents=True)
    for name, n in (("report.pdf", 3), ("slides.pdf", 2)):
        pages = [_page(f"{name} page {i + 1}") for i in range(n)]
        pages[0].save(docs / name, save_all=True, append_images=pages[1:], resolution=72.0)  # 1 px = 1 pt
    entries = [dict(doc_id=d, doc_type="Research report", question=q, answer=a, answer_format=f,
                    evidence_pages=e, evidence_sources="['Chart']") for d, q, a, f, e in DOC_QUESTIONS]
    (root / "samples.json").write_text(json.dumps(entries, indent=2))
    return root / "samples.json"


def write_mmlongbench_jsonl(root: Path) -> Path:
    """root/documentQA/mmlongdoc_K8.jsonl whose page_list paths are relative to root (MMLongBench's image root)."""
    lines = []
    for q, (question, answer, fmt, n_pages) in enumerate([("What is the title?", "Annual report", "String", 2),
                                                          ("How many charts?", "3", "Integer", 3),
                                                          ("Which shapes?", '["Circle", "Rectangle"]', "List", 2)]):
        paths = []
        for i in range(n_pages):
            p = Path("mmlongdoc") / f"doc{q}" / f"page{i}.png"
            (root / p).parent.mkdir(parents=True, exist_ok=True)
            _page(f"doc {q} page {i}", (140, 112)).save(root / p)
            paths.append(str(p))
        lines.append(json.dumps(dict(id=f"q{q}", doc_name=f"doc{q}.pdf", page_list=paths, question=question,
                                     answer=answer, answer_format=fmt)))
    out = root / "documentQA" / "mmlongdoc_K8.jsonl"
    out.parent.mkdir(parents=True)
    out.write_text("\n".join(lines) + "\n")
    return out
