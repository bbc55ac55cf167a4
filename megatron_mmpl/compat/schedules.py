"""TransformerConfig fields megatron-core 0.16.1's pipeline schedules need for packed rows of varying length."""

from __future__ import annotations


def variable_length_pipeline() -> dict:
    """Packed rows may differ in length between steps: the 1F1B schedule's p2p exchanges shapes
    (`variable_seq_lengths`) instead of fixing seq_length. TransformerConfig.__post_init__ rejects that with its
    default MoE token dispatcher even in a dense model, so another one is named (no MoE layer is built)."""
    return {"variable_seq_lengths": True, "moe_token_dispatcher_type": "alltoall"}
