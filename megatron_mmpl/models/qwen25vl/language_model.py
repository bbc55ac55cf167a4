"""The LM: megatron's GPTModel whose training loss never holds the whole [s, V] logits at once.

At 128K tokens × 152K vocab the logits alone are 39 GB in bf16 (and twice that in fp32 inside the cross
entropy). With labels:
- only supervised positions (label ≥ 0; the data marks the rest -100) go through the output layer — long-document
  VQA supervises tens of answer tokens per 100K — and the others get loss 0 (the loss mask zeroes them anyway);
- what is left is cut into chunks of `loss_chunk_tokens`; each chunk runs the output layer and megatron's
  (vocab-parallel) cross entropy under activation checkpointing, so one chunk's logits exist at a time.
Under sequence parallelism every position is kept (TP ranks hold different positions). Without labels
(inference, parity tests) this is GPTModel unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from torch.utils.checkpoint import checkpoint


class LanguageModel(GPTModel):
    """GPTModel + chunked output-layer/cross-entropy for the training loss (per-token loss [b, s], unchanged)."""

    loss_chunk_tokens: int = 4096
    """Tokens per loss chunk (0 or None: megatron's unchunked path)."""

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        # This override of megatron 0.16.1's GPTModel._postprocess only changes the labels path without MTP.
        chunk = self.loss_chunk_tokens
        if labels is None or not self.post_process or self.mtp_process or not chunk:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if self.output_layer.sequence_parallel:
            return chunked_token_loss(hidden_states, labels, self._chunk_loss, weight, chunk,
                                      sp_ranks=self.config.tensor_model_parallel_size)
        return supervised_token_loss(hidden_states, labels, self._chunk_loss, weight, chunk)

    def _chunk_loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight) -> torch.Tensor:
        """hidden [k_local, b, h], labels [b, k] → per-token loss [b, k] (logits [k, b, V/tp] live only here)."""
        logits, _ = self.output_layer(hidden, weight=weight)
        return self.compute_language_model_loss(labels, logits)


def chunked_token_loss(hidden: torch.Tensor, labels: torch.Tensor, chunk_loss, weight, chunk: int,
                       sp_ranks: int = 1) -> torch.Tensor:
    """Per-token loss [b, s] from hidden [s_local, b, h] and labels [b, s], `chunk` local positions at a time.

    Under sequence parallelism over `sp_ranks` TP ranks each holds a contiguous 1/sp_ranks of the sequence and
    the output layer all-gathers its input, so local chunk j of every rank becomes one gathered chunk: labels and
    losses are indexed accordingly.
    """
    s_local = hidden.shape[0]
    if s_local <= chunk:
        return chunk_loss(hidden, labels, weight).float()
    out = torch.empty_like(labels, dtype=torch.float32)
    for start in range(0, s_local, chunk):
        stop = min(start + chunk, s_local)
        idx = torch.cat([torch.arange(start, stop) + r * s_local for r in range(sp_ranks)]).to(labels.device)
        loss = checkpoint(chunk_loss, hidden[start:stop], labels[:, idx], weight, use_reentrant=False)
        out = out.index_copy(1, idx, loss.float())
    return out


def supervised_token_loss(hidden: torch.Tensor, labels: torch.Tensor, chunk_loss, weight, chunk: int) -> torch.Tensor:
    """Per-token loss [b, s] computed only where labels ≥ 0 (0 elsewhere); hidden [s, b, h], labels [b, s]."""
    s, b, h = hidden.shape
    flat_labels = labels.transpose(0, 1).reshape(-1)  # [s·b], the order of hidden.view(s·b, h)
    idx = torch.nonzero(flat_labels >= 0).squeeze(1)
    if idx.numel() == 0:  # keep the output layer in the graph (same collectives and grads on every rank)
        idx = flat_labels.new_zeros(1)
    picked = hidden.reshape(s * b, h).index_select(0, idx)[:, None, :]  # [n, 1, h]
    loss = chunked_token_loss(picked, flat_labels[idx].clamp_min(0)[None, :], chunk_loss, weight, chunk)  # [1, n]
    out = torch.zeros(s * b, dtype=torch.float32, device=hidden.device)
    out = out.index_copy(0, idx, loss[0].float() * (flat_labels[idx] >= 0))
    return out.view(s, b).transpose(0, 1)
