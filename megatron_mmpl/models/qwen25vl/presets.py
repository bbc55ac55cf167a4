"""Qwen2.5-VL configurations as data: the released checkpoints' config.json fields, and tiny test models.

The released models' fields are written here (nothing is downloaded); they are the hub `config.json` files of
Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct in their original (transformers 4.4x) layout: text fields at the top
level, `rope_theta` + `rope_scaling.mrope_section`. The tiny configs use the transformers-5 layout
(`text_config` / `vision_config` / `rope_parameters`), so both layouts are exercised.

The ViT is the same architecture in every size, but its MLP width is not: 3420 in the 3B and 7B releases, 3456
(the technical report's figure) in the 32B and 72B ones — which is why the large models can run the ViT at TP=8.
"""

from __future__ import annotations

import copy
import json
import os

# Special token ids of the released tokenizer (Qwen2.5).
_TOKENS = dict(
    bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
    vision_token_id=151654, image_token_id=151655, video_token_id=151656,
)
_VISION = dict(
    depth=32, hidden_act="silu", hidden_size=1280, num_heads=16, in_chans=3,
    patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2,
)


def _released(hidden, ffn, layers, heads, kv, vocab, tied, vision_ffn) -> dict:
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", attention_dropout=0.0,
        hidden_act="silu", hidden_size=hidden, initializer_range=0.02, intermediate_size=ffn,
        max_position_embeddings=128000, max_window_layers=layers, num_attention_heads=heads,
        num_hidden_layers=layers, num_key_value_heads=kv, rms_norm_eps=1e-06, rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, sliding_window=32768,
        tie_word_embeddings=tied, torch_dtype="bfloat16", use_cache=True, use_sliding_window=False,
        vocab_size=vocab, vision_config={**_VISION, "intermediate_size": vision_ffn, "out_hidden_size": hidden},
        **_TOKENS,
    )


# Tiny models: vocab 256 with the special tokens remapped into range; ViT with several windows per image.
TINY_TOKENS = dict(
    bos_token_id=248, vision_start_token_id=249, vision_end_token_id=250, image_token_id=251, video_token_id=252,
    eos_token_id=253, vision_token_id=254,
)


def _tiny(tied: bool) -> dict:
    # tiny-tied is 3B-like twice over: tied embeddings, and a ViT MLP width that is not a multiple of 64
    # (3B: 3420), so the zero-padded build (models/qwen25vl/padding.py) is checked against transformers too.
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=TINY_TOKENS["bos_token_id"], eos_token_id=TINY_TOKENS["eos_token_id"],
        ),
        vision_config=dict(
            depth=4, hidden_size=32, intermediate_size=60 if tied else 64, num_heads=2, hidden_act="silu",
            in_channels=3,
            patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
            fullatt_block_indexes=[1, 3], out_hidden_size=64, tokens_per_second=2,
        ),
        tie_word_embeddings=tied,
        image_token_id=TINY_TOKENS["image_token_id"], video_token_id=TINY_TOKENS["video_token_id"],
        vision_start_token_id=TINY_TOKENS["vision_start_token_id"],
        vision_end_token_id=TINY_TOKENS["vision_end_token_id"],
    )


PRESETS: dict[str, dict] = {
    "qwen25vl-3b": _released(2048, 11008, 36, 16, 2, 151936, tied=True, vision_ffn=3420),
    "qwen25vl-7b": _released(3584, 18944, 28, 28, 4, 152064, tied=False, vision_ffn=3420),
    "qwen25vl-32b": _released(5120, 27648, 64, 40, 8, 152064, tied=False, vision_ffn=3456),
    "qwen25vl-72b": _released(8192, 29568, 80, 64, 8, 152064, tied=False, vision_ffn=3456),
    "tiny": _tiny(tied=False),
    "tiny-tied": _tiny(tied=True),
}


def preset_dict(name: str) -> dict:
    """A deep copy of the preset's config.json dict."""
    if name not in PRESETS:
        raise KeyError(f"unknown Qwen2.5-VL preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def hf_config_from_preset(name: str, **overrides):
    """A transformers `Qwen2_5_VLConfig` for a preset (or a config.json path); `overrides` replace top-level
    config.json fields."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**{**load_hf_dict(name), **overrides})


def load_hf_dict(spec: str) -> dict:
    """The one resolver of `model.hf_config`: a preset name (a deep copy of its dict), a config.json, or the
    directory holding one."""
    if spec in PRESETS:
        return preset_dict(spec)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"model.hf_config={spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                         "config.json / directory holding one")
    with open(path) as f:
        return json.load(f)
