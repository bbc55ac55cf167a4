"""This rank's part of the Qwen2.5-VL model, built from the run config (precision, recompute, parallel layout)."""

from __future__ import annotations

import torch

from megatron_mmpl.compat.schedules import variable_length_pipeline
from megatron_mmpl.config import Config
from megatron_mmpl.training.optimizer import DTYPES


def transformer_overrides(cfg: Config) -> dict:
    """TransformerConfig fields the trainer sets on the LM, ViT and merger configs."""
    out = {"calculate_per_token_loss": True}
    if cfg.parallel.pp > 1:
        out.update(variable_length_pipeline())
    if cfg.model.recompute == "selective":
        out.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif cfg.model.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform",
                   recompute_num_layers=cfg.model.recompute_num_layers)
    return out


def build_model_chunk(cfg: Config, spec, layout) -> torch.nn.Module:
    """`models.qwen25vl.build.build_model` for this rank under `layout` (what initialize_parallel returned)."""
    from megatron_mmpl.models.qwen25vl.build import build_model  # lazy: megatron's import costs seconds

    module = build_model(
        spec, layout, first_stage_layers=cfg.parallel.first_stage_layers,
        sequence_parallel=cfg.parallel.sequence_parallel,
        dtype=DTYPES[cfg.model.dtype],
        attention_backend=None if cfg.model.attention_backend == "auto" else cfg.model.attention_backend,
        overrides=transformer_overrides(cfg),
    )
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    return module
