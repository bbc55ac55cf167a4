"""Qwen2.5-VL-7B shapes (random weights, bf16, one GPU): our Megatron-Core model vs transformers.

Prints max|Δ|, mean|Δ| and cosine similarity of the ViT output and of the logits, and the argmax agreement.
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


def compare_7b(preset: str = "qwen25vl-7b") -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.conversion.mapping import hf_to_mcore
    from megatron_mmpl.models.qwen25vl.build import build_model
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset
    from megatron_mmpl.models.qwen25vl.testing import hf_logits, mm_prompt
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    initialize_parallel()
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = hf_config_from_preset(preset)
    cfg._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    t0 = time.time()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        hf = Qwen2_5_VLForConditionalGeneration(cfg).eval()  # transformers' random init (std 0.02), bf16
    torch.set_default_dtype(default)
    model = build_model(cfg, dtype=torch.bfloat16).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in hf_to_mcore(hf.state_dict(), cfg):  # streamed: one converted tensor at a time
            params[name].copy_(t)
    build_s = time.time() - t0
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in mm_prompt(cfg, PARTS, seed=0).items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref_vis = hf.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        our_vis = model.vision_model(batch["pixel_values"], batch["image_grid_thw"])
        ref = hf_logits(hf, batch)
        ours = model(batch["input_ids"], batch["position_ids"], pixel_values=batch["pixel_values"],
                     image_grid_thw=batch["image_grid_thw"])
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "preset": preset,
        "seq_len": batch["input_ids"].shape[1],
        "build_and_convert_s": round(build_s, 1),
        "vision": _stats(our_vis, ref_vis),
        "logits": _stats(ours, ref),
        "argmax_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }
    return res


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qwen25vl_7b_shapes_bf16_match_transformers():
    res = compare_7b()
    print(res)
    # bf16 through 28 layers: loose bounds that a layout/mapping error (cosine ~0) cannot meet
    assert res["vision"]["cosine"] > 0.99 and res["logits"]["cosine"] > 0.99, res
    assert res["argmax_agreement"] > 0.9, res


if __name__ == "__main__":
    import sys

    print(compare_7b(*sys.argv[1:2]))  # optional preset name; `tiny` gives a CPU smoke run
