"""Which core-attention kernel runs: a name on the TransformerConfig (or the layer spec), resolved per device.

Backends: "sdpa" (torch SDPA per packed segment: cuDNN/flash on GPU, math on CPU), "flex" (FlexAttention with a
document mask: one kernel for many short segments), "te" (Transformer Engine's DotProductAttention, needs TE),
"auto" (the default: sdpa on CPU; on GPU sdpa, or flex when a pack holds many short segments).
"""

from __future__ import annotations

import importlib.util

BACKENDS = ("auto", "sdpa", "flex", "te")
CONFIG_ATTR = "mmpl_attention_backend"
# "auto" on GPU switches to flex when a pack has at least this many segments and they are this short on average.
FLEX_MIN_SEGMENTS = 32
FLEX_MAX_MEAN_LEN = 2048


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    if name == "te" and not te_available():
        raise ValueError("attention backend 'te' needs transformer_engine, which is not importable; use 'sdpa'")
    return name


def set_attention_backend(config, name: str):
    """Record the backend on a megatron TransformerConfig (read by CoreAttention at construction)."""
    setattr(config, CONFIG_ATTR, check_backend(name))
    return config


def configured_backend(config, override: str | None = None) -> str:
    """Spec argument beats the config attribute beats "auto"."""
    return check_backend(override or getattr(config, CONFIG_ATTR, None) or "auto")


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def auto_backend(device_type: str, num_segments: int, mean_len: float) -> str:
    """The per-call choice of "auto"."""
    if device_type != "cuda":
        return "sdpa"
    if num_segments >= FLEX_MIN_SEGMENTS and mean_len <= FLEX_MAX_MEAN_LEN:
        return "flex"
    return "sdpa"
