"""`mmpl data synth | build | inspect` end to end: shards by bucket + index.json, exact lengths, atomic output."""

import json

import pytest

from megatron_mmpl.cli import main
from tests.requires import require_module

pytestmark = pytest.mark.integration


def test_synth_build_inspect(tmp_path, capsys):
    needle = tmp_path / "needle"
    assert main(["data", "synth", "--kind", "needle", "--out", str(needle), "--targets", "300,600",
                 "--per-target", "3", "--bucket-edges", "512,1k"]) == 0
    assert "chance accuracy 0.250" in capsys.readouterr().out
    index = json.loads((needle / "index.json").read_text())
    assert index["samples"] == 6 and set(index["buckets"]) == {"512", "1k"}
    assert all((needle / s["path"]).exists() and (needle / s["index"]).exists() for s in index["shards"])
    assert not list(tmp_path.glob("*.partial")) and not list(needle.rglob("*.part"))

    text = tmp_path / "text"
    assert main(["data", "synth", "--out", str(text), "--targets", "2k", "--per-target", "1",
                 "--tokenizer", "tiny", "--bucket-edges", "1k,2k,4k", "--max-pixels", str(28 * 28 * 64)]) == 0
    index = json.loads((text / "index.json").read_text())
    assert set(index["tasks"]) == {"extract_single", "extract_multi", "reason", "ocr_transcribe"}
    assert index["buckets"]["2k"]["samples"] == 4 and index["image_processor"]["max_pixels"] == 28 * 28 * 64

    docs = tmp_path / "docs"
    assert main(["data", "synth", "--manifest", "--out", str(docs)]) == 0
    built = tmp_path / "built"
    argv = ["data", "build", "--manifest", str(docs / "manifest.jsonl"), "--out", str(built), "--targets", "1k",
            "--tokenizer", "tiny", "--bucket-edges", "1k,2k", "--max-seq-len", "2k"]
    assert main(argv) == 0
    index = json.loads((built / "index.json").read_text())
    assert index["samples"] == 4 and index["buckets"]["1k"]["tokens"] <= 4 * 1024
    assert main(argv) == 2, "an existing output must not be overwritten silently"
    assert main(argv + ["--overwrite"]) == 0
    assert main(argv[:-2] + ["--max-seq-len", "512"]) == 2  # target longer than max_seq_len: refused at build

    capsys.readouterr()
    assert main(["data", "inspect", str(built)]) == 0
    out = capsys.readouterr().out
    assert "length histogram" in out and "extract_single 4" in out
    assert (built / "length_hist.png").exists() or "matplotlib is not installed" in out


def test_built_sample_lengths_are_exact(tmp_path):
    """Every stored n_tokens equals the length the loader renders (text + image tokens)."""
    from megatron_mmpl.data.build import write_build, write_synth_manifest
    from megatron_mmpl.data.chat_template import render
    from megatron_mmpl.data.images import ImageProcessor
    from megatron_mmpl.data.schema import Sample
    from megatron_mmpl.data.shards import load_index, load_shard_samples, read_members
    from megatron_mmpl.data.tokenizer import build_tiny_tokenizer

    tok, improc = build_tiny_tokenizer(), ImageProcessor()
    manifest = write_synth_manifest(tmp_path / "docs", n_docs=3, pages_per_doc=5)
    write_build(manifest, tmp_path / "out", targets=[700, 1000], tokenizer=tok, tokenizer_name="tiny",
                improc=improc, bucket_edges=[1024], mode="haystack")
    index = load_index(tmp_path / "out")
    for sh in index["shards"]:
        for _key, off, nb, n in load_shard_samples(tmp_path / "out", sh):
            with open(tmp_path / "out" / sh["path"], "rb") as f:
                s = Sample.from_members(*read_members(f, off, nb))
            grids = [improc(p)[1] for p in s.pages]
            ids, mask = render(s.messages, [t * h * w // 4 for t, h, w in grids], tok)
            assert len(ids) == n == s.n_tokens <= s.meta["target_tokens"]
            assert s.meta["target_tokens"] - n < s.meta["row_tokens"]  # filled to within one page-row
            assert all(s.meta["sources"][e].startswith(s.meta["doc_id"]) for e in s.evidence_pages)
            assert sum(src.startswith(s.meta["doc_id"] + ":") for src in s.meta["sources"]) == len(s.evidence_pages)


def test_build_from_pdf_pages(tmp_path):
    """A manifest naming a PDF + page range: pages rendered with pypdfium2 at 144 dpi, built like image pages."""
    require_module("pypdfium2", "PDF input needs pypdfium2 (pip install -e '.[pdf]')")
    from PIL import Image

    from megatron_mmpl.data.build import scan_manifest, write_build, write_synth_manifest
    from megatron_mmpl.data.images import ImageProcessor
    from megatron_mmpl.data.manifest import Problems
    from megatron_mmpl.data.shards import load_index
    from megatron_mmpl.data.tokenizer import build_tiny_tokenizer

    manifest = write_synth_manifest(tmp_path / "docs", n_docs=3, pages_per_doc=5, page_px=(112, 140))
    lines = []
    for line in manifest.read_text().splitlines():
        d = json.loads(line)
        pages = [Image.open(tmp_path / "docs" / p).convert("RGB") for p in d.pop("pages")]
        pdf = tmp_path / "docs" / f"{d['doc_id']}.pdf"
        pages[0].save(pdf, save_all=True, append_images=pages[1:], resolution=72.0)  # 1 px = 1 pt
        lines.append(json.dumps({**d, "pdf": pdf.name, "page_range": [1, 5]}))
    pdf_manifest = tmp_path / "docs" / "pdf_manifest.jsonl"
    pdf_manifest.write_text("\n".join(lines) + "\n")
    doc = scan_manifest(pdf_manifest, 1, Problems(strict=True))[0]
    assert doc.pdf.endswith("doc0.pdf") and doc.sizes[0] == (224, 280)  # 144 dpi = 2 px per pt, read unrendered
    write_build(pdf_manifest, tmp_path / "out", targets=[1000], tokenizer=build_tiny_tokenizer(),
                tokenizer_name="tiny", improc=ImageProcessor(), bucket_edges=[1024])
    index = load_index(tmp_path / "out")
    assert sum(sh["samples"] for sh in index["shards"]) > 0
