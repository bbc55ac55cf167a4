"""`mmpl eval docvqa | needle | report` end to end on a tiny export: the three input formats, --max-len shrinking
and skipping, a needle grid at 1x and 2x with YaRN, and one report with the lengths side by side."""

import json

import pytest

from megatron_mmpl.cli import main
from tests.unit.eval.fixtures import write_mmlongbench_doc, write_mmlongbench_jsonl, write_tiny_export

pytestmark = pytest.mark.integration


def test_eval_commands(tmp_path, capsys):
    pytest.importorskip("pypdfium2")
    model = str(write_tiny_export(tmp_path / "hf"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "losses.tsv").write_text("".join(f"{s} {5.0 / s:.4f}\n" for s in range(1, 21)))
    evals = run / "evals"
    base = ["eval", "docvqa", "--model", model, "--device", "cpu", "--no-progress", "--max-new-tokens", "4"]

    samples = write_mmlongbench_doc(tmp_path / "mmlb-doc")
    assert main(base + ["--data", str(samples), "--json", str(evals / "mmlongbench_doc.json")]) == 0
    out = capsys.readouterr().out
    assert "docvqa: 5 questions" in out and "no judge model" in out
    r = json.loads((evals / "mmlongbench_doc.json").read_text())
    assert set(r["by_family"]) == {"single-page", "cross-page", "unanswerable"}
    assert set(r["by_format"]) == {"Str", "Int", "List", "None", "Float"} and r["overall"]["n"] == 5
    preds = [json.loads(x) for x in (evals / "mmlongbench_doc.predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and all({"generated", "pred", "score", "tokens"} <= set(p) for p in preds)
    from megatron_mmpl.eval.docvqa import length_bin

    bins = {}
    for p in preds:  # by actual prompt length: each question in the bin of its own token count
        bins[length_bin(p["tokens"])] = bins.get(length_bin(p["tokens"]), 0) + 1
    assert {k: v["n"] for k, v in r["by_length"].items()} == bins

    jsonl = write_mmlongbench_jsonl(tmp_path / "mmlb")
    argv = base + ["--data", str(jsonl), "--image-root", str(tmp_path / "mmlb"), "--batch-size", "2"]
    assert main(argv + ["--json", str(evals / "mmlongbench.json")]) == 0
    full = json.loads((evals / "mmlongbench.json").read_text())
    assert full["overall"]["n"] == 3 and set(full["by_family"]) == {"mmlongdoc"}
    # a budget under the 3-page document: it is shrunk (or skipped), never longer than --max-len
    small = [json.loads(x)["tokens"] for x in (evals / "mmlongbench.predictions.jsonl").read_text().splitlines()]
    budget = sorted(small)[1]
    assert main(argv + ["--max-len", str(budget), "--json", str(tmp_path / "cut.json")]) == 0
    cut = [json.loads(x) for x in (tmp_path / "cut.predictions.jsonl").read_text().splitlines()]
    assert all(p["tokens"] <= budget for p in cut) and any(p["page_tokens_cap"] for p in cut)

    grid = ["eval", "needle", "--model", model, "--device", "cpu", "--no-progress", "--lengths", "64,128",
            "--depths", "0,0.5,...,1", "--per-cell", "2", "--trained-len", "64"]
    assert main(grid + ["--json", str(evals / "needle.json")]) == 0
    assert "needle: 12 documents" in capsys.readouterr().out
    assert (evals / "needle_heatmap.png").stat().st_size > 5_000
    assert main(grid + ["--rope-scaling", "yarn:2", "--json", str(evals / "needle_yarn2.json")]) == 0
    yarn = json.loads((evals / "needle_yarn2.json").read_text())
    assert yarn["settings"]["rope_scaling"]["original_max_position_embeddings"] == 64
    assert main(grid + ["--rope-scaling", "ntk:2"]) == 2
    assert "--rope-scaling 'ntk:2'" in capsys.readouterr().err

    assert main(["eval", "report", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "needle: accuracy" in out and "mmlongbench_doc: document VQA accuracy" in out
    md = (run / "report.md").read_text()
    assert "| 64 (1×) | 128 (2×) |" in md and "| needle_yarn2 | yarn ×2 |" in md
    assert "| mmlongbench_doc | as trained | 5 |" in md and "Accuracy by task family" in md
    for png in ("loss_curve.png", "needle_heatmap.png", "needle_yarn2_heatmap.png", "accuracy_vs_length.png"):
        assert (run / png).stat().st_size > 5_000, png
