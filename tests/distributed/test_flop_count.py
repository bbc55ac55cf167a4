"""training/flops.py counts what the built model computes: torch's FlopCounterMode over one forward + backward of
the tiny model (fp32, CPU, SDPA's math kernel so attention is seen as matmuls), under each freeze switch and
recompute setting the trainer passes to megatron.

Weight matmuls (aten.mm) must equal FlopModel(attention=False) exactly: forward, input and weight gradients of the
parts that train, and the forward work each recompute setting reruns. Attention (aten.bmm) must equal FlopModel's
attention exactly, once two things it does on purpose are added back: the math kernel computes the LM's causal
scores in full (FlopModel counts the half a causal kernel computes), and M-RoPE's angles are one small bmm
(2·3·head_dim/2 per token). Images are whole windows (4×8 and 8×4 patches, windows of 4×4), which FlopModel
counts exactly (it counts an edge window as a whole one).
"""

import pytest

from megatron_mmpl.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

IMAGES = [4, ("image", 1, 4, 8), 2, ("image", 1, 8, 4), 2]
UNSUPERVISED = 10  # the first positions carry no label: the output layer runs on the rest
CASES = {
    "no recompute": ["model.recompute=none", "model.vit_recompute=none"],
    "every ViT block": ["model.recompute=none", "model.vit_recompute=full"],
    "LM MLP, ViT first 2 blocks": ["model.recompute=selective", "model.recompute_modules=[mlp]",
                                   "model.vit_recompute_blocks=2"],
    "LM core_attn + MLP": ["model.recompute=selective", "model.recompute_modules=[core_attn, mlp]",
                           "model.vit_recompute=none"],
    "LM full, ViT chunked": ["model.recompute=full", "model.vit_recompute=chunked"],
    "LM first 3 layers": ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=3",
                          "model.vit_recompute=none"],
    "ViT frozen": ["model.recompute=none", "model.freeze_vision=true", "model.vit_recompute=full"],
    "ViT frozen, chunked": ["model.recompute=none", "model.freeze_vision=true", "model.vit_recompute=chunked"],
    "ViT and merger frozen, chunked": ["model.recompute=none", "model.freeze_vision=true",
                                       "model.freeze_merger=true", "model.vit_recompute=chunked"],
    "merger frozen": ["model.recompute=none", "model.freeze_merger=true"],
    "LM frozen": ["model.recompute=selective", "model.recompute_modules=[mlp]", "model.freeze_llm=true"],
}


def _config(extra):
    from megatron_mmpl.config import load_config

    return load_config(None, ["model.hf_config=tiny", "model.dtype=fp32", *extra])


def _counted(cases: dict) -> dict:
    """In a rank: {case: {op: FLOPs}} of one forward + backward of the built, frozen tiny model."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_mmpl.config.hf_config import resolve_hf_config
    from megatron_mmpl.models.qwen25vl.testing import mm_prompt
    from megatron_mmpl.parallel.process_groups import initialize_parallel
    from megatron_mmpl.training.model_provider import build_model_chunk
    from megatron_mmpl.training.optimizer import freeze

    layout = initialize_parallel()
    out = {}
    for name, extra in cases.items():
        cfg = _config(extra)
        hf = resolve_hf_config(cfg.model)
        torch.manual_seed(0)
        model = build_model_chunk(cfg, hf, layout)
        freeze(model, cfg)
        model.train()
        b = mm_prompt(hf, IMAGES, 1)
        labels = torch.randint(0, 200, b["input_ids"].shape)
        labels[:, :UNSUPERVISED] = -100
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            loss = model(b["input_ids"], b["position_ids"], labels=labels, pixel_values=b["pixel_values"],
                         image_grid_thw=b["image_grid_thw"])
            loss.sum().backward()
        out[name] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return out


def _expected(spec, training, segs, grids, attention: bool, vit: bool = True) -> float:
    """FlopModel's FLOPs of the step (model + rebuilt), the LM's alone unless `vit`."""
    from megatron_mmpl.training.flops import FlopModel

    f = FlopModel(spec, training, attention=attention)
    lm = f.lm_flops(segs, head_tokens=segs[0] - UNSUPERVISED) + f.rebuilt_flops(segs, [])
    return lm + (f.vit_flops(grids) + f.rebuilt_flops(segs, grids) - f.rebuilt_flops(segs, []) if vit else 0)


def test_flop_model_counts_what_the_model_computes():
    from megatron_mmpl.config.hf_config import resolve_hf_config
    from megatron_mmpl.models.qwen25vl.spec import ModelSpec
    from megatron_mmpl.models.qwen25vl.testing import mm_prompt
    from megatron_mmpl.training.flops import Training

    (counted,) = run_distributed(_counted, 1, CASES)
    for name, extra in CASES.items():
        cfg = _config(extra)
        hf = resolve_hf_config(cfg.model)
        spec = ModelSpec.of(hf)
        b = mm_prompt(hf, IMAGES, 1)
        args = (spec, Training.of(cfg.model, spec), [b["input_ids"].shape[1]], b["image_grid_thw"].tolist())
        weights = _expected(*args, attention=False)
        lm_attention = _expected(*args, attention=True, vit=False) - _expected(*args, attention=False, vit=False)
        vit_attention = _expected(*args, attention=True) - weights - lm_attention
        rope = 2 * 3 * spec.head_dim // 2 * args[2][0]
        print(f"{name}: {counted[name]}; FlopModel weights {weights:.0f}, LM attention {lm_attention:.0f}, "
              f"ViT attention {vit_attention:.0f}")
        assert counted[name]["aten.mm"] == weights, name
        assert counted[name]["aten.bmm"] == 2 * lm_attention + vit_attention + rope, name
        assert set(counted[name]) == {"aten.mm", "aten.bmm"}, name
