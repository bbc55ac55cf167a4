"""Full (TP=1) tensor ⇄ this rank's tensor-parallel shard, for megatron local-spec parameters.

Megatron marks TP-split parameters with `tensor_model_parallel` and `partition_dim`. One layout needs care:
a gated MLP's `linear_fc1` is [gate; up], and each TP rank holds [gate_r; up_r].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def is_gated_fc1(name: str) -> bool:
    """Gated (SwiGLU) MLPs live under `.mlp.`; a plain MLP such as the ViT merger's is not gated."""
    return ".mlp.linear_fc1." in f".{name}"


def tp_partition_dim(param: torch.Tensor) -> int:
    """The dimension megatron splits `param` along under TP, or -1 when it is replicated."""
    return getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1


def shard_for_rank(name: str, full: torch.Tensor, dim: int, rank: int, tp: int,
                   gated: Callable[[str], bool] = is_gated_fc1) -> torch.Tensor:
    """This rank's shard of the full tensor `full` (`gated(name)` decides the [gate; up] layout)."""
    if dim < 0 or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dim {dim} of size {full.shape[dim]} is not divisible by TP={tp}")
    if gated(name):
        return torch.cat([h.chunk(tp, dim=0)[rank] for h in full.chunk(2, dim=0)])
    return full.chunk(tp, dim=dim)[rank]


def gather_full(name: str, local: torch.Tensor, dim: int, group=None,
                gated: Callable[[str], bool] = is_gated_fc1) -> torch.Tensor:
    """Inverse of `shard_for_rank`: all-gather the shards of the TP group into the full tensor."""
    tp = dist.get_world_size(group) if dist.is_initialized() else 1
    if tp == 1 or dim < 0:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if gated(name):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(parts, dim=dim)


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor],
                         rename: Callable[[str], str] = lambda n: n,
                         gated: Callable[[str], bool] = is_gated_fc1) -> None:
    """Copy a full (TP=1) state dict into a TP-sharded model, in place; `rename` maps a local parameter name to
    its key in `full` (e.g. pipeline-local layer numbers to global ones). The TP group is the model's own
    (`model.tp_group`, which megatron's modules carry)."""
    group = model.tp_group
    rank, tp = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    params = dict(model.named_parameters())
    missing = [n for n in params if rename(n) not in full]
    if missing:
        raise KeyError(f"the full state dict lacks {len(missing)} tensor(s) this rank needs: {missing[:10]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(shard_for_rank(n, full[rename(n)], tp_partition_dim(p), rank, tp, gated))


def gather_full_state_dict(model: torch.nn.Module, grads: bool = False, rename: Callable[[str], str] = lambda n: n,
                           gated: Callable[[str], bool] = is_gated_fc1) -> dict:
    """Full (TP=1) parameters — or their gradients — of a TP-sharded model, on every rank, keyed by `rename`
    (gathered over the model's own TP group, `model.tp_group`)."""
    group = model.tp_group
    out = {}
    for n, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is not None:
            out[rename(n)] = gather_full(n, t, tp_partition_dim(p), group, gated)
    return out
