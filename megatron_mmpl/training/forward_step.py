"""The schedule's `forward_step_func`: one packed micro-batch → (per-token loss, loss_func), the megatron way.

The loss function returns (sum of token losses, number of supervised tokens, report); with
`calculate_per_token_loss=True` megatron divides the gradients by the token count summed over all micro-batches
and data-parallel (and context-parallel) ranks: a per-token mean over the global batch, not a mean of means.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from megatron_mmpl.parallel.context_parallel import packed_seq_params, split_packed_batch

# Batch entries the model takes besides input_ids / position_ids / labels.
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
# Small metadata the model reads on the host (image grids, sample boundaries): left on the CPU, so reading them
# costs no device sync.
HOST_KEYS = ("image_grid_thw", "video_grid_thw", "cu_seqlens")


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses [b, s] → (Σ masked loss, #supervised tokens, {'lm loss': [Σ, n]})."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


@dataclass
class StepStats:
    """What the micro-batches of one step held (counted once per data-parallel replica) and the data wait."""

    tokens: int = 0
    lm_flops: float = 0.0
    vit_flops: float = 0.0
    rebuilt_flops: float = 0.0  # forward work the backward reruns (recompute): hardware, not model, FLOPs
    data_wait: float = 0.0
    segments: list = field(default_factory=list)

    def reset(self) -> None:
        self.tokens, self.lm_flops, self.vit_flops, self.rebuilt_flops, self.data_wait = 0, 0.0, 0.0, 0.0, 0.0


def _segment_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    cu = cu_seqlens.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:]) if b > a]


class ForwardStep:
    """Callable `forward_step(data_iterator, model)` for `get_forward_backward_func`.

    Every pipeline stage reads the same micro-batch (TP/PP/CP peers share a data-parallel rank): later stages
    need the positions, labels and packed-sample boundaries too.
    """

    def __init__(self, module, flop_model, device, dtype, counts_stats: bool, cp_rank: int = 0, cp_size: int = 1,
                 seq_multiple: int = 1):
        self.module, self.flops, self.device, self.dtype = module, flop_model, device, dtype
        self.counts_stats = counts_stats
        self.cp_rank, self.cp_size, self.seq_multiple = cp_rank, cp_size, seq_multiple
        self.stats = StepStats()

    def __call__(self, data_iterator, model):
        t0 = time.perf_counter()
        batch = next(data_iterator)
        self.stats.data_wait += time.perf_counter() - t0
        if self.counts_stats:
            self._count(batch)
        batch = self._to_device(batch)
        inputs = self._split_for_context_parallel(batch)
        output = model(
            input_ids=batch["input_ids"], position_ids=inputs["position_ids"], labels=inputs["labels"],
            packed_seq_params=inputs["packed_seq_params"], cp_plan=inputs.get("cp_plan"),
            **{k: batch[k] for k in VISION_KEYS if k in batch},
        )
        return output, partial(loss_func, inputs["loss_mask"])

    def _count(self, batch) -> None:
        segs = _segment_lengths(batch["cu_seqlens"])
        self.stats.tokens += sum(segs)
        # the loss runs the output layer at supervised positions only, except under sequence parallelism
        sp = getattr(self.module.config, "sequence_parallel", False)
        head = None if sp else int((batch["labels"] >= 0).sum())
        self.stats.lm_flops += self.flops.lm_flops(segs, head_tokens=head)
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if batch.get(key) is not None
                 for g in batch[key].tolist()]
        if grids:
            self.stats.vit_flops += self.flops.vit_flops(grids)
        self.stats.rebuilt_flops += self.flops.rebuilt_flops(segs, grids)

    def _to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v) and k not in HOST_KEYS:
                v = v.to(self.device, non_blocking=True)
                if v.is_floating_point() and k.startswith("pixel_values"):
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def _split_for_context_parallel(self, batch: dict) -> dict:
        """This rank's zigzag share of positions/labels/loss mask; merged embeddings are split the same way."""

        if self.cp_size == 1 and self.seq_multiple == 1:
            return dict(position_ids=batch["position_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"],
                        packed_seq_params=packed_seq_params(batch["cu_seqlens"]))
        local = split_packed_batch(batch, self.cp_rank, self.cp_size, multiple=self.seq_multiple,
                                   keys=("labels", "loss_mask", "position_ids"))
        return dict(position_ids=local["position_ids"], labels=local["labels"], loss_mask=local["loss_mask"],
                    packed_seq_params=packed_seq_params(local["cu_seqlens"]), cp_plan=local["cp_plan"])
