"""Qwen2.5-VL-7B shapes (random weights, one GPU): our Megatron-Core model vs transformers, in fp32 and bf16.

fp32 (TF32 off) must be the same function; in bf16 our error against the fp32 truth must be no larger than
transformers' own bf16 error. Prints max|Δ|, mean|Δ|, cosine of the ViT output and the logits, argmax agreement.
Run on the GPU machine:  python -m pytest tests/gpu/test_qwen25vl_7b_shapes.py -m gpu -s -q
(or `python tests/gpu/test_qwen25vl_7b_shapes.py`). Needs ~50 GB of GPU memory.
"""

import os
import time

import pytest
import torch

pytestmark = pytest.mark.gpu

# Two page-like images of different sizes (grid in 14-px patches) with text before, between and after.
PARTS = [37, ("image", 1, 56, 40), 23, ("image", 1, 36, 52), 41]


def _stats(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = ours.float().flatten(), ref.float().flatten()
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "mean_abs_diff": (a - b).abs().mean().item(),
        "ref_abs_max": b.abs().max().item(),
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
    }


def _load(model, hf):
    from megatron_mmpl.models.qwen25vl.hf_mapping import hf_to_mcore

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in hf_to_mcore(hf.state_dict(), hf.config):  # streamed: one converted tensor at a time
            params[name].copy_(t)


def _forward(model, batch, dtype):
    pix = batch["pixel_values"].to(dtype)
    with torch.no_grad():
        vis = model.vision_model(pix, batch["image_grid_thw"])
        logits = model(batch["input_ids"], batch["position_ids"], pixel_values=pix,
                       image_grid_thw=batch["image_grid_thw"])
    return vis.float(), logits.float()


def _hf_forward(hf, batch, dtype):
    from megatron_mmpl.models.qwen25vl.testing import hf_logits

    b = dict(batch, pixel_values=batch["pixel_values"].to(dtype))
    with torch.no_grad():
        vis = hf.model.visual(b["pixel_values"], grid_thw=b["image_grid_thw"]).pooler_output
        return vis.float(), hf_logits(hf, b).float()


def compare_7b(preset: str = "qwen25vl-7b") -> dict:
    """fp32 (TF32 off) and bf16: ours vs transformers, plus transformers-bf16 vs transformers-fp32 as the floor."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.models.qwen25vl.build import build_model
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset
    from megatron_mmpl.models.qwen25vl.testing import mm_prompt
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    layout = initialize_parallel()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = hf_config_from_preset(preset)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    t0 = time.time()
    torch.manual_seed(0)
    with dev:
        hf = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()  # transformers' random init (std 0.02)
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in mm_prompt(cfg, PARTS, seed=0).items()}
    ref32 = _hf_forward(hf, batch, torch.float32)
    model = build_model(cfg, layout, dtype=torch.float32).eval()
    _load(model, hf)
    ours32 = _forward(model, batch, torch.float32)
    del model
    hf = hf.to(torch.bfloat16)
    ref16 = _hf_forward(hf, batch, torch.bfloat16)
    model = build_model(cfg, layout, dtype=torch.bfloat16).eval()
    _load(model, hf)
    ours16 = _forward(model, batch, torch.bfloat16)
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "preset": preset, "seq_len": batch["input_ids"].shape[1], "seconds": round(time.time() - t0, 1),
    }
    for name, (a, b) in {"fp32 ours vs hf": (ours32, ref32), "bf16 ours vs hf-fp32": (ours16, ref32),
                         "bf16 hf vs hf-fp32 (floor)": (ref16, ref32), "bf16 ours vs hf-bf16": (ours16, ref16)}.items():
        res[name] = {"vision": _stats(a[0], b[0]), "logits": _stats(a[1], b[1]),
                     "argmax_agreement": (a[1].argmax(-1) == b[1].argmax(-1)).float().mean().item()}
    return res


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qwen25vl_7b_shapes_match_transformers():
    res = compare_7b()
    for k, v in res.items():
        print(k, v)
    fp32 = res["fp32 ours vs hf"]
    # fp32 without TF32: the same function up to summation order
    assert fp32["logits"]["cosine"] > 0.99999 and fp32["vision"]["cosine"] > 0.99999, fp32
    assert fp32["logits"]["max_abs_diff"] <= 1e-3 * fp32["logits"]["ref_abs_max"] + 1e-3, fp32
    # bf16: our rounding error against the fp32 truth is no worse than transformers' own bf16 error
    ours, floor = res["bf16 ours vs hf-fp32"]["logits"], res["bf16 hf vs hf-fp32 (floor)"]["logits"]
    assert ours["mean_abs_diff"] <= 1.5 * floor["mean_abs_diff"], (ours, floor)


if __name__ == "__main__":
    import sys

    print(compare_7b(*sys.argv[1:2]))  # optional preset name; `tiny` gives a CPU smoke run
