"""Training FLOPs on real tokens (causal, packed), for TFLOP/s and MFU; the ViT is counted separately.

LM, per token: 6·N_nonembed, plus 6·h·V per token that runs the output layer (the training loss runs it only at
supervised positions, models/qwen25vl/language_model.py), plus attention 6·L·(heads·head_dim)·S_eff, where for a pack
S_eff = Σ s_i² / S_pack over its real segments — i.e. the pack's attention costs 6·L·d_attn·Σ s_i².
ViT: 6·N_vit per patch plus non-causal attention 12·d·u² per attention unit (a window or a whole image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_mmpl.models.qwen25vl.spec import ModelSpec

# Dense bf16 peak per device (TFLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs of the model described by `spec` (models/qwen25vl/spec.py)."""

    spec: ModelSpec

    @classmethod
    def from_hf(cls, hf) -> FlopModel:
        return cls(ModelSpec.of(hf))

    @property
    def lm_nonembed_params(self) -> int:
        """Matmul weights per token of the decoder: qkv, out proj, gated MLP (norms/biases are negligible)."""
        m = self.spec
        attn = m.hidden * (m.q_dim + 2 * m.kv_dim) + m.q_dim * m.hidden
        mlp = 3 * m.hidden * m.ffn
        return m.layers * (attn + mlp)

    @property
    def vit_params_per_patch(self) -> float:
        v = self.spec.vision
        blocks = v.depth * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size)
        merged, m2 = v.merged_hidden, v.spatial_merge_size**2
        merger = (merged * merged + merged * v.out_hidden_size) / m2  # per patch
        return blocks + merger

    def lm_flops(self, segment_lengths: list[int], head_tokens: int | None = None) -> float:
        """Training FLOPs of one packed row with these real segment lengths (padding excluded).

        head_tokens: positions that run the output layer (our loss skips unsupervised ones; default: all)."""
        tokens = sum(segment_lengths)
        head_tokens = tokens if head_tokens is None else head_tokens
        m = self.spec
        dense = 6 * self.lm_nonembed_params * tokens + 6 * m.hidden * m.vocab * head_tokens
        attn = 6 * m.layers * m.q_dim * sum(s * s for s in segment_lengths)
        return float(dense + attn)

    def vit_flops(self, image_grid_thw) -> float:
        """Training FLOPs of the ViT for images with these (t, h, w) patch grids."""
        v = self.spec.vision
        side = max(1, v.window_size // v.patch_size)  # patches per side of an attention window
        n_full = len(v.fullatt_block_indexes)
        total = 0.0
        for t, h, w in (tuple(int(x) for x in g) for g in image_grid_thw):
            patches = t * h * w
            windows = t * math.ceil(h / side) * math.ceil(w / side)
            unit = min(h * w, side**2)  # patches per window (edge windows counted full)
            full = n_full * t * (h * w) ** 2
            windowed = (v.depth - n_full) * windows * unit**2
            total += 6 * self.vit_params_per_patch * patches + 12 * v.hidden_size * (full + windowed)
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
