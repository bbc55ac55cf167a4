"""Evaluation's GPU path: the export loads in bf16 with SDPA on CUDA, generates in batches, and its first-step
logits follow the fp32 CPU model's (cosine ≥ 0.99, bf16 rounding); a needle grid runs end to end.

Run on the GPU machine:  python -m pytest tests/gpu/test_eval_gpu.py -m gpu -q   (~30 s, < 1 GB)
"""

import pytest
import torch

from tests.unit.eval.fixtures import write_tiny_export

pytestmark = pytest.mark.gpu


def test_generation_on_gpu(tmp_path):
    from megatron_mmpl.eval.generate import generate_all, load_model, load_processing
    from megatron_mmpl.eval.needle import evaluate_needle, grid_items

    export = str(write_tiny_export(tmp_path / "hf"))
    tok, improc = load_processing(export)
    items = grid_items("visual", [200, 220], [0, 1], 2, tok, improc)
    gpu = load_model(export, torch.device("cuda"))
    assert gpu.dtype == torch.bfloat16 and gpu.config._attn_implementation == "sdpa"
    cpu = load_model(export, torch.device("cpu"))
    got = {g.prompt.item.key: g for g in generate_all(gpu, items, tok, improc, max_new_tokens=4, batch_size=4,
                                                      progress=False)}
    ref = {g.prompt.item.key: g for g in generate_all(cpu, items, tok, improc, max_new_tokens=4, batch_size=1,
                                                      progress=False)}
    assert set(got) == set(ref) == {it.key for it in items}
    for k in ref:
        cos = torch.nn.functional.cosine_similarity(got[k].first_logits, ref[k].first_logits, dim=0)
        assert cos >= 0.99, (k, float(cos))
    r = evaluate_needle(export, lengths=[256, 512], depths=[0, 0.5, 1], per_cell=2, device="cuda", progress=False)
    assert r["samples"] == 12 and r["settings"]["device"].startswith("cuda")
