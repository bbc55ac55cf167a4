"""The needle grid: lengths/depths parsed as the CLI writes them, documents built with the needle at each depth
(visual and text), read back from shards into cells, scored by generation, and the heat-map PNG written."""

import pytest

from tests.unit.eval.fixtures import write_tiny_export

pytestmark = pytest.mark.unit


def test_parse_grid_specs():
    from megatron_mmpl.eval.needle import parse_depths, parse_lengths

    assert parse_lengths("32k,64k,128k,256k,512k") == [32768, 65536, 131072, 262144, 524288]
    assert parse_lengths("300, 1K") == [300, 1024]
    assert parse_depths("0,0.1,...,1.0") == [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_depths("0,0.25,1") == [0, 0.25, 1]
    for bad in ("0,...,1", "0,0.3,...,1", "0,1.5"):
        with pytest.raises(ValueError, match="--depths"):
            parse_depths(bad)
    with pytest.raises(ValueError, match="--lengths '32q'"):
        parse_lengths("32q")


def test_grid_documents_put_the_needle_at_each_depth():
    from megatron_mmpl.data.images import ImageProcessor
    from megatron_mmpl.data.tokenizer import build_tiny_tokenizer
    from megatron_mmpl.eval.needle import grid_items

    tok, improc = build_tiny_tokenizer(), ImageProcessor()
    items = grid_items("visual", [100, 200], [0, 0.5, 1], 2, tok, improc)
    assert len(items) == 2 * 3 * 2
    for it in items:
        n = len(it.page_sizes)
        assert it.meta["marked_page"] == round(it.meta["grid_depth"] * (n - 1))
        assert it.meta["target_tokens"] == it.meta["grid_length"] and it.answer in it.meta["choices"]
    text = grid_items("text", [600], [0, 1], 1, tok, improc)
    n = len(text[1].page_sizes)
    assert [it.meta["depths"] for it in text] == [[0.0], [1.0]] and text[0].meta["evidence_pages"] == [0]
    assert text[1].meta["evidence_pages"][0] >= n - 2  # the last text page (a cropped filler may follow)
    assert text[0].answer_format == "Int"


def test_summarize_grid_by_hand():
    from megatron_mmpl.eval.needle import summarize_grid

    recs = [dict(length=64, depth=0.0, correct=1.0, first_token_correct=1.0, tokens=60),
            dict(length=64, depth=0.0, correct=0.0, first_token_correct=1.0, tokens=62),
            dict(length=64, depth=1.0, correct=1.0, first_token_correct=0.0, tokens=61),
            dict(length=128, depth=1.0, correct=0.0, first_token_correct=0.0, tokens=120)]
    s = summarize_grid(recs, [64, 128], [0.0, 1.0])
    assert s["grid"]["accuracy"] == [[0.5, 1.0], [None, 0.0]] and s["grid"]["samples"] == [[2, 1], [0, 1]]
    assert s["accuracy"] == 0.5 and s["first_token_accuracy"] == 0.5
    assert s["by_length"]["64"] == {"accuracy": pytest.approx(2 / 3), "samples": 3, "mean_tokens": 61}


def test_needle_eval_on_a_grid_and_from_shards(tmp_path):
    from megatron_mmpl.data.synth import write_synth
    from megatron_mmpl.eval.generate import load_processing
    from megatron_mmpl.eval.needle import evaluate_needle
    from megatron_mmpl.eval.plots import heatmap

    model = write_tiny_export(tmp_path / "hf")
    r = evaluate_needle(str(model), lengths=[64, 128], depths=[0, 0.5, 1], per_cell=2, device="cpu",
                        progress=False, predictions=str(tmp_path / "p.jsonl"))
    assert r["samples"] == 12 and r["grid"]["samples"] == [[2, 2, 2], [2, 2, 2]]
    assert r["chance"] == pytest.approx(0.25) and 0 <= r["accuracy"] <= 1
    assert set(r["by_length"]) == {"64", "128"} and r["by_length"]["128"]["mean_tokens"] <= 128
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 12
    png = tmp_path / "needle_heatmap.png"
    assert heatmap(r["grid"], str(png), "tiny", trained_len=64) and png.stat().st_size > 5_000

    tok, improc = load_processing(str(model))
    write_synth(tmp_path / "shards", targets=[64, 128], per_target=6, tokenizer=tok, tokenizer_name="tiny",
                improc=improc, kind="needle", bucket_edges=[64, 128])
    s = evaluate_needle(str(model), shards=str(tmp_path / "shards"), depths=[0, 0.5, 1], device="cpu",
                        progress=False)
    assert s["samples"] == 12 and sum(map(sum, s["grid"]["samples"])) == 12 and s["grid"]["lengths"] == [64, 128]
    with pytest.raises(ValueError, match="exceed --max-len 100"):
        evaluate_needle(str(model), lengths=[64, 128], max_len=100, device="cpu")
