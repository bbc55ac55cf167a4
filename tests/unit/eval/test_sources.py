"""Evaluation inputs: MMLongBench-Doc (samples.json over PDFs), MMLongBench documentQA JSONL and our shards become
questions with the right formats, families and pages; documents over --max-len are shrunk page by page to fit
exactly, or refused when they cannot fit."""

import pytest

from tests.unit.eval.fixtures import DOC_QUESTIONS, write_mmlongbench_doc, write_mmlongbench_jsonl

pytestmark = pytest.mark.unit


def test_mmlongbench_doc_layout(tmp_path):
    pytest.importorskip("pypdfium2")
    from megatron_mmpl.eval.sources import detect_format, load_items

    samples = write_mmlongbench_doc(tmp_path / "data")
    assert detect_format(str(samples)) == detect_format(str(samples.parent)) == "mmlongbench-doc"
    items = load_items(str(samples))
    assert [it.answer_format for it in items] == ["Str", "Int", "List", "None", "Float"]
    assert [it.family for it in items] == ["single-page", "cross-page", "single-page", "unanswerable", "single-page"]
    assert [it.answer for it in items] == [q[2] for q in DOC_QUESTIONS]
    assert items[1].meta["evidence_pages"] == [1, 3] and items[0].meta["evidence_sources"] == ["Chart"]
    pages = items[0].load_pages()
    assert len(pages) == 3 and [p.size for p in pages] == items[0].page_sizes == [(224, 280)] * 3  # 144 dpi
    n_images = sum(1 for part in items[0].messages[0]["content"] if part.get("type") == "image")
    assert n_images == 3 and "Which group is larger?" in items[0].messages[0]["content"][-1]["text"]
    (samples.parent / "documents" / "slides.pdf").unlink()
    with pytest.raises(FileNotFoundError, match="slides.pdf not found .*--documents"):
        load_items(str(samples))


def test_mmlongbench_jsonl(tmp_path):
    from megatron_mmpl.eval.sources import load_items

    jsonl = write_mmlongbench_jsonl(tmp_path)
    items = load_items(str(jsonl), image_root=str(tmp_path))
    assert [it.key for it in items] == ["q0", "q1", "q2"]
    assert [it.answer_format for it in items] == ["Str", "Int", "List"]
    assert {it.family for it in items} == {"mmlongdoc"} and items[0].meta["nominal_tokens"] == 8 * 1024
    assert [len(it.load_pages()) for it in items] == [2, 3, 2] and items[1].page_sizes == [(140, 112)] * 3
    with pytest.raises(FileNotFoundError, match="--image-root"):
        load_items(str(jsonl))  # page_list paths are relative to the image root, not the file's folder
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: lacks \['page_list', 'answer_format'\]"):
        load_items(str(bad))


def test_shards_and_fitting_to_max_len(tmp_path):
    from megatron_mmpl.data.images import ImageProcessor
    from megatron_mmpl.data.synth import write_synth
    from megatron_mmpl.data.tokenizer import build_tiny_tokenizer
    from megatron_mmpl.eval.prompts import build_prompt, prompt_length
    from megatron_mmpl.eval.sources import load_items

    tok, improc = build_tiny_tokenizer(), ImageProcessor()
    write_synth(tmp_path / "s", targets=[1500], per_target=1, tokenizer=tok, tokenizer_name="tiny", improc=improc,
                tasks=("extract_single", "extract_multi", "reason"), bucket_edges=[2048])
    items = {it.meta["task"]: it for it in load_items(str(tmp_path / "s"))}
    assert {k: (v.family, v.answer_format) for k, v in items.items() if k != "reason"} == {
        "extract_single": ("extraction", "Int"), "extract_multi": ("extraction", "List")}
    it = items["extract_single"]
    full = build_prompt(it, tok, improc)
    assert full.page_tokens_cap is None and len(full.input_ids) == prompt_length(it, it.page_sizes, tok, improc)
    budget = len(full.input_ids) // 2
    half = build_prompt(it, tok, improc, max_len=budget)
    assert half.page_tokens_cap is not None and len(half.input_ids) <= budget
    # the cap is the largest that fits: one more token per page would not
    from dataclasses import replace

    def capped(tokens):
        return ImageProcessor(replace(improc.cfg, max_pixels=tokens * improc.cfg.factor**2))

    assert len(half.input_ids) == prompt_length(it, it.page_sizes, tok, capped(half.page_tokens_cap))
    assert prompt_length(it, it.page_sizes, tok, capped(half.page_tokens_cap + 1)) > budget
    assert build_prompt(it, tok, improc, max_len=40) is None  # not even minimum-size pages fit
