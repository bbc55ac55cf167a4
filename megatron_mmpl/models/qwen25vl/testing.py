"""Test fixtures shared by model, conversion and training tests: tiny random transformers Qwen2.5-VL models and
multimodal prompts built like the processor builds them (vision start/pad/end tokens, patchified pixels)."""

from __future__ import annotations

import math

import torch

from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset
from megatron_mmpl.models.qwen25vl.rope_index import rope_index, rope_index_kwargs


def tiny_hf_model(preset: str = "tiny", seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A random-init fp32 transformers `Qwen2_5_VLForConditionalGeneration` (eval mode) with O(1) activations.

    transformers' init (std 0.02) makes tiny models nearly linear with logits ~1e-2, which would let a wrong
    layout pass a 1e-4 check; weights are redrawn with unit-gain scales instead.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = hf_config_from_preset(preset, **overrides)
    cfg._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = attn_implementation
    cfg.text_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # linear / conv / embedding
                fan_in = p[0].numel() if "embed_tokens" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name.split(".")[-2] or name.split(".")[-2] == "ln_q":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # biases
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def mm_prompt(hf_config, parts, seed: int = 0) -> dict:
    """A one-sample batch from `parts`: ints are runs of random text tokens, ("image", t, h, w) and
    ("video", t, h, w, seconds_per_grid) are vision items (grid in patches). Returns input_ids [1, s],
    position_ids [3, 1, s] and the pixel tensors/grids transformers and our model take."""
    g = torch.Generator().manual_seed(seed)
    vc = hf_config.vision_config
    m = vc.spatial_merge_size
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    text_hi = min(hf_config.image_token_id, hf_config.video_token_id, hf_config.vision_start_token_id)
    ids, img_grid, img_pix, vid_grid, vid_pix, secs = [], [], [], [], [], []
    for p in parts:
        if isinstance(p, int):
            ids += torch.randint(0, text_hi, (p,), generator=g).tolist()
            continue
        kind, t, h, w = p[:4]
        pad = hf_config.image_token_id if kind == "image" else hf_config.video_token_id
        ids += [hf_config.vision_start_token_id] + [pad] * (t * h * w // m**2) + [hf_config.vision_end_token_id]
        pix = torch.randn(t * h * w, patch_dim, generator=g)
        if kind == "image":
            img_grid.append([t, h, w])
            img_pix.append(pix)
        else:
            vid_grid.append([t, h, w])
            vid_pix.append(pix)
            secs.append(p[4] if len(p) > 4 else 1.0)
    batch = {"input_ids": torch.tensor([ids])}
    if img_grid:
        batch.update(pixel_values=torch.cat(img_pix), image_grid_thw=torch.tensor(img_grid))
    if vid_grid:
        batch.update(pixel_values_videos=torch.cat(vid_pix), video_grid_thw=torch.tensor(vid_grid),
                     second_per_grid_ts=torch.tensor(secs))
    pos, _ = rope_index(batch["input_ids"][0], batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                        batch.get("second_per_grid_ts"), **rope_index_kwargs(hf_config))
    batch["position_ids"] = pos[:, None, :]
    return batch


def hf_logits(hf_model, batch: dict) -> torch.Tensor:
    """transformers' logits [b, s, V] for a batch from `mm_prompt` (positions given explicitly)."""
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return hf_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    **{k: batch[k] for k in keys if k in batch}).logits
