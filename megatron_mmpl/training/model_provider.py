"""This rank's part of the Qwen2.5-VL model, built from the run config (precision, recompute, parallel layout)."""

from __future__ import annotations

import torch

from megatron_mmpl.compat.schedules import variable_length_pipeline
from megatron_mmpl.config import Config
from megatron_mmpl.training.optimizer import DTYPES


def transformer_overrides(cfg: Config) -> tuple[dict, dict, dict]:
    """TransformerConfig fields the trainer sets: (all three towers; LM only; ViT only). vit_recompute=chunked
    is the ViT's own (models/qwen25vl/vision_model.py), not a megatron setting."""
    common = {"calculate_per_token_loss": True}
    if cfg.parallel.pp > 1:
        common.update(variable_length_pipeline())
    m, lm = cfg.model, {}
    recompute = m.recompute
    if recompute == "auto":  # train() resolves it through the planner first (training/memory.py)
        if torch.cuda.is_available():
            raise ValueError("model.recompute=auto must be resolved before the model is built (training/memory.py)")
        recompute = "none"  # on CPU auto means no recompute, as in train()
    if recompute == "selective":
        lm.update(recompute_granularity="selective", recompute_modules=list(m.recompute_modules))
    elif recompute == "full":
        lm.update(recompute_granularity="full", recompute_method=m.recompute_method,
                  recompute_num_layers=m.recompute_num_layers)
    vit = {}
    if m.vit_recompute == "full" and m.vit_recompute_blocks is None:
        vit.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif m.vit_recompute == "full" and m.vit_recompute_blocks > 0:  # the first k blocks; 0 recomputes none
        vit.update(recompute_granularity="full", recompute_method="block", recompute_num_layers=m.vit_recompute_blocks)
    return common, lm, vit


def build_model_chunk(cfg: Config, spec, layout) -> torch.nn.Module:
    """`models.qwen25vl.build.build_model` for this rank under `layout` (what initialize_parallel returned)."""
    from megatron_mmpl.models.qwen25vl.build import build_model  # lazy: megatron's import costs seconds

    common, lm, vit = transformer_overrides(cfg)
    module = build_model(
        spec, layout, first_stage_layers=cfg.parallel.first_stage_layers,
        sequence_parallel=cfg.parallel.sequence_parallel,
        dtype=DTYPES[cfg.model.dtype],
        attention_backend=None if cfg.model.attention_backend == "auto" else cfg.model.attention_backend,
        overrides=common, language_overrides=lm, vision_overrides=vit, fused_kernels=cfg.model.fused_kernels,
    )
    if module.vision_model is not None:
        module.vision_model.recompute = cfg.model.vit_recompute == "chunked"
        module.vision_model.chunk_patches = cfg.model.vit_chunk_patches
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    return module
