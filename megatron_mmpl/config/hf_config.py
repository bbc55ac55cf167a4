"""`model.hf_config` (a preset name or a config.json path) → a config.json dict / a transformers `Qwen2_5_VLConfig`;
checks of a run's model against its checkpoint and its data."""

from __future__ import annotations

import json
import os

from megatron_mmpl.config.load import ConfigError
from megatron_mmpl.models.qwen25vl.presets import PRESETS, load_hf_dict
from megatron_mmpl.models.qwen25vl.spec import ModelSpec, weight_shape_differences
from megatron_mmpl.storage.checkpoint_dir import HF_DIR


def preset_names() -> list[str]:
    return sorted(PRESETS)


def resolve_hf_dict(model_cfg) -> dict:
    """`model.hf_config` (presets.load_hf_dict: a preset or a config.json) with `model.hf_overrides` applied, as
    a config.json dict: what the planner reads (no transformers import) and `resolve_hf_config` builds on."""
    try:
        raw = apply_overrides(load_hf_dict(model_cfg.hf_config), model_cfg.hf_overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if raw.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
        raise ConfigError(f"model.hf_config={model_cfg.hf_config!r} has model_type={raw['model_type']!r}; "
                          "only qwen2_5_vl is supported")
    return raw


def resolve_hf_config(model_cfg):
    """A `Qwen2_5_VLConfig` for `model_cfg` (a ModelConfig), with rope_theta / rope_scaling applied when set."""
    from transformers import Qwen2_5_VLConfig  # lazy: transformers' import costs seconds

    hf = Qwen2_5_VLConfig(**resolve_hf_dict(model_cfg))
    try:
        apply_rope_overrides(hf, model_cfg.rope_theta, model_cfg.rope_scaling)
    except ValueError as e:
        raise ConfigError(f"model.rope_scaling={model_cfg.rope_scaling!r}: {e}") from None
    return hf


def apply_rope_overrides(hf, rope_theta: float | None, scaling: dict | None) -> None:
    """Write a RoPE base and/or length-extension settings (HF keys) into a Qwen2.5-VL config's text
    `rope_parameters`, where transformers and our model both read them; ValueError for an unsupported type."""
    if rope_theta is None and not scaling:
        return
    text = hf.get_text_config()
    params = dict(getattr(text, "rope_parameters", None) or {})
    if rope_theta is not None:
        params["rope_theta"] = float(rope_theta)
    if scaling:
        params.update(scaling)
    text.rope_parameters = params
    ModelSpec.from_hf(hf)  # refuses unsupported scaling types


def check_matches_checkpoint(spec: ModelSpec, model_cfg, load_path: str) -> None:
    """A converted/exported checkpoint carries its model's config.json (mmpl/hf/); refuse a run whose
    model.hf_config describes other weight shapes, before anything is built."""
    saved = os.path.join(load_path, HF_DIR, "config.json")
    if not os.path.isfile(saved):
        return
    with open(saved) as f:
        theirs = ModelSpec.from_hf(json.load(f))
    diff = weight_shape_differences(spec, theirs)
    if diff:
        raise ConfigError(
            f"model.hf_config={model_cfg.hf_config!r} does not describe the checkpoint at checkpoint.load="
            f"{load_path!r} (run config vs checkpoint: {'; '.join(diff)}); set model.hf_config: "
            f"{os.path.dirname(saved)} to use the checkpoint's own config"
        )


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """config.json dict with `model.hf_overrides` applied (see ModelConfig.hf_overrides): `section.name` keys and
    `{section: {name: value}}` both set one field of text_config / vision_config, keeping the section's others.
    In a flat config.json (Qwen2.5-VL's own: the LM's fields at the top level, no text_config) a text_config.*
    field is set at the top level, where transformers reads it; creating a text_config there would make
    transformers ignore the top-level fields and build a default-sized LM."""
    raw = dict(raw)
    pairs = []
    for key, value in overrides.items():
        if key in ("text_config", "vision_config") and isinstance(value, dict):
            pairs += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            pairs.append((key, value))
    for key, value in pairs:
        section, _, name = key.rpartition(".")
        if not section and isinstance(raw.get("text_config"), dict) and key in raw["text_config"]:
            section, name = "text_config", key
        if section not in ("", "text_config", "vision_config"):
            raise ConfigError(f"model.hf_overrides.{key}: only text_config.* and vision_config.* nest")
        if section == "text_config" and not isinstance(raw.get("text_config"), dict):
            section = ""  # a flat config.json
        if section:
            raw[section] = {**(raw.get(section) or {}), name: value}
        else:
            raw[name] = value
    return raw


def check_tokens_match(spec: ModelSpec, special_ids: dict, where: str) -> None:
    """The data's special token ids must be the model's, and inside its vocabulary."""
    t = spec.tokens
    pairs = {"image_pad": ("image_token_id", t.image), "video_pad": ("video_token_id", t.video),
             "vision_start": ("vision_start_token_id", t.vision_start),
             "vision_end": ("vision_end_token_id", t.vision_end)}
    bad = [f"{tok}={special_ids[tok]} vs {attr}={ours}" for tok, (attr, ours) in pairs.items()
           if tok in special_ids and ours != special_ids[tok]]
    if bad:
        raise ConfigError(f"{where} was tokenized with other special ids than model.hf_config ({'; '.join(bad)}); "
                          "set them in model.hf_overrides or rebuild the data with the model's tokenizer")
    vocab = spec.vocab
    top = max(special_ids.values(), default=-1)
    if top >= vocab:
        raise ConfigError(f"{where} uses token id {top} but the model's vocab_size is {vocab}; "
                          f"set model.hf_overrides.vocab_size >= {top + 1} (a multiple of parallel.tp)")
