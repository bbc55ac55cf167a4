"""Training FLOPs on real tokens (causal, packed), for TFLOP/s and MFU; the ViT is counted separately.

LM, per token: 6·N_nonembed, plus 6·h·V per token that runs the output layer (the training loss runs it only at
supervised positions, models/qwen25vl/language_model.py), plus attention 6·L·(heads·head_dim)·S_eff, where for a pack
S_eff = Σ s_i² / S_pack over its real segments — i.e. the pack's attention costs 6·L·d_attn·Σ s_i².
ViT: 6·N_vit per patch plus non-causal attention 12·d·u² per attention unit (a window or a whole image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Dense bf16 peak per device (TFLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass(frozen=True)
class FlopModel:
    """The shape facts the count needs, read from the HF config."""

    layers: int
    hidden: int
    attn_dim: int  # heads · head_dim
    ffn: int
    kv_dim: int  # kv groups · head_dim
    vocab: int
    vit_layers: int
    vit_hidden: int
    vit_ffn: int
    vit_out: int
    merge: int
    window_patches: int  # patches per side of a ViT attention window
    vit_full_layers: int

    @classmethod
    def from_hf(cls, hf) -> FlopModel:
        t, v = hf.get_text_config(), hf.vision_config
        head = t.hidden_size // t.num_attention_heads
        return cls(
            layers=t.num_hidden_layers, hidden=t.hidden_size, attn_dim=t.num_attention_heads * head,
            ffn=t.intermediate_size, kv_dim=t.num_key_value_heads * head, vocab=t.vocab_size,
            vit_layers=v.depth, vit_hidden=v.hidden_size, vit_ffn=v.intermediate_size, vit_out=v.out_hidden_size,
            merge=v.spatial_merge_size, window_patches=max(1, v.window_size // v.patch_size),
            vit_full_layers=len(v.fullatt_block_indexes),
        )

    @property
    def lm_nonembed_params(self) -> int:
        """Matmul weights per token of the decoder: qkv, out proj, gated MLP (norms/biases are negligible)."""
        attn = self.hidden * (self.attn_dim + 2 * self.kv_dim) + self.attn_dim * self.hidden
        mlp = 3 * self.hidden * self.ffn
        return self.layers * (attn + mlp)

    @property
    def vit_params_per_patch(self) -> float:
        blocks = self.vit_layers * (4 * self.vit_hidden**2 + 3 * self.vit_hidden * self.vit_ffn)
        merged = self.vit_hidden * self.merge**2
        merger = (merged * merged + merged * self.vit_out) / self.merge**2  # per patch
        return blocks + merger

    def lm_flops(self, segment_lengths: list[int], head_tokens: int | None = None) -> float:
        """Training FLOPs of one packed row with these real segment lengths (padding excluded).

        head_tokens: positions that run the output layer (our loss skips unsupervised ones; default: all)."""
        tokens = sum(segment_lengths)
        head_tokens = tokens if head_tokens is None else head_tokens
        dense = 6 * self.lm_nonembed_params * tokens + 6 * self.hidden * self.vocab * head_tokens
        attn = 6 * self.layers * self.attn_dim * sum(s * s for s in segment_lengths)
        return float(dense + attn)

    def vit_flops(self, image_grid_thw) -> float:
        """Training FLOPs of the ViT for images with these (t, h, w) patch grids."""
        total = 0.0
        w2 = self.window_patches**2
        for t, h, w in (tuple(int(x) for x in g) for g in image_grid_thw):
            patches = t * h * w
            windows = t * math.ceil(h / self.window_patches) * math.ceil(w / self.window_patches)
            unit = min(h * w, w2)  # patches per window (edge windows counted full)
            full = self.vit_full_layers * t * (h * w) ** 2
            windowed = (self.vit_layers - self.vit_full_layers) * windows * unit**2
            total += 6 * self.vit_params_per_patch * patches + 12 * self.vit_hidden * (full + windowed)
        return total


def peak_tflops(override: float | None) -> float | None:
    """Peak dense TFLOP/s of this device (None on CPU or an unknown GPU unless given)."""
    if override:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
