"""Training FLOPs on real tokens (causal, packed), for TFLOP/s, MFU and HFU; the ViT is counted separately.

Model FLOPs (MFU), per weight N of a matmul and per token: forward 2·N, input gradient 2·N, weight gradient 2·N
where the weight trains (`model.freeze_*`). So the LM is 6·N_nonembed per token (4·N when frozen: the gradient
still flows through it to the ViT), plus the output layer at the positions that run it (the training loss runs it
only at supervised positions, models/qwen25vl/language_model.py), plus causal attention 6·L·(heads·head_dim)·S_eff,
where for a pack S_eff = Σ s_i² / S_pack over its real segments — i.e. the pack's attention costs 6·L·d_attn·Σ s_i².
The ViT: its blocks 6·N per patch (2·N, forward only, when frozen), the patch embedding 4·N (no input gradient:
pixels), the merger 6·N (4·N when frozen in front of a trained ViT, 2·N when both are frozen: its input gradient
feeds its own norm and the ViT), and non-causal attention 12·d·u² per attention unit (a window or a whole image;
4·d·u² when frozen).

Hardware FLOPs (HFU) add the forward work the backward reruns under the run's recompute settings (`Training`):
whole LM layers (full), the MLP and/or core attention of every layer (selective), the first k ViT blocks
(per-block), or the whole ViT (chunked). Counted on the model's own widths (the ViT MLP's zero padding to a
multiple of 64 is left out), checked against torch's FlopCounterMode on the built model
(tests/distributed/test_flop_count.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_mmpl.models.qwen25vl.spec import ModelSpec

# Dense bf16 peak per device (TFLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass(frozen=True)
class Training:
    """What a step does beyond the forward: which parts get weight gradients (the freeze switches) and which
    forward work the backward reruns (resolved recompute settings: `model.recompute` is not auto here)."""

    lm: bool = True  # the LM's weights train
    vision: bool = True  # the ViT's blocks and patch embedding train
    merger: bool = True
    lm_layers_rebuilt: int = 0  # full recompute: LM layers whose whole forward is rerun
    lm_modules_rebuilt: tuple[str, ...] = ()  # selective: megatron's recompute_modules, rerun in every layer
    vit_blocks_rebuilt: int = 0  # per-block recompute: the first k ViT blocks
    vit_tower_rebuilt: bool = False  # chunked: the whole ViT (patch embedding, blocks, merger)

    @classmethod
    def of(cls, model, spec: ModelSpec, pp: int = 1, first_stage_layers: int | None = None) -> Training:
        """From a run's ModelConfig (recompute resolved; on CPU auto means none, as in train()) and its pipeline
        split (megatron's block method rebuilds the first k layers of each stage)."""
        first = first_stage_layers or spec.layers // pp
        stage_layers = [spec.layers] if pp == 1 else [first] + [(spec.layers - first) // (pp - 1)] * (pp - 1)
        lm_layers, modules = 0, ()
        if model.recompute == "selective":
            modules = tuple(model.recompute_modules)
        elif model.recompute == "full":
            k = model.recompute_num_layers
            lm_layers = sum(min(k, n) for n in stage_layers) if model.recompute_method == "block" \
                else sum(stage_layers)
        blocks = 0
        if model.vit_recompute == "full":
            k = model.vit_recompute_blocks
            blocks = spec.vision.depth if k is None else min(k, spec.vision.depth)
        return cls(lm=not model.freeze_llm, vision=not model.freeze_vision, merger=not model.freeze_merger,
                   lm_layers_rebuilt=lm_layers, lm_modules_rebuilt=modules, vit_blocks_rebuilt=blocks,
                   vit_tower_rebuilt=model.vit_recompute == "chunked")


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs of the model described by `spec` (models/qwen25vl/spec.py), trained as `training` says."""

    spec: ModelSpec
    training: Training = Training()
    attention: bool = True  # False: the matmuls with weights alone (a test compares them with torch's count)

    @classmethod
    def from_hf(cls, hf, training: Training = Training()) -> FlopModel:
        return cls(ModelSpec.of(hf), training)

    @property
    def lm_layer_params(self) -> tuple[int, int]:
        """Matmul weights of one decoder layer: (attention's qkv + out proj, the gated MLP); norms and biases are
        negligible."""
        m = self.spec
        return m.hidden * (m.q_dim + 2 * m.kv_dim) + m.q_dim * m.hidden, 3 * m.hidden * m.ffn

    @property
    def lm_nonembed_params(self) -> int:
        return self.spec.layers * sum(self.lm_layer_params)

    @property
    def vit_block_params(self) -> int:
        v = self.spec.vision
        return 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size

    @property
    def vit_merger_params_per_patch(self) -> float:
        v = self.spec.vision
        return (v.merged_hidden**2 + v.merged_hidden * v.out_hidden_size) / v.spatial_merge_size**2

    @property
    def vit_params_per_patch(self) -> float:
        """Blocks and merger (the patch embedding is counted apart: it has no input gradient)."""
        return self.spec.vision.depth * self.vit_block_params + self.vit_merger_params_per_patch

    def lm_flops(self, segment_lengths: list[int], head_tokens: int | None = None) -> float:
        """Training FLOPs of one packed row with these real segment lengths (padding excluded).

        head_tokens: positions that run the output layer (our loss skips unsupervised ones; default: all)."""
        tokens = sum(segment_lengths)
        head_tokens = tokens if head_tokens is None else head_tokens
        m = self.spec
        per_weight = 4 + 2 * self.training.lm
        dense = per_weight * (self.lm_nonembed_params * tokens + m.hidden * m.vocab * head_tokens)
        return float(dense + 3 * self._lm_attention(segment_lengths, m.layers))

    def _lm_attention(self, segment_lengths: list[int], layers: int) -> float:
        """Causal attention forward of `layers` layers over packed segments: 2·L·d_attn·Σ s_i²."""
        return 2.0 * self.attention * layers * self.spec.q_dim * sum(s * s for s in segment_lengths)

    def _vit_units(self, image_grid_thw) -> tuple[int, float, float]:
        """(patches, Σ u² over one windowed block's windows, Σ u² over one full-attention block's frames)."""
        v = self.spec.vision
        side = max(1, v.window_size // v.patch_size)  # patches per side of an attention window
        patches, windowed, full = 0, 0.0, 0.0
        for t, h, w in (tuple(int(x) for x in g) for g in image_grid_thw):
            patches += t * h * w
            unit = min(h * w, side**2)  # patches per window (edge windows counted full)
            windowed += t * math.ceil(h / side) * math.ceil(w / side) * unit**2
            full += t * (h * w) ** 2
        return patches, windowed, full

    def _vit_attention(self, units: tuple[int, float, float], blocks: int) -> float:
        """Non-causal attention forward of the first `blocks` ViT blocks (`units`: `_vit_units`): 4·d·Σ u² per
        block."""
        v = self.spec.vision
        _, windowed, full = units
        n_full = sum(1 for i in v.fullatt_block_indexes if i < blocks)
        return 4.0 * self.attention * v.hidden_size * ((blocks - n_full) * windowed + n_full * full)

    def vit_flops(self, image_grid_thw) -> float:
        """Training FLOPs of the ViT for images with these (t, h, w) patch grids."""
        tr, v = self.training, self.spec.vision
        units = self._vit_units(image_grid_thw)
        patches = units[0]
        blocks = (6 if tr.vision else 2) * v.depth * self.vit_block_params
        # its input gradient reaches the merger's own norm (ln_q) and a trained ViT
        merger = (2 + 2 * tr.merger + 2 * (tr.merger or tr.vision)) * self.vit_merger_params_per_patch
        embed = (2 + 2 * tr.vision) * v.patch_dim * v.hidden_size
        attention = (3 if tr.vision else 1) * self._vit_attention(units, v.depth)
        return float(patches * (blocks + merger + embed) + attention)

    def rebuilt_flops(self, segment_lengths: list[int], image_grid_thw=()) -> float:
        """Forward FLOPs the backward reruns for one row (the recompute of `training`): HFU counts them, MFU not."""
        tr, m, v = self.training, self.spec, self.spec.vision
        tokens = sum(segment_lengths)
        attn_linear, mlp = self.lm_layer_params
        lm = tr.lm_layers_rebuilt * 2 * (attn_linear + mlp) * tokens \
            + self._lm_attention(segment_lengths, tr.lm_layers_rebuilt)
        if "mlp" in tr.lm_modules_rebuilt:
            lm += m.layers * 2 * mlp * tokens
        if "core_attn" in tr.lm_modules_rebuilt:
            lm += self._lm_attention(segment_lengths, m.layers)
        units = self._vit_units(image_grid_thw)
        patches = units[0]
        if tr.vit_tower_rebuilt and (tr.vision or tr.merger):  # the chunk's checkpoint reruns it all
            vit = patches * 2 * (self.vit_params_per_patch + v.patch_dim * v.hidden_size) \
                + self._vit_attention(units, v.depth)
        elif tr.vit_blocks_rebuilt and tr.vision:  # a frozen ViT's blocks have no backward to rerun them for
            vit = patches * 2 * tr.vit_blocks_rebuilt * self.vit_block_params \
                + self._vit_attention(units, tr.vit_blocks_rebuilt)
        else:
            vit = 0.0
        return float(lm + vit)


def peak_tflops(override: float | None) -> float | None:
    """Peak dense TFLOP/s of this device (None on CPU or an unknown GPU unless given)."""
    if override:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
