"""Layer specs of the two towers: megatron's local GPT layer with our CoreAttention (packed segments).

Language: causal attention inside each packed sample. Vision: bidirectional attention inside each window
(window blocks) or each frame (the config's `fullatt_block_indexes` blocks), chosen per layer by
`VisionTransformerLayer` from the `VisionSegments` the ViT passes as packed_seq_params.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_mmpl.attention.segments import permute_rows
from megatron_mmpl.compat.specs import RMSNorm, gpt_layer_spec, with_core_attention


@dataclass
class VisionSegments:
    """Attention segments of one ViT forward: window blocks use `window`, full-attention blocks `full`.

    The tower's rows are in window order with windows of one size back to back (vision_geometry.windows_by_size).
    When that scatters frames, `frame_rows` gathers the rows into frames (`full` is in that order) and
    `block_rows` puts them back (`frame_rope`: RoPE angles in frame order); None when the frames are contiguous.
    """

    window: PackedSeqParams
    full: PackedSeqParams
    frame_rows: torch.Tensor | None = None
    block_rows: torch.Tensor | None = None
    frame_rope: torch.Tensor | None = None


def packed_seq_params(cu_seqlens) -> PackedSeqParams:
    """Segments of a packed [s, b=1, ...] row for CoreAttention ('sbhd': RoPE stays per token)."""
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu_seqlens) > 1 else 0
    return PackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


class VisionTransformerLayer(TransformerLayer):
    """A megatron TransformerLayer that attends within windows, or within frames in the full-attention blocks."""

    def __init__(self, *args, full_attention_layers: tuple[int, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.full_attention = (self.layer_number - 1) in set(full_attention_layers)  # layer_number is 1-based

    def forward(self, *args, **kwargs):
        segs = kwargs.get("packed_seq_params")
        if not isinstance(segs, VisionSegments):
            return super().forward(*args, **kwargs)
        kwargs["packed_seq_params"] = segs.full if self.full_attention else segs.window
        if not self.full_attention or segs.frame_rows is None:
            return super().forward(*args, **kwargs)
        # rows into frames and back: two gathers per full-attention block instead of per-window gathers in all
        x = args[0] if args else kwargs.pop("hidden_states")
        kwargs["rotary_pos_emb"] = segs.frame_rope
        out, context = super().forward(permute_rows(x, segs.frame_rows, segs.block_rows), *args[1:], **kwargs)
        return permute_rows(out, segs.block_rows, segs.frame_rows), context


def _with_norms(spec: ModuleSpec) -> ModuleSpec:
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def language_layer_spec(backend: str | None = None) -> ModuleSpec:
    """The LM decoder layer: megatron local spec (RMSNorm, GQA with qkv bias, SwiGLU) + CoreAttention. Its QKV
    bias and M-RoPE stay megatron's (bias add, compiled RoPE of q and k): the one-kernel path made the whole 3B
    job at 32K 7 % slower than with it off in the LM only (7,245 vs 7,823 tokens/s, benchmarks/bench_e2e.py,
    H200, 2026-12-04; docs/PERFORMANCE.md)."""

    return _with_norms(gpt_layer_spec(normalization="RMSNorm", backend=backend))


def block_spec(layer_spec: ModuleSpec, config, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus our RMSNorm as the final norm."""
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage), layer_norm=RMSNorm
    )


def vision_layer_spec(full_attention_layers, backend: str | None = None) -> ModuleSpec:
    """The ViT block: same local pieces, bidirectional CoreAttention, window/full chosen per layer, QKV bias and
    RoPE as one kernel on CUDA (the tower's forward + backward 19 % faster with both of its fusions,
    benchmarks/bench_vit_tower.py, H200, 2026-12-04; docs/PERFORMANCE.md)."""
    spec = _with_norms(with_core_attention(get_gpt_layer_local_spec(normalization="RMSNorm"), backend,
                                           fused_qkv_rope=True))
    spec.module = VisionTransformerLayer
    spec.params = {**spec.params, "full_attention_layers": tuple(int(i) for i in full_attention_layers)}
    spec.submodules.self_attention.params = {**spec.submodules.self_attention.params,
                                             "attn_mask_type": AttnMaskType.no_mask}
    return spec


def projector_submodules() -> MLPSubmodules:
    """The patch merger's 2-layer MLP (column- then row-parallel)."""
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
