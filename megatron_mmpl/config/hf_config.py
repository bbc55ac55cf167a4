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
    """A `Qwen2_5_VLConfig` for `model_cfg` (a ModelConfig), with rope_theta / rope_scaling applied when set."""
    from transformers import Qwen2_5_VLConfig

    raw = apply_overrides(load_hf_dict(model_cfg.hf_config), model_cfg.hf_overrides)
    if raw.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
        raise ConfigError(f"model.hf_config={model_cfg.hf_config!r} has model_type={raw['model_type']!r}; "
                          "only qwen2_5_vl is supported")
    hf = Qwen2_5_VLConfig(**raw)
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
    from megatron_mmpl.models.qwen25vl.configs import rope_scaling

    rope_scaling(hf)


_TEXT_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size")
_VISION_SHAPE = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                 "temporal_patch_size", "spatial_merge_size")


def shape_differences(a, b) -> list[str]:
    """The weight-shape fields in which two Qwen2.5-VL configs differ, as 'field: a vs b'."""
    from megatron_mmpl.models.qwen25vl.configs import text_config, tie_embeddings

    out = []
    for where, fields, x, y in (("", _TEXT_SHAPE, text_config(a), text_config(b)),
                                ("vision_config.", _VISION_SHAPE, a.vision_config, b.vision_config)):
        out += [f"{where}{f}: {getattr(x, f, None)} vs {getattr(y, f, None)}" for f in fields
                if getattr(x, f, None) != getattr(y, f, None)]
    if tie_embeddings(a) != tie_embeddings(b):
        out.append(f"tie_word_embeddings: {tie_embeddings(a)} vs {tie_embeddings(b)}")
    return out


def check_matches_checkpoint(hf, model_cfg, load_path: str) -> None:
    """A converted/exported checkpoint carries its model's config.json (mmpl/hf/); refuse a run whose
    model.hf_config describes other weight shapes, before anything is built."""
    from transformers import Qwen2_5_VLConfig

    saved = os.path.join(load_path, "mmpl", "hf", "config.json")
    if not os.path.isfile(saved):
        return
    with open(saved) as f:
        theirs = Qwen2_5_VLConfig(**json.load(f))
    diff = shape_differences(hf, theirs)
    if diff:
        raise ConfigError(
            f"model.hf_config={model_cfg.hf_config!r} does not describe the checkpoint at checkpoint.load="
            f"{load_path!r} (run config vs checkpoint: {'; '.join(diff)}); set model.hf_config: "
            f"{os.path.dirname(saved)} to use the checkpoint's own config"
        )


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """config.json dict with `model.hf_overrides` applied (see ModelConfig.hf_overrides)."""
    raw = dict(raw)
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if not section and isinstance(raw.get("text_config"), dict) and key in raw["text_config"]:
            section, name = "text_config", key
        if section:
            if section not in ("text_config", "vision_config"):
                raise ConfigError(f"model.hf_overrides.{key}: only text_config.* and vision_config.* nest")
            raw[section] = {**(raw.get(section) or {}), name: value}
        else:
            raw[name] = value
    return raw


def check_tokens_match(hf, special_ids: dict, where: str) -> None:
    """The data's special token ids must be the model's, and inside its vocabulary."""
    pairs = {"image_pad": "image_token_id", "video_pad": "video_token_id", "vision_start": "vision_start_token_id",
             "vision_end": "vision_end_token_id"}
    bad = [f"{tok}={special_ids[tok]} vs {attr}={getattr(hf, attr, None)}" for tok, attr in pairs.items()
           if tok in special_ids and getattr(hf, attr, None) != special_ids[tok]]
    if bad:
        raise ConfigError(f"{where} was tokenized with other special ids than model.hf_config ({'; '.join(bad)}); "
                          "set them in model.hf_overrides or rebuild the data with the model's tokenizer")
    vocab = hf.get_text_config().vocab_size
    top = max(special_ids.values(), default=-1)
    if top >= vocab:
        raise ConfigError(f"{where} uses token id {top} but the model's vocab_size is {vocab}; "
                          f"set model.hf_overrides.vocab_size >= {top + 1} (a multiple of parallel.tp)")


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
