"""Shared by the trainer's distributed tests: tiny-run configs, a TP1 start checkpoint, run-and-collect in ranks."""

from __future__ import annotations

import os

# The tiny model with the tiny tokenizer's special ids (`mmpl data synth --kind needle` uses that tokenizer).
TINY_MODEL = [
    "model.hf_config=tiny", "model.dtype=fp32",
    "model.hf_overrides={vocab_size: 512, image_token_id: 492, video_token_id: 493, vision_start_token_id: 489, "
    "vision_end_token_id: 490}",
]
BASE = [
    *TINY_MODEL, "data.global_batch_size=2", "data.micro_batch_size=1", "data.max_seq_len=1024",
    "data.min_len=1", "data.max_len=8192", "data.recipe=pool_native", "data.task_weights={extraction: 1}",
    "data.num_workers=0",
    "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup=1", "optim.clip_grad=1.0", "logging.interval=1",
    "logging.progress_bar=false", "checkpoint.interval=1000",
]


def needle_shards(path: str, per_target: int = 8, seed: int = 0, targets=(256, 512)) -> str:
    """Visual-needle shards (`per_target` samples per target length, tiny tokenizer), written once per directory."""
    if not os.path.isfile(os.path.join(path, "index.json")):
        from megatron_mmpl.data.images import ImageProcessor
        from megatron_mmpl.data.synth import write_synth
        from megatron_mmpl.data.tokenizer import load_tokenizer

        write_synth(path, targets=list(targets), per_target=per_target, tokenizer=load_tokenizer("tiny"),
                    tokenizer_name="tiny", improc=ImageProcessor(), seed=seed, kind="needle")
    return path


def overrides(tmp: str, *extra: str) -> list[str]:
    shards = needle_shards(os.path.join(tmp, "shards"))
    return [*BASE, f"data.shards={shards}", *extra]


def save_start_checkpoint(path: str, seed: int = 0, extra: tuple = ()) -> dict:
    """A TP1/PP1 model-only dist checkpoint (what `mmpl convert` writes), so every layout starts equal.
    Returns its weights."""
    import torch
    from megatron.core import dist_checkpointing

    from megatron_mmpl.config.hf_config import resolve_hf_config
    from megatron_mmpl.config.load import load_config
    from megatron_mmpl.parallel.process_groups import initialize_parallel
    from megatron_mmpl.training.model_provider import build_model_chunk

    layout = initialize_parallel()
    torch.manual_seed(seed)
    cfg = load_config(None, [*TINY_MODEL, *extra])
    module = build_model_chunk(cfg, resolve_hf_config(cfg.model), layout)
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save({"model": module.sharded_state_dict()}, path)
    from megatron_mmpl.models.qwen25vl.build import gather_full_weights

    return gather_full_weights(module)


def run_training(args: list[str], max_steps: int | None = None, env: dict | None = None) -> dict:
    """In a rank: train with `args` overrides; return losses, last step and this rank's full-named weights."""
    os.environ.update(env or {})
    from megatron_mmpl.config import load_config
    from megatron_mmpl.models.qwen25vl.build import gather_full_weights
    from megatron_mmpl.training.train import train

    result = train(load_config(None, args), max_steps=max_steps)
    return {"losses": result.losses, "step": result.step, "weights": gather_full_weights(result.model),
            "checkpoint": result.checkpoint, "stopped": result.stopped_by_signal,
            "weight_decay": weight_decay_by_param(result)}


def weight_decay_by_param(result) -> dict[str, float]:
    """name → weight-decay multiplier in the optimizer's param groups (megatron's grouping of our model)."""
    from megatron.core.optimizer import _get_param_groups

    opt = result.optimizer.chained_optimizers[0]
    names = {id(p): n for n, p in result.model.named_parameters()}
    groups = _get_param_groups([result.model], opt.config, None)
    return {names[id(p)]: g["wd_mult"] for g in groups for p in g["params"]}


def merged_weights(per_rank: list[dict]) -> dict:
    out = {}
    for r in per_rank:
        out.update(r["weights"])
    return out
