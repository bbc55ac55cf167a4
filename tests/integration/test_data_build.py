"""`mmpl data build` on real PDFs: document/haystack samples, OCR from the text layer, exact lengths, the same
shards from 1 and 2 workers, resume after a kill, page formats (lossless stays bit-identical), bad input counted."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_mmpl.cli import main
from megatron_mmpl.data.images import ImageProcessor
from megatron_mmpl.data.schema import Sample
from megatron_mmpl.data.shards import load_index, load_shard_samples, read_members

from ..unit.data.pdfs import write_pdf

pytestmark = pytest.mark.integration
pytest.importorskip("pypdfium2")
pytest.importorskip("reportlab")
TINY = ["--tokenizer", "tiny", "--bucket-edges", "2k,4k,8k,16k"]


def _samples(root) -> dict[str, Sample]:
    out = {}
    for sh in load_index(root)["shards"]:
        with open(os.path.join(root, sh["path"]), "rb") as f:
            for _key, off, nb, _n in load_shard_samples(root, sh):
                s = Sample.from_members(*read_members(f, off, nb))
                out[s.key] = s
    return out


@pytest.fixture(scope="module")
def manuals(tmp_path_factory):
    """A 36-page and a 17-page manual (text layer, printed page numbers) and hand-written QA, like a new user's."""
    d = tmp_path_factory.mktemp("manuals")
    write_pdf(d / "pump.pdf", 36, {20: "The pump pressure limit is 7.5 bar."}, "Pump manual", photo_every=2)
    write_pdf(d / "valve.pdf", 17, {3: "Warranty lasts 24 months.", 9: "Torque the cap to 12 Nm."}, "Valve guide")
    lines = [dict(doc_id="pump", pdf="pump.pdf", title="Pump manual",
                  qa=[dict(question="What is the pump pressure limit?", answer="7.5 bar", task="extract_single",
                           evidence_pages=[20])]),
             dict(doc_id="valve", pdf="valve.pdf",
                  qa=[dict(question="How long is the warranty, and the cap torque?", answer="24 months; 12 Nm",
                           task="extract_multi", evidence_pages=[3, 9])])]
    (d / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def test_real_pdfs_document_mode_ocr_and_workers(manuals, tmp_path, capsys):
    import pypdfium2 as pdfium

    from megatron_mmpl.data.manifest import render_pdf_page

    argv = ["data", "build", "--manifest", str(manuals / "manifest.jsonl"), "--targets", "2k,7k,12k",
            "--ocr-from-pdf", *TINY]
    assert main(argv + ["--out", str(tmp_path / "w1")]) == 0
    out = capsys.readouterr().out
    assert "dropped samples: none" in out and "length histogram" in out and "bytes per token" in out
    assert main(argv + ["--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    for sh in load_index(tmp_path / "w1")["shards"]:  # any number of workers writes the same shards
        assert (tmp_path / "w1" / sh["path"]).read_bytes() == (tmp_path / "w2" / sh["path"]).read_bytes()
    samples = _samples(tmp_path / "w1")
    assert len(samples) == 2 * 2 * 3  # (QA + OCR) x 2 docs x 3 targets
    improc = ImageProcessor()
    pdfs = {d: pdfium.PdfDocument(str(manuals / f"{d}.pdf")) for d in ("pump", "valve")}
    for s in samples.values():
        m = s.meta
        assert 0 <= m["target_tokens"] - s.n_tokens < m["row_tokens"], "within one page-row of the target"
        own = [int(src.split(":")[1]) for src in m["sources"] if src.startswith(m["doc_id"] + ":")]
        assert own == list(range(own[0], own[0] + len(own))) and m["sources"][0].startswith(m["doc_id"])
        assert [m["page_labels"][i] for i in range(len(own))] == [p + 1 for p in own], "labels = PDF page numbers"
        ev = [int(m["sources"][i].split(":")[1]) for i in s.evidence_pages]
        if s.task == "ocr_transcribe":  # the answer is the page's text layer; the question names its page
            text = pdfs[m["doc_id"]][ev[0]].get_textpage().get_text_bounded()
            answer = s.messages[1]["content"][0]["text"]
            assert answer.split() == text.split() and f"Line 1 of page {ev[0] + 1}:" in answer
            assert f"page {ev[0] + 1} exactly" in s.messages[0]["content"][-1]["text"]
        else:
            assert ev == ([20] if m["doc_id"] == "pump" else [3, 9])
            page = render_pdf_page(str(manuals / f"{m['doc_id']}.pdf"), ev[0])
            assert np.array_equal(improc(s.pages[s.evidence_pages[0]])[0], improc(page)[0]), "PNG page is lossless"
        if m["target_tokens"] == 12 * 1024:  # longer than either manual: joined with the next one
            assert any(src.split(":")[0] != m["doc_id"] for src in m["sources"])
            text = "".join(p.get("text", "") for p in s.messages[0]["content"])
            assert text.count("Document: ") == 2
    assert main(argv + ["--out", str(tmp_path / "hay"), "--mode", "haystack"]) == 0
    for s in _samples(tmp_path / "hay").values():
        m = s.meta
        assert m["page_labels"] == list(range(1, len(s.pages) + 1))
        assert sum(src.startswith(m["doc_id"] + ":") for src in m["sources"]) == len(s.evidence_pages)
        assert 0 <= m["target_tokens"] - s.n_tokens < m["row_tokens"]


def test_page_formats_lossless_bit_identical_and_loader_decodes(manuals, tmp_path, capsys):
    from megatron_mmpl.data.loader import LoaderOptions, build_train_loader
    from megatron_mmpl.data.manifest import render_pdf_page
    from megatron_mmpl.data.tokenizer import build_tiny_tokenizer

    improc, tok = ImageProcessor(), build_tiny_tokenizer()
    bpt = {}
    for fmt, q in (("png", "90"), ("webp", "lossless"), ("jpeg", "80"), ("webp", "80")):
        out = tmp_path / f"{fmt}-{q}"
        assert main(["data", "build", "--manifest", str(manuals / "manifest.jsonl"), "--targets", "3k", "--out",
                     str(out), "--image-format", fmt, "--image-quality", q, *TINY]) == 0
        index = load_index(out)
        bpt[(fmt, q)] = index["bytes"] / index["tokens"]
        assert f"{bpt[(fmt, q)]:.1f} bytes per token" in capsys.readouterr().out
        for s in _samples(out).values():
            assert set(s.page_exts) == {"jpg" if fmt == "jpeg" else fmt}
            src = s.meta["sources"][s.evidence_pages[0]].split(":")
            ref = improc(render_pdf_page(str(manuals / f"{src[0]}.pdf"), int(src[1])))[0]
            got = improc(s.pages[s.evidence_pages[0]])[0]
            if q == "lossless" or fmt == "png":
                assert np.array_equal(got, ref)
            else:
                assert not np.array_equal(got, ref) and np.abs(got - ref).mean() < 0.1
        opts = LoaderOptions(shards=str(out), min_len=1, max_len=4096, max_seq_len=4096, num_workers=0,
                             task_weights={"extraction": 1.0})
        batch = next(iter(build_train_loader(opts, tok, dp_rank=0, dp_size=1)))
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(1).sum())
    assert bpt[("jpeg", "80")] < bpt[("png", "90")] and bpt[("webp", "80")] < bpt[("png", "90")]
    assert main(["data", "build", "--manifest", str(manuals / "manifest.jsonl"), "--out", str(tmp_path / "x"),
                 "--image-format", "jpeg", "--image-quality", "lossless", *TINY]) == 2


def test_resume_after_kill_matches_uninterrupted_build(tmp_path):
    """SIGKILL a build once a shard is finished; `--resume` keeps finished shards, redoes the half-written one,
    and the result holds exactly the samples of an uninterrupted build."""
    lines = []
    for d in range(8):
        write_pdf(tmp_path / f"d{d}.pdf", 12, {d: f"Code {d}{d}{d}."}, f"Doc {d}")
        lines.append(json.dumps(dict(doc_id=f"d{d}", pdf=f"d{d}.pdf", qa=[dict(
            question="What is the code?", answer=f"{d}{d}{d}", task="extract_single", evidence_pages=[d])])))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["data", "build", "--manifest", str(tmp_path / "m.jsonl"), "--targets", "1k,2k,3k,4k", "--shard-mb",
            "0.05", "--ocr-from-pdf", *TINY]
    assert main(argv + ["--out", str(tmp_path / "ref")]) == 0
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_mmpl.cli", *argv, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(partial.glob("*/*.tar")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed build must not look complete"
    kept = {p.relative_to(partial): p.read_bytes() for p in partial.glob("*/*.tar")}
    assert kept, "the build finished before it could be killed; make it longer"
    assert main(argv + ["--out", str(out), "--resume", "--workers", "2"]) == 0
    index = load_index(out)
    assert 0 < index["build"]["resumed_samples"] < index["samples"]
    assert all((out / sh["path"]).exists() for sh in index["shards"]) and not list(out.rglob("*.part"))
    for name, data in kept.items():  # finished shards were kept as they were
        assert (out / name).read_bytes() == data
    got, ref = _samples(out), _samples(tmp_path / "ref")
    assert got.keys() == ref.keys()
    for k, s in ref.items():
        assert got[k].pages == s.pages and got[k].header() == s.header()
    # the same output again with other settings is refused, not mixed
    os.rename(out, partial)
    assert main(argv[:5] + ["2k", *argv[6:], "--out", str(out), "--resume"]) == 2


def test_bad_input_skipped_and_counted_or_strict(manuals, tmp_path, caplog, capsys):
    from PIL import Image

    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    Image.new("RGB", (300, 400), "white").save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:200])  # truncated PNG
    good_qa = [dict(question="Q?", answer="A", task="reason", evidence_pages=[0])]
    lines = [dict(doc_id="good", pdf=str(manuals / "pump.pdf"), qa=good_qa),
             dict(doc_id="badpdf", pdf="broken.pdf", qa=good_qa),
             dict(doc_id="badrange", pdf=str(manuals / "valve.pdf"), page_range=[10, 40], qa=good_qa),
             dict(doc_id="badimage", pages=["ok.png", "cut.png"], qa=good_qa),
             dict(doc_id="badqa", pages=["ok.png"], qa=[dict(question="Q?", answer="A", task="reason",
                                                              evidence_pages=[5]),
                                                         dict(question="Q?", answer="A", task="reason"),
                                                         *good_qa])]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    argv = ["data", "build", "--manifest", str(tmp_path / "m.jsonl"), "--targets", "2k", *TINY]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 0
    skipped = load_index(tmp_path / "out")["build"]["skipped_input"]
    assert skipped == {"bad manifest line": 1, "image that does not decode": 1, "page index out of range": 2,
                       "qa without evidence pages": 1, "unreadable PDF": 1}
    for doc in ("badpdf", "badrange", "badimage", "badqa"):
        assert f"doc {doc}: " in caplog.text
    assert sorted(_samples(tmp_path / "out")) == ["badqa-q2-2048", "good-q0-2048"]
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "doc badpdf: cannot open" in err and "--strict" in err and not (tmp_path / "strict").exists()
