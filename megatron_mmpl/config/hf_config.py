"""`model.hf_config` (a preset name or a config.json path) → a transformers `Qwen2_5_VLConfig`."""

from __future__ import annotations

import json
import os

from megatron_mmpl.config.load import ConfigError


def preset_names() -> list[str]:
    from megatron_mmpl.models.qwen25vl.presets import PRESETS

    return sorted(PRESETS)


def load_hf_dict(spec: str) -> dict:
    """The raw HF config dict for a preset name (models/qwen25vl/presets.py), a config.json, or its directory."""
    from megatron_mmpl.models.qwen25vl.presets import PRESETS, preset_dict

    if spec in PRESETS:
        return preset_dict(spec)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ConfigError(
            f"model.hf_config={spec!r} is neither a preset ({', '.join(preset_names())}) nor a config.json / "
            "directory holding one"
        )
    with open(path) as f:
        return json.load(f)


def resolve_hf_config(model_cfg):
    """A `Qwen2_5_VLConfig` for `model_cfg` (a ModelConfig), with rope_theta applied when overridden."""
    from transformers import Qwen2_5_VLConfig

    raw = load_hf_dict(model_cfg.hf_config)
    if raw.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
        raise ConfigError(f"model.hf_config={model_cfg.hf_config!r} has model_type={raw['model_type']!r}; "
                          "only qwen2_5_vl is supported")
    hf = Qwen2_5_VLConfig(**raw)
    if model_cfg.rope_theta is not None:
        text = hf.get_text_config()
        params = dict(getattr(text, "rope_parameters", None) or {})
        params["rope_theta"] = float(model_cfg.rope_theta)
        text.rope_parameters = params
    return hf


def text_rope_theta(hf) -> float:
    """The LM's RoPE base from either transformers layout (rope_parameters or rope_theta)."""
    text = hf.get_text_config()
    params = getattr(text, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(text, "rope_theta", 10000.0)))


def mrope_section(hf) -> list[int]:
    """The LM's M-RoPE split of head_dim/2 over (t, h, w)."""
    text = hf.get_text_config()
    for source in (getattr(text, "rope_parameters", None), getattr(text, "rope_scaling", None)):
        if source and "mrope_section" in source:
            return list(source["mrope_section"])
    raise ConfigError("model.hf_config has no mrope_section in rope_scaling/rope_parameters")
