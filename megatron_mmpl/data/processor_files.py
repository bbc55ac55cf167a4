"""Tokenizer, image-processor and chat-template files for an exported checkpoint that has no source copy of them
(e.g. a model trained from a preset with our offline tokenizer), in the layout of the released Qwen2.5-VL repos."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_mmpl.data.chat_template import QWEN25VL_CHAT_TEMPLATE
from megatron_mmpl.data.images import CLIP_MEAN, CLIP_STD
from megatron_mmpl.data.tokenizer import load_tokenizer, special_ids


def write_processor_files(out: Path, hf_config, tokenizer_spec: str, min_pixels: int = 3136,
                          max_pixels: int = 12845056) -> None:
    """Write tokenizer files, preprocessor_config.json and chat_template.json into `out`."""

    tok = load_tokenizer(tokenizer_spec)
    ids = special_ids(tok)
    expected = {"image_pad": hf_config.image_token_id, "video_pad": hf_config.video_token_id,
                "vision_start": hf_config.vision_start_token_id}
    wrong = {k: (getattr(ids, k), v) for k, v in expected.items() if getattr(ids, k) != v}
    if wrong:
        raise ValueError(
            f"tokenizer {tokenizer_spec!r} disagrees with the model config on special ids "
            f"{ {k: f'tokenizer {a} vs config {b}' for k, (a, b) in wrong.items()} }; pass the tokenizer the model "
            "was trained with (--tokenizer)"
        )
    tok.save_pretrained(out)
    vc = hf_config.vision_config
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": vc.patch_size, "temporal_patch_size": vc.temporal_patch_size,
        "merge_size": vc.spatial_merge_size,
    }, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN25VL_CHAT_TEMPLATE}, indent=2))
