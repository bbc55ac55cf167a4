"""Megatron DDP + DistributedOptimizer (AdamW, fp32 master weights) + warmup/cosine scheduler; freeze switches."""

from __future__ import annotations

import torch

from megatron_mmpl.compat.optimizer import use_fused_adam
from megatron_mmpl.config import Config, train_steps, warmup_steps

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def freeze(module: torch.nn.Module, cfg: Config) -> dict[str, int]:
    """Apply model.freeze_* by name: ViT blocks/patch embed, the merger, the LM. Returns frozen counts."""
    m = cfg.model
    counts = {"vision": 0, "merger": 0, "llm": 0}
    for name, p in module.named_parameters():
        part = param_part(name)
        if (part == "vision" and m.freeze_vision) or (part == "merger" and m.freeze_merger) or \
                (part == "llm" and m.freeze_llm):
            p.requires_grad_(False)
            counts[part] += p.numel()
    return counts


# The merger (HF `visual.merger`): the ViT's final norm (ln_q) and the projector MLP.
MERGER_PREFIXES = ("vision_model.projection.", "vision_model.decoder.final_layernorm.")


def param_part(name: str) -> str:
    """'vision' | 'merger' | 'llm' for a parameter name of the Qwen2.5-VL megatron model."""
    if name.startswith(MERGER_PREFIXES):
        return "merger"
    return "vision" if name.startswith("vision_model.") else "llm"


def wrap_ddp(module, cfg: Config):
    """Megatron DistributedDataParallel with the distributed optimizer's grad buffers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=False, overlap_param_gather=False,
        grad_reduce_in_fp32=True,
        check_for_nan_in_grad=False,  # the trainer skips and counts non-finite steps itself (train.py)
    )
    return DistributedDataParallel(config=module.config, ddp_config=ddp_cfg, module=module)


def build_optimizer(model, cfg: Config):
    """`get_megatron_optimizer` (AdamW, decoupled wd, no wd on norms/biases) + OptimizerParamScheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optim
    dtype = DTYPES[cfg.model.dtype]
    ocfg = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
        adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, decoupled_weight_decay=True,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=True, main_grads_dtype=torch.float32, main_params_dtype=torch.float32,
    )
    # Megatron's default groups: weight decay off for biases and 1-D params (norm weights), on for the rest.
    optimizer = get_megatron_optimizer(ocfg, [model])
    use_fused_adam(optimizer)  # torch's one-kernel AdamW on CUDA (megatron picks foreach without TE/apex)
    return optimizer, build_scheduler(optimizer, cfg)


def build_scheduler(optimizer, cfg: Config):
    """Linear warmup from 0, then cosine (or linear/constant) decay to optim.min_lr at the last step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, steps = cfg.optim, train_steps(cfg)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup_steps(cfg),
        lr_decay_steps=steps, lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
    )


def current_lr(optimizer) -> float:
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])
