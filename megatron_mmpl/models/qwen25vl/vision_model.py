"""The Qwen2.5-VL vision tower on megatron modules: patch embed (a Conv3d's weight, run as one GEMM) →
TransformerBlock (window / full attention, 2D RoPE) → final RMSNorm → patch merger (m×m patches → one LM token,
2-layer MLP).
"""

from __future__ import annotations

import torch
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from torch.utils.checkpoint import checkpoint

from megatron_mmpl.attention.segments import inverse_permutation, permute_rows, to_device
from megatron_mmpl.models.qwen25vl.spec import VisionSpec
from megatron_mmpl.models.qwen25vl.specs import (
    VisionSegments,
    block_spec,
    packed_seq_params,
    projector_submodules,
)
from megatron_mmpl.models.qwen25vl.vision_geometry import (
    frame_cu_seqlens,
    patch_coords,
    rope_from_coords,
    vision_inv_freq,
    window_order,
    windows_by_size,
)


class Qwen25VisionModel(MegatronModule):
    """pixel_values [n_patches, C·T·P·P] + grid_thw [n, 3] → merged tokens [n_patches / m², LM hidden].

    With `recompute` (the trainer sets it from model.vit_recompute=chunked) a training forward encodes whole images
    `chunk_patches` patches at a time, each chunk under activation checkpointing: nothing of the tower is kept
    between forward and backward, and the backward rebuilds one chunk at a time. Images never attend across one
    another (windows and full-attention segments lie inside a frame), so chunking does not change the result.
    """

    recompute: bool = False
    chunk_patches: int = 32768

    def __init__(self, config, projector_config, dims: VisionSpec, layer_spec):
        super().__init__(config=config)
        self.dims = dims
        k = (dims.temporal_patch_size, dims.patch_size, dims.patch_size)
        self.patch_embed = PatchEmbed(
            dims.in_channels, config.hidden_size, kernel_size=k, stride=k, bias=False, dtype=config.params_dtype
        )
        # final_layernorm of the block is the merger's norm (applied per patch before merging).
        self.decoder = TransformerBlock(
            config, block_spec(layer_spec, config), post_layer_norm=True, pre_process=True, post_process=True
        )
        self.merge_unit = dims.spatial_merge_size**2
        self.projection = MultimodalProjector(
            projector_config, projector_submodules(), "mlp", input_size=config.hidden_size * self.merge_unit
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        d = self.dims
        grid_thw = torch.as_tensor(grid_thw).view(-1, 3).cpu()
        n = int(grid_thw.prod(-1).sum())
        if pixel_values.dim() != 2 or pixel_values.shape != (n, d.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw {grid_thw.tolist()} needs "
                f"({n}, {d.patch_dim}) = (Σ t·h·w, C·temporal_patch·patch²)"
            )
        bad = (grid_thw[:, 1:] % d.spatial_merge_size != 0).any(-1)
        if bad.any():
            raise ValueError(f"grid_thw rows {grid_thw[bad].tolist()}: h and w must be multiples of "
                             f"spatial_merge_size={d.spatial_merge_size}")
        if self.recompute and self.training and torch.is_grad_enabled():
            parts = [checkpoint(self._encode, pixel_values[a:b], grid_thw[i:j], use_reentrant=False)
                     for (i, j), (a, b) in image_chunks(grid_thw, self.chunk_patches)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._encode(pixel_values, grid_thw)

    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        n, unit = pixel_values.shape[0], self.merge_unit
        x = self.patch_embed(pixel_values)  # [n, h]
        order, perm, unperm, rope, segs = self.window_layout(grid_thw, x.device)
        h = self.decoder(permute_rows(x, perm, unperm)[:, None, :], attention_mask=None, rotary_pos_emb=rope,
                         packed_seq_params=segs)
        h = h.reshape(n // unit, 1, -1)  # [n/m², 1, m²·h]: each merge block's patches side by side
        out = self.projection(h).squeeze(1)  # [n/m², LM hidden]
        back = (to_device(t, x.device) for t in (inverse_permutation(order), order))
        return permute_rows(out, *back)  # processor order

    def window_layout(self, grid_thw, device):
        """Window order of merge blocks (windows of one size back to back), the matching patch permutation and
        its inverse, RoPE angles [n, 1, 1, head_dim] in that order, and the attention segments of both block kinds.
        Boundaries stay on the host, where attention reads them; the index tensors and the patches' int32 (row,
        col) are copied asynchronously and the angles multiplied out on the device. Why: this host work kept the
        GPU idle ~41 ms per ViT forward at 128,960 patches (`benchmarks/profile_classes.py --gaps` on
        bench_vit_tower.py's trace, H100, 2026-12-07), most of it building and copying the angles (2 × 20 MB
        fp32); on a CPU the host's part fell several-fold (docs/PERFORMANCE.md)."""
        d, unit = self.dims, self.merge_unit
        frames = frame_cu_seqlens(grid_thw)
        order, cu_window, src = windows_by_size(
            *window_order(grid_thw, d.spatial_merge_size, d.window_size, d.patch_size), frames, unit)
        perm = (order[:, None] * unit + torch.arange(unit)).view(-1)  # patch order in windows
        coords = patch_coords(grid_thw, d.spatial_merge_size)[perm].to(torch.int32)
        inv_freq = vision_inv_freq(self.config.kv_channels, d.rope_theta)
        freqs = rope_from_coords(*(to_device(t, device) for t in (coords, inv_freq)))
        rope = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [n, 1, 1, head_dim]
        segs = VisionSegments(window=packed_seq_params(cu_window), full=packed_seq_params(frames))
        if src is not None:  # full-attention blocks gather their rows into frames, and back
            segs.frame_rows, segs.block_rows = (to_device(t, device) for t in (inverse_permutation(src), src))
            segs.frame_rope = rope[segs.frame_rows]
        return order, *(to_device(t, device) for t in (perm, inverse_permutation(perm))), rope, segs


class PatchEmbed(torch.nn.Conv3d):
    """HF's patch Conv3d (kernel = stride, so each patch is one dot product per channel), run as one GEMM on the
    flattened patches [n, C·T·P·P] → [n, h]. The weight keeps the Conv3d's shape and name, so checkpoints and the
    HF mapping are unchanged. Why: cuDNN has no fast algorithm for this degenerate 3D convolution in bf16 (its
    forward and weight gradient; `benchmarks/bench_vit_tower.py` times both forms)."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return torch.nn.functional.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1))


def image_chunks(grid_thw: torch.Tensor, max_patches: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Consecutive images grouped up to `max_patches` patches: [((first image, end), (first row, end row))]."""
    sizes = [int(t * h * w) for t, h, w in grid_thw.tolist()]
    out, start, row, acc = [], 0, 0, 0
    for i, n in enumerate(sizes):
        if acc and acc + n > max_patches:
            out.append(((start, i), (row, row + acc)))
            start, row, acc = i, row + acc, 0
        acc += n
    out.append(((start, len(sizes)), (row, row + acc)))
    return out
