"""Full (TP=1) tensor ⇄ this rank's tensor-parallel shard, for megatron local-spec parameters.

Megatron marks TP-split parameters with `tensor_model_parallel` and `partition_dim`. One layout needs care:
a gated MLP's `linear_fc1.weight` is [gate; up], and each TP rank holds [gate_r; up_r].
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_partition_dim(param: torch.Tensor) -> int:
    """The dimension megatron splits `param` along under TP, or -1 when it is replicated."""
    return getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1


def _gated(name: str, gated: bool) -> bool:
    return gated and name.endswith("linear_fc1.weight") or gated and name.endswith("linear_fc1.bias")


def shard_for_rank(name: str, full: torch.Tensor, dim: int, rank: int, tp: int, gated: bool = True) -> torch.Tensor:
    """This rank's shard of the full tensor `full` (name decides the gated-fc1 layout)."""
    if dim < 0 or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dim {dim} of size {full.shape[dim]} is not divisible by TP={tp}")
    if _gated(name, gated):
        return torch.cat([h.chunk(tp, dim=0)[rank] for h in full.chunk(2, dim=0)])
    return full.chunk(tp, dim=dim)[rank]


def gather_full(name: str, local: torch.Tensor, dim: int, group=None, gated: bool = True) -> torch.Tensor:
    """Inverse of `shard_for_rank`: all-gather the shards of the TP group into the full tensor."""
    tp = dist.get_world_size(group) if dist.is_initialized() else 1
    if tp == 1 or dim < 0:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if _gated(name, gated):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(parts, dim=dim)


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], gated: bool = True) -> None:
    """Copy a full (TP=1) state dict into a TP-sharded model, in place; names must match the model's."""
    from megatron.core import parallel_state as ps

    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    missing = [n for n, _ in model.named_parameters() if n not in full]
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} parameter(s): {missing[:10]}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(shard_for_rank(n, full[n], tp_partition_dim(p), rank, tp, gated))


def gather_full_state_dict(model: torch.nn.Module, grads: bool = False, gated: bool = True) -> dict:
    """Full (TP=1) parameters — or their gradients — of a TP-sharded model, on every rank."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    out = {}
    for n, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is None:
            continue
        out[n] = gather_full(n, t, tp_partition_dim(p), group, gated)
    return out
