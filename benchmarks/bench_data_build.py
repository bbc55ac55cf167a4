"""`mmpl data build` throughput from real PDFs: pages/s at 1, 2, … build workers on this machine's CPUs.

Writes `--docs` letter-size PDFs with a text layer (reportlab, `dev` extra), one extraction QA per document, then
runs the real CLI (`python -m megatron_mmpl.cli data build --mode document --workers W`) once per worker count in a
fresh process into a fresh output dir, and reads the build's own counters from index.json: pages placed in samples
(a page recurs across targets) and pages rendered (pdfium at 144 dpi, PNG-encoded once each).

    python benchmarks/bench_data_build.py [--docs 48] [--pages 30] [--workers 1,2,16] [--targets 16k,32k]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LETTER_PT = (612, 792)  # 1224x1584 px at 144 dpi: ~1,230 LM tokens per page


def write_pdf(path: Path, n_pages: int, fact_page: int, fact: str, seed: int) -> None:
    """A text-heavy letter-size PDF: a title, 48 lines of filler per page, a page number, one fact."""
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), pagesize=LETTER_PT)
    for i in range(n_pages):
        c.setFont("Helvetica-Bold", 14)
        c.drawString(54, LETTER_PT[1] - 60, f"Report {seed}, chapter {i // 5 + 1}")
        c.setFont("Helvetica", 9)
        for k in range(48):
            c.drawString(54, LETTER_PT[1] - 90 - 13 * k,
                         f"Line {k + 1} of page {i + 1}: reading {(seed * 31 + i * 7 + k) % 997} units at "
                         f"station {(i + k) % 17}, cross-checked against the log of day {(k * 3 + i) % 28 + 1}.")
        if i == fact_page:
            c.drawString(54, 60, fact)
        c.drawString(LETTER_PT[0] / 2 - 8, 30, str(i + 1))
        c.showPage()
    c.save()


def write_corpus(d: Path, docs: int, pages: int) -> Path:
    lines = []
    for n in range(docs):
        ev = (n * 7) % pages
        write_pdf(d / f"doc{n:03d}.pdf", pages, ev, f"The calibration constant of unit {n} is {1000 + n}.", n)
        qa = [dict(question=f"What is the calibration constant of unit {n}?", answer=str(1000 + n),
                   task="extract_single", evidence_pages=[ev])]
        lines.append(json.dumps(dict(doc_id=f"doc{n:03d}", pdf=f"doc{n:03d}.pdf", qa=qa)))
    manifest = d / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def build(manifest: Path, out: Path, workers: int, targets: str, tokenizer: str) -> dict:
    cmd = [sys.executable, "-m", "megatron_mmpl.cli", "data", "build", "--manifest", str(manifest), "--out",
           str(out), "--targets", targets, "--tokenizer", tokenizer, "--mode", "document", "--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"build with {workers} workers failed (rc {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    stats = json.loads((out / "index.json").read_text())["build"]
    return {**stats, "workers": workers, "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--pages", type=int, default=30, help="pages per PDF")
    ap.add_argument("--workers", default="1,2,16")
    ap.add_argument("--targets", default="16k,32k")
    ap.add_argument("--tokenizer", default="qwen2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_corpus(tmp, args.docs, args.pages)
        print(f"{args.docs} PDFs x {args.pages} letter pages written in {time.perf_counter() - t0:.1f}s; "
              f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
        rows = [build(manifest, tmp / f"out-w{w}", int(w), args.targets, args.tokenizer)
                for w in args.workers.split(",")]
    base = rows[0]["pages_per_s"]
    print("| workers | pages in samples | pages rendered | build s | pages/s | rendered pages/s | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['workers']} | {r['pages_this_run']:,} | {r['pages_read_this_run']:,} | {r['seconds']:.1f} | "
              f"{r['pages_per_s']:.1f} | {r['pages_read_this_run'] / max(r['seconds'], 1e-9):.1f} | "
              f"{r['pages_per_s'] / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
