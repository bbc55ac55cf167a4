"""Plain-Python checks of a Config, before any process group or tensor exists; each error names the field."""

from __future__ import annotations

import math
import re

from megatron_mmpl.config.hf_config import resolve_hf_dict
from megatron_mmpl.config.load import ConfigError
from megatron_mmpl.config.schema import Config
from megatron_mmpl.models.qwen25vl.spec import ModelSpec

_CHOICES = {
    "model.dtype": ("bf16", "fp16", "fp32"),
    "model.recompute": ("auto", "none", "selective", "full"),
    "model.recompute_method": ("uniform", "block"),
    "model.vit_recompute": ("full", "chunked", "none"),
    "model.attention_backend": ("auto", "sdpa", "flex", "te"),
    "optim.decay_style": ("cosine", "linear", "constant"),
    "checkpoint.on_corrupt": ("fallback", "fail"),
}


# megatron's recompute_modules for the dense layers this trainer builds; not "layernorm": megatron-core 0.16.1's
# CheckpointWithoutOutput takes its fp8 path whenever it is built (`fp8 is not None`), which needs Transformer Engine
RECOMPUTE_MODULES = ("core_attn", "mlp")


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate_config(cfg: Config) -> None:
    """Value checks that need neither the world size nor the model architecture."""
    for name, choices in _CHOICES.items():
        if _get(cfg, name) not in choices:
            raise ConfigError(f"{name}={_get(cfg, name)!r} must be one of {' | '.join(choices)}")
    modules = cfg.model.recompute_modules
    if cfg.model.recompute == "selective" and (not modules or set(modules) - set(RECOMPUTE_MODULES)):
        raise ConfigError(f"model.recompute_modules={modules} must be a non-empty list of "
                          f"{' | '.join(RECOMPUTE_MODULES)}")
    positive = ("parallel.tp", "parallel.pp", "parallel.cp", "data.micro_batch_size", "data.global_batch_size",
                "data.max_seq_len", "data.min_len", "checkpoint.interval", "logging.interval",
                "model.recompute_num_layers", "model.vit_chunk_patches", "optim.max_bad_steps", "parallel.timeout_s")
    for name in positive:
        if _get(cfg, name) < 1:
            raise ConfigError(f"{name}={_get(cfg, name)} must be >= 1")
    for name in ("data.num_workers", "checkpoint.keep_last", "optim.lr", "optim.min_lr", "optim.warmup",
                 "optim.weight_decay", "optim.clip_grad", "optim.eps"):
        if _get(cfg, name) < 0:
            raise ConfigError(f"{name}={_get(cfg, name)} must be >= 0")
    d, o, s, p = cfg.data, cfg.optim, cfg.schedule, cfg.parallel
    if not re.fullmatch(r"balanced|pool_native|target:\d+", d.recipe):
        raise ConfigError(f"data.recipe={d.recipe!r} must be balanced | pool_native | target:N (N tokens)")
    if d.min_len > d.max_len:
        raise ConfigError(f"data.min_len={d.min_len} is above data.max_len={d.max_len}")
    if d.micro_batch_size != 1:
        raise ConfigError(f"data.micro_batch_size={d.micro_batch_size}: a micro-batch is one packed row (b=1); "
                          "raise data.max_seq_len or data.global_batch_size instead")
    if d.global_batch_size % d.micro_batch_size:
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                          f"data.micro_batch_size={d.micro_batch_size}")
    if any(not 0 < w < 1 for w in d.sources.values()) or sum(d.sources.values()) >= 1:
        raise ConfigError(f"data.sources={d.sources}: each token share must be in (0, 1) and their sum below 1 "
                          "(data.shards gets the rest)")
    if not d.task_weights or any(w < 0 for w in d.task_weights.values()) or sum(d.task_weights.values()) <= 0:
        raise ConfigError(f"data.task_weights={d.task_weights} needs non-negative weights with a positive sum")
    if not d.shards:
        raise ConfigError("data.shards is empty; point it at the output of `mmpl data build`")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}")
    for name in ("optim.beta1", "optim.beta2"):
        if not 0 <= _get(cfg, name) < 1:
            raise ConfigError(f"{name}={_get(cfg, name)} must be in [0, 1)")
    if s.train_steps is None and s.train_tokens is None:
        raise ConfigError("schedule.train_steps and schedule.train_tokens are both null; set one")
    for name in ("schedule.train_steps", "schedule.train_tokens"):
        if _get(cfg, name) is not None and _get(cfg, name) < 1:
            raise ConfigError(f"{name}={_get(cfg, name)} must be >= 1")
    if warmup_steps(cfg) >= train_steps(cfg):
        raise ConfigError(f"optim.warmup={o.warmup} gives {warmup_steps(cfg)} warmup steps, not fewer than the "
                          f"{train_steps(cfg)} train steps")
    prof = cfg.logging.profile_steps
    if prof is not None and (len(prof) != 2 or not 1 <= prof[0] <= prof[1]):
        raise ConfigError(f"logging.profile_steps={prof} must be [first, last] with 1 <= first <= last")
    m = cfg.model
    if m.vit_recompute_blocks is not None and (m.vit_recompute != "full" or m.vit_recompute_blocks < 0):
        raise ConfigError(f"model.vit_recompute_blocks={m.vit_recompute_blocks} needs model.vit_recompute=full and "
                          "a count >= 0 (null: every block)")
    if m.freeze_vision and m.freeze_merger and m.freeze_llm:
        raise ConfigError("model.freeze_vision, freeze_merger and freeze_llm are all true: nothing to train")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.first_stage_layers is not None and p.pp == 1:
        raise ConfigError(f"parallel.first_stage_layers={p.first_stage_layers} needs parallel.pp > 1")
    if p.cp > 1 and d.max_seq_len % (2 * p.cp):
        raise ConfigError(f"data.max_seq_len={d.max_seq_len} must be a multiple of 2*parallel.cp={2 * p.cp}")


def train_steps(cfg: Config) -> int:
    """Optimizer steps of the run: schedule.train_steps, else the token budget over tokens per step."""
    if cfg.schedule.train_steps is not None:
        return cfg.schedule.train_steps
    per_step = cfg.data.global_batch_size * cfg.data.max_seq_len
    return math.ceil(cfg.schedule.train_tokens / per_step)


def warmup_steps(cfg: Config) -> int:
    w = cfg.optim.warmup
    return int(w) if w >= 1 else int(round(w * train_steps(cfg)))


def validate_layout(cfg: Config, world_size: int, spec: ModelSpec | None = None) -> int:
    """Check parallel degrees against the world size and the model's shapes; return the data-parallel size.

    `spec` is the model's (resolved from model.hf_config and model.hf_overrides when omitted).
    """
    p, d = cfg.parallel, cfg.data
    mp = p.tp * p.pp * p.cp
    if world_size % mp:
        raise ConfigError(f"parallel.tp*pp*cp={p.tp}*{p.pp}*{p.cp}={mp} does not divide the world size "
                          f"{world_size}; launch a multiple of {mp} ranks or change parallel.tp/pp/cp")
    dp = world_size // mp
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                          f"micro_batch_size*dp={d.micro_batch_size}*{dp}")
    if spec is None:
        spec = ModelSpec.from_hf(resolve_hf_dict(cfg.model))
    name = cfg.model.hf_config
    dims = {
        "LM attention heads": spec.heads,
        "LM KV groups": spec.kv_groups,
        "LM FFN size": spec.ffn,
        "ViT heads": spec.vision.num_heads,
        "ViT FFN size (built zero-padded, models/qwen25vl/padding.py)": spec.vision.built_ffn,
        "merger hidden size": spec.vision.merged_hidden,
        "vocab size": spec.vocab,
    }
    for what, n in dims.items():
        if n % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide {what}={n} of model {name!r}; "
                              f"use a tp that divides {n}")
    blocks = cfg.model.vit_recompute_blocks
    if blocks is not None and blocks > spec.vision.depth:
        raise ConfigError(f"model.vit_recompute_blocks={blocks} is above the {spec.vision.depth} ViT blocks of "
                          f"{name!r}; use at most {spec.vision.depth} (or null: every block)")
    layers = spec.layers
    if p.pp > 1:
        first = p.first_stage_layers
        if first is None:
            if layers % p.pp:
                raise ConfigError(f"parallel.pp={p.pp} does not divide the {layers} LM layers of {name!r}; "
                                  "set parallel.first_stage_layers or another pp")
        else:
            rest = layers - first
            if not 0 < first < layers or rest % (p.pp - 1):
                raise ConfigError(f"parallel.first_stage_layers={first}: the other {rest} of {layers} LM layers "
                                  f"must split evenly over pp-1={p.pp - 1} stages")
    elif layers < 1:
        raise ConfigError(f"model {name!r} has no LM layers")
    return dp
