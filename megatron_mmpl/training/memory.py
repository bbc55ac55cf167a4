"""GPU memory around the run: the planner's verdict on this layout before anything is built, the allocator
setting, and planned vs measured peak after the first step."""

from __future__ import annotations

import os

import torch

from megatron_mmpl.config import Config, ConfigError
from megatron_mmpl.plan.memory import Hardware, PlanError, plan_config

GiB = 1024**3


def plan_this_run(cfg: Config, spec, world_size: int):
    """Resolve model.recompute=auto and refuse a layout the planner says cannot fit this GPU.

    Returns the plan (None on CPU, where auto means no recompute and host memory is not planned). A refused
    layout raises ConfigError with the planner's reason, unless parallel.ignore_memory_plan is set.
    """
    if not torch.cuda.is_available():
        if cfg.model.recompute == "auto":
            cfg.model.recompute = "none"
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", min(world_size, torch.cuda.device_count())))
    mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    hw = Hardware(nodes=max(1, world_size // local), gpus_per_node=local, gpu_mem_gib=mem)
    try:
        plan = plan_config(cfg, hw, name="this run", shape=spec)
    except PlanError as e:
        raise ConfigError(f"memory plan: {e}") from None
    for k, v in plan.model_settings.items():
        setattr(cfg.model, k, v)
    if not plan.fits and not cfg.parallel.ignore_memory_plan:
        raise ConfigError(f"memory plan {plan.refusal} (`mmpl plan` shows the terms); set "
                          "parallel.ignore_memory_plan=true to start anyway")
    return plan


def use_expandable_segments() -> None:
    """CUDA caching allocator with expandable segments (less fragmentation with rows of varying length), unless
    the user set PYTORCH_CUDA_ALLOC_CONF."""
    if torch.cuda.is_available() and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def planned_vs_measured(plan, pp_rank: int) -> str:
    """One log line: the planner's peak for this rank's pipeline stage beside the allocator's measured peak."""
    stage = plan.stages[pp_rank] if plan is not None else None
    got = torch.cuda.max_memory_allocated() / GiB
    reserved = torch.cuda.max_memory_reserved() / GiB
    if stage is None:
        return f"memory: measured peak {got:.1f} GiB allocated ({reserved:.1f} reserved)"
    want = stage.total / GiB
    return (f"memory: planned {want:.1f} GiB (stage {stage.stage}, {plan.recompute}), measured peak {got:.1f} GiB "
            f"allocated ({reserved:.1f} reserved, {got / want - 1:+.0%} vs plan)")
