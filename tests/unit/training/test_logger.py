"""The console line and the log files (losses.tsv, metrics.jsonl, TensorBoard)."""

import json
import os

import pytest

from megatron_mmpl.config import load_config
from megatron_mmpl.training.logger import RunLogger, format_line

pytestmark = pytest.mark.unit


def test_console_line_and_log_files(tmp_path):
    m = {"loss": 2.5, "lr": 1e-5, "grad_norm": 0.5, "tokens_per_s": 12345.0, "tflops_per_gpu": 400.0,
         "vit_tflops_per_gpu": 20.0, "mfu": 0.42, "vit_mfu": 0.02, "hfu": 0.5, "max_mem_gib": 60.0,
         "data_wait": 0.01}
    line = format_line(7, 100, m)
    assert line.startswith("step 7/100 | loss 2.5000 | lr 1.000e-05 | grad 0.500 | tok/s 12,345")
    assert "TFLOP/s/GPU 400 + ViT 20" in line and "MFU 42.0% + ViT 2.0% | HFU 50.0%" in line and "mem 60.00 GiB" in line
    assert "data 1.0%" in line and "\n" not in line
    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.progress_bar=false"])
    log = RunLogger(cfg, writer=True, total_steps=100, start_step=0)
    log.advance(7, 2.5)
    log.log(7, {**m, "mfu": None, "vit_mfu": None})
    log.close()
    assert open(os.path.join(tmp_path, "losses.tsv")).read() == "7\t2.500000\n"
    rec = json.loads(open(os.path.join(tmp_path, "metrics.jsonl")).read())
    assert rec["step"] == 7 and rec["loss"] == 2.5 and "mfu" not in rec
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
