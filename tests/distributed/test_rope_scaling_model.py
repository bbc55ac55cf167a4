"""Length extension end to end: a Qwen2.5-VL config with YaRN (or linear) M-RoPE scaling gives transformers' logits
(fp32, TP=1, ≤1e-4) — the scaling is read from the HF config and applied by our model."""

import copy

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed
PARTS = [6, ("image", 1, 4, 6), 5]
SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
}


def _text_config(scaling):
    from megatron_mmpl.models.qwen25vl.presets import preset_dict

    tc = copy.deepcopy(preset_dict("tiny")["text_config"])
    tc["rope_parameters"].update(scaling)
    return tc


def _ours(weights, text_config, batch):
    from megatron_mmpl.models.qwen25vl.build import build_model, load_full_weights
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    layout = initialize_parallel()
    model = build_model(hf_config_from_preset("tiny", text_config=text_config), layout).eval()
    load_full_weights(model, weights)
    with torch.no_grad():
        return model(batch["input_ids"], batch["position_ids"], pixel_values=batch["pixel_values"],
                     image_grid_thw=batch["image_grid_thw"])


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_scaled_mrope_matches_transformers(kind):
    from megatron_mmpl.models.qwen25vl.hf_mapping import hf_to_mcore_dict
    from megatron_mmpl.models.qwen25vl.testing import hf_logits, mm_prompt, tiny_hf_model

    tc = _text_config(SCALINGS[kind])
    hf = tiny_hf_model("tiny", seed=0, text_config=tc)
    plain = tiny_hf_model("tiny", seed=0)
    batch = mm_prompt(hf.config, PARTS, seed=1)
    with torch.no_grad():
        ref, ref_plain = hf_logits(hf, batch), hf_logits(plain, batch)
    assert (ref - ref_plain).abs().max() > 1e-2  # the scaling changes the function: the check can fail
    (ours,) = run_distributed(_ours, 1, hf_to_mcore_dict(hf.state_dict(), hf.config), tc, batch)
    assert (ours - ref).abs().max() <= 1e-4, (ours - ref).abs().max()
