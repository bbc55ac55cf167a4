"""CoreAttention: drop-in for megatron's DotProductAttention that honours packed samples, GQA and CP.

Same constructor and forward as megatron-core 0.16.1 `DotProductAttention`: q [sq, b, nq, d], k/v [sk, b, nkv, d]
→ [sq, b, nq·d]. Segments come from `packed_seq_params.cu_seqlens_q` (b=1, global padded boundaries); without it
every batch row is one segment. Causal inside a segment iff the mask type is causal/padding_causal; no_mask is
bidirectional. With CP>1 the local rows are the zigzag chunks of every segment and K/V are all-gathered.
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_mmpl.attention.backend import auto_backend, configured_backend
from megatron_mmpl.attention.flex import document_block_mask, flex_packed
from megatron_mmpl.attention.sdpa import sdpa_blocks, sdpa_dense
from megatron_mmpl.attention.segments import group_blocks, plan_blocks, segment_bounds, token_coords
from megatron_mmpl.parallel.context_parallel import gather_kv_for_cp

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


def _group_size(group) -> int:
    return 1 if group is None else group.size()


def _group_rank(group) -> int:
    return 0 if group is None else group.rank()


def _bounds(packed_seq_params, cu_q, total: int) -> list[int]:
    """Segment boundaries as a host list, memoised on the PackedSeqParams object: every layer of a forward gets
    the same object, so a GPU cu_seqlens costs one device sync per forward, not one per layer."""
    memo = getattr(packed_seq_params, "_mmpl_bounds", None)
    if memo is not None and memo[0] == total and memo[1] is cu_q:
        return memo[2]
    cu = segment_bounds(cu_q, total)
    if packed_seq_params is not None:
        packed_seq_params._mmpl_bounds = (total, cu_q, cu)
    return cu


def _block_plan(packed_seq_params, cu: list[int], causal: bool, cp_rank: int, cp: int, device):
    """(blocks, grouped plan) of this rank's queries, memoised on the PackedSeqParams like `_bounds`: built once
    per forward (its index tensors copied to the device once), not once per layer."""
    key = (tuple(cu), causal, cp_rank, cp, device)
    memo = getattr(packed_seq_params, "_mmpl_plans", None) if packed_seq_params is not None else None
    if memo is not None and key in memo:
        return memo[key]
    blocks = plan_blocks(cu, causal, cp_rank, cp)
    out = (blocks, group_blocks(blocks, device))
    if packed_seq_params is not None:
        if memo is None:
            memo = packed_seq_params._mmpl_plans = {}
        memo[key] = out
    return out


class CoreAttention(MegatronModule):
    """Packed-sequence core attention with selectable kernels (sdpa / flex / te) and context parallelism."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        backend: str | None = None,
    ):
        super().__init__(config=config)
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"CoreAttention supports softmax_type='vanilla', got {config.softmax_type!r}")
        if config.window_size is not None:
            raise NotImplementedError("CoreAttention has no sliding window; unset config.window_size")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = getattr(pg_collection, "tp", None)
        # CP only where the config asks for it: a tower built with context_parallel_size=1 (the ViT) attends
        # locally even though megatron hands every Attention the global CP group.
        self.cp_group = getattr(pg_collection, "cp", None) if config.context_parallel_size > 1 else None
        if self.cp_group is not None and self.cp_group.size() != config.context_parallel_size:
            raise ValueError(f"config.context_parallel_size={config.context_parallel_size} but the CP process "
                             f"group has {self.cp_group.size()} ranks; build the model after initialize_parallel")
        tp = _group_size(self.tp_group)
        self.head_dim = config.kv_channels
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_kv_heads = divide(config.num_query_groups, tp)
        # apply_query_key_layer_scaling divides and re-multiplies by layer_number in megatron: no net effect.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.backend = configured_backend(config, backend)
        if self.backend == "flex" and self.dropout_p > 0:
            raise ValueError(f"flex attention has no dropout; set attention_dropout=0 (got {self.dropout_p}) "
                             "or use backend 'sdpa'")
        self.te_attention = None
        if self.backend == "te":
            from megatron.core.extensions.transformer_engine import TEDotProductAttention  # lazy: optional TE

            self.te_attention = TEDotProductAttention(
                config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                attention_type=attention_type, attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                cp_comm_type=cp_comm_type or "p2p", pg_collection=pg_collection,
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("CoreAttention does not take attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        thd = query.dim() == 3  # megatron squeezes b=1 for qkv_format='thd'
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if self.te_attention is not None:
            out = self._te_forward(query, key, value, attention_mask, mask_type, packed_seq_params)
        else:
            out = self._forward(query, key, value, attention_mask, mask_type, packed_seq_params)
        sq, b = out.shape[:2]
        return out.reshape(sq, -1) if thd else out.reshape(sq, b, -1)  # [sq, b, nq·d]

    def _forward(self, q, k, v, attention_mask, mask_type, packed_seq_params):
        sq, b = q.shape[:2]
        cp, cp_rank = _group_size(self.cp_group), _group_rank(self.cp_group)
        causal = mask_type in _CAUSAL
        dropout_p = self.dropout_p if self.training else 0.0
        cu_q = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        if cu_q is None and cp == 1 and attention_mask is not None and mask_type != AttnMaskType.causal:

            # megatron masks are True where attention is NOT allowed
            with self._rng(dropout_p):
                return sdpa_dense(q, k, v, ~attention_mask, causal, self.softmax_scale, dropout_p)
        if cu_q is not None:
            if b != 1:
                raise ValueError(f"packed_seq_params needs packed rows with b=1, got b={b}")
            cu_kv = packed_seq_params.cu_seqlens_kv
            if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_kv.cpu(), cu_q.cpu()):
                raise NotImplementedError("CoreAttention is self-attention on packed rows: cu_seqlens_kv must "
                                          "equal cu_seqlens_q")
        cu = _bounds(packed_seq_params, cu_q, sq * cp)
        if cp > 1:

            k = gather_kv_for_cp(k, cu, self.cp_group)  # [s_full, b, nkv, d]
            v = gather_kv_for_cp(v, cu, self.cp_group)
        blocks, plan = _block_plan(packed_seq_params, cu, causal, cp_rank, cp, q.device)
        backend = self.backend
        if backend == "auto":  # distinct block shapes = SDPA calls per layer; flex when many and short
            backend = auto_backend(q.device.type, len(plan.groups), sq * cp / max(1, len(cu) - 1))
        if backend == "flex":

            key = (tuple(cu), cp_rank, cp, causal, q.device)
            mask = document_block_mask(key, lambda: token_coords(blocks, cu, q.device), causal)
            return flex_packed(q, k, v, mask, self.softmax_scale)

        with self._rng(dropout_p):
            return sdpa_blocks(q, k, v, plan, self.softmax_scale, dropout_p)

    def _rng(self, dropout_p: float):
        """Dropout draws from megatron's model-parallel RNG stream, as DotProductAttention does."""

        tracker = tensor_parallel.get_cuda_rng_tracker()
        if dropout_p == 0.0 or self.config.sequence_parallel or not tracker.is_initialized():
            return contextlib.nullcontext()  # not initialised: a single process without megatron's RNG setup
        return tracker.fork()

    def _te_forward(self, q, k, v, attention_mask, mask_type, packed_seq_params):
        """TE takes packed rows as 'thd' with global padded cu_seqlens; its CP uses the same zigzag layout.

        RoPE was already applied per token by megatron's Attention in 'sbhd' mode, so only TE sees 'thd'.
        """
        if packed_seq_params is None or packed_seq_params.cu_seqlens_q is None:
            return self.te_attention(q, k, v, attention_mask, attn_mask_type=mask_type)
        cu = packed_seq_params.cu_seqlens_q.to(device=q.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                              cu_seqlens_kv_padded=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len)
        te_mask = AttnMaskType.padding_causal if mask_type in _CAUSAL else AttnMaskType.padding
        out = self.te_attention(q.squeeze(1), k.squeeze(1), v.squeeze(1), None, attn_mask_type=te_mask,
                                packed_seq_params=thd)
        return out.unsqueeze(1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        if self.te_attention is not None:
            return self.te_attention.sharded_state_dict(f"{prefix}te_attention.", sharded_offsets, metadata)
        return {}
