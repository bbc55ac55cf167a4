"""Context parallelism on packed rows: zigzag split/gather per sample, K/V all-gather, image partition, loss reduce.

Layout (same as Transformer Engine's `thd` CP layout): every sample (segment of `cu_seqlens`) is padded to a
multiple of 2·CP (·TP with sequence parallel), cut into 2·CP equal chunks, and CP rank r holds chunks r and
2·CP−1−r of every sample, concatenated in sample order. Causal work is then balanced across ranks.
`cu_seqlens` stays global (the padded full-row boundaries) on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


def _as_list(cu_seqlens) -> list[int]:
    return [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]


def pad_cu_seqlens(cu_seqlens, multiple: int) -> list[int]:
    """Boundaries after padding every segment up to a multiple of `multiple` tokens."""
    cu = _as_list(cu_seqlens)
    out = [0]
    for a, b in zip(cu[:-1], cu[1:]):
        out.append(out[-1] + -(-(b - a) // multiple) * multiple)
    return out


def zigzag_index(cu_seqlens_padded, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Positions in the padded full row held by `cp_rank`, in its local order: [s_full / cp] int64."""
    cu = _as_list(cu_seqlens_padded)
    parts = []
    for a, b in zip(cu[:-1], cu[1:]):
        n = b - a
        if n % (2 * cp_size):
            raise ValueError(
                f"segment [{a}, {b}) has length {n}, not a multiple of 2*cp={2 * cp_size}; pad the packed row "
                "with make_zigzag_plan/split_packed_batch before the model"
            )
        c = n // (2 * cp_size)
        for j in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(a + j * c, a + (j + 1) * c))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def zigzag_unshuffle_index(cu_seqlens_padded, cp_size: int, device=None) -> torch.Tensor:
    """Permutation taking the rank-major concatenation of all ranks' local rows to padded-row order."""
    return _unshuffle(tuple(_as_list(cu_seqlens_padded)), cp_size, torch.device(device or "cpu"))


@lru_cache(maxsize=16)  # every layer of a forward asks for the same one (K and V): build and copy it once
def _unshuffle(cu: tuple, cp_size: int, device: torch.device) -> torch.Tensor:
    held = torch.cat([zigzag_index(cu, r, cp_size) for r in range(cp_size)])
    return torch.argsort(held).to(device)


@dataclass
class ZigzagPlan:
    """How one packed row (b=1) is padded and dealt to one CP rank; `split` and `gather` apply it to any tensor."""

    cu_seqlens: list[int]  # original sample boundaries
    cu_seqlens_padded: list[int]  # after padding each sample to `multiple`
    cp_rank: int
    cp_size: int
    dest: torch.Tensor  # [s] padded position of each original token
    local_index: torch.Tensor  # [s_pad / cp] padded positions this rank holds, in local order

    @property
    def padded_len(self) -> int:
        return self.cu_seqlens_padded[-1]

    def pad(self, x: torch.Tensor, seq_dim: int, pad_value=0) -> torch.Tensor:
        """Original row → padded row along `seq_dim` (pad tokens at the end of each sample)."""
        if x.shape[seq_dim] != self.cu_seqlens[-1]:
            raise ValueError(
                f"tensor has {x.shape[seq_dim]} tokens on dim {seq_dim}, cu_seqlens covers {self.cu_seqlens[-1]}"
            )
        shape = list(x.shape)
        shape[seq_dim] = self.padded_len
        out = torch.full(shape, pad_value, dtype=x.dtype, device=x.device)
        return out.index_copy(seq_dim, self.dest.to(x.device), x)  # out-of-place: autograd flows to x

    def split(self, x: torch.Tensor, seq_dim: int, pad_value=0) -> torch.Tensor:
        """Original full row → this rank's zigzag share (differentiable)."""
        return self.pad(x, seq_dim, pad_value).index_select(seq_dim, self.local_index.to(x.device))

    def gather(self, x_local: torch.Tensor, seq_dim: int, group=None, keep_padding: bool = False) -> torch.Tensor:
        """All ranks' shares → the full row in original order (padding dropped unless `keep_padding`).

        Differentiable: the backward hands each rank the gradient of its own share (summed over ranks).
        """
        moved = x_local.movedim(seq_dim, 0)
        full = all_gather_first_dim(moved, group)  # [cp * s_local, ...] rank-major
        full = full.index_select(0, zigzag_unshuffle_index(self.cu_seqlens_padded, self.cp_size, full.device))
        if not keep_padding:
            full = full.index_select(0, self.dest.to(full.device))
        return full.movedim(0, seq_dim)


def make_zigzag_plan(cu_seqlens, cp_rank: int, cp_size: int, multiple: int | None = None) -> ZigzagPlan:
    """Plan for one packed row; `multiple` defaults to 2·cp (pass 2·cp·tp with sequence parallel)."""
    multiple = multiple or 2 * cp_size
    if multiple % (2 * cp_size):
        raise ValueError(f"multiple={multiple} must be a multiple of 2*cp={2 * cp_size}")
    cu = _as_list(cu_seqlens)
    cu_pad = pad_cu_seqlens(cu, multiple)
    dest = torch.cat(
        [torch.arange(p, p + (b - a)) for a, b, p in zip(cu[:-1], cu[1:], cu_pad[:-1])]
        or [torch.zeros(0, dtype=torch.long)]
    )
    return ZigzagPlan(cu, cu_pad, cp_rank, cp_size, dest, zigzag_index(cu_pad, cp_rank, cp_size))


_PAD_VALUES = {"labels": IGNORE_INDEX, "loss_mask": 0, "position_ids": 0, "attention_mask": 0}
_SEQ_DIM = {"position_ids": 2}  # [3, b, s]; the rest are [b, s, ...]


def split_packed_batch(batch: dict, cp_rank: int, cp_size: int, multiple: int | None = None,
                       pad_token_id: int = 0, keys=("input_ids", "labels", "loss_mask", "position_ids")) -> dict:
    """This CP rank's share of a packed batch (b=1): `keys` split zigzag, `cu_seqlens` → padded boundaries.

    Also returns `cu_seqlens_unpadded` and the plan under `cp_plan` (to split merged embeddings the same way:
    `plan.split(embeds_sbh, seq_dim=0)`). Other entries (pixel values, grids) pass through unchanged.
    """
    plan = make_zigzag_plan(batch["cu_seqlens"], cp_rank, cp_size, multiple)
    out = dict(batch)
    for k in keys:
        if k in batch and batch[k] is not None:
            dim = _SEQ_DIM.get(k, 1)
            out[k] = plan.split(batch[k], dim, pad_token_id if k == "input_ids" else _PAD_VALUES.get(k, 0))
    out["cu_seqlens"] = torch.tensor(plan.cu_seqlens_padded, dtype=torch.int32)
    out["cu_seqlens_unpadded"] = torch.tensor(plan.cu_seqlens, dtype=torch.int32)
    out["cp_plan"] = plan
    return out


def packed_seq_params(cu_seqlens, device=None):
    """megatron PackedSeqParams for CoreAttention: global (padded) boundaries, `sbhd` so RoPE is applied per token.

    Keep `device` None (CPU) for the sdpa/flex backends: they read the boundaries on the host every layer, and a
    GPU copy would cost a device sync per layer (the te backend moves them to the GPU itself).

    qkv_format stays 'sbhd' on purpose: megatron's 'thd' RoPE path re-slices frequencies per segment for CP,
    which is wrong when M-RoPE positions are per-token data already split with the tokens.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=device)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


# ---------------------------------------------------------------- collectives with autograd


def all_gather_first_dim(x: torch.Tensor, group=None) -> torch.Tensor:
    """[n, ...] per rank → [world·n, ...] rank-major, backward reduce-scatters (sums) the gradient back to the
    shares: megatron's sequence-parallel gather, over `group`; identity for a group of one."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region,  # lazy: megatron costs seconds
    )

    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)


def gather_kv_for_cp(x_local: torch.Tensor, cu_seqlens_padded, group) -> torch.Tensor:
    """K or V [s_local, b, n, d] on each CP rank → the full padded row [s_full, b, n, d] in packed order."""
    cp = dist.get_world_size(group)
    full = all_gather_first_dim(x_local, group)
    return full.index_select(0, zigzag_unshuffle_index(cu_seqlens_padded, cp, full.device))


class _AllGatherUneven(torch.autograd.Function):
    """All-gather of unequal first-dim shares (sizes known on every rank); backward all-reduces and slices.

    Not megatron's gather_from_sequence_parallel_region(output_split_sizes=...): its uneven all_gather and
    reduce_scatter do not run on gloo (the CPU tests and the quickstart), so shares are padded to the largest."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.group, ctx.sizes = group, sizes
        rank = dist.get_rank(group)
        m = max(sizes)
        buf = x.new_zeros((m, *x.shape[1:]))
        buf[: x.shape[0]] = x
        out = x.new_empty((len(sizes) * m, *x.shape[1:]))
        dist.all_gather_into_tensor(out, buf.contiguous(), group=group)
        ctx.rank = rank
        return torch.cat([out[r * m : r * m + n] for r, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def all_gather_uneven(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's [sizes[r], ...] share in rank order, with a correct backward."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    rank = dist.get_rank(group)
    if x.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank}'s share has {x.shape[0]} rows but sizes[{rank}]={sizes[rank]}")
    return _AllGatherUneven.apply(x, list(sizes), group)


# ---------------------------------------------------------------- vision work split across CP ranks


def partition_images_for_cp(image_grid_thw: torch.Tensor, cp_rank: int, cp_size: int) -> tuple[slice, slice]:
    """Contiguous run of images for `cp_rank`, balanced by patch count: (image slice, pixel-row slice).

    Contiguous so that gathering the per-rank embeddings in rank order restores image order. A rank may get no
    image when there are fewer images than ranks (its slices are empty).
    """
    patches = (image_grid_thw.prod(-1) if image_grid_thw.numel() else torch.zeros(0, dtype=torch.long)).tolist()
    total, n = sum(patches), len(patches)
    prefix = [0]
    for p in patches:
        prefix.append(prefix[-1] + p)
    # boundary r = the image index whose prefix sum is closest to r·total/cp (monotone, so runs stay contiguous)
    bounds = [0]
    for r in range(1, cp_size):
        target = total * r / cp_size
        k = min(range(bounds[-1], n + 1), key=lambda i: abs(prefix[i] - target))
        bounds.append(k)
    bounds.append(n)
    a, b = bounds[cp_rank], bounds[cp_rank + 1]
    return slice(a, b), slice(prefix[a], prefix[b])


def gather_image_embeddings(local_embeds: torch.Tensor, image_grid_thw: torch.Tensor, cp_size: int,
                            spatial_merge_size: int, group=None) -> torch.Tensor:
    """Every CP rank's merged image embeddings [n_tok_r, h] → all images' [n_tok, h] in image order."""
    per_image = (image_grid_thw.prod(-1) // (spatial_merge_size**2)).tolist() if image_grid_thw.numel() else []
    sizes = []
    for r in range(cp_size):
        imgs, _ = partition_images_for_cp(image_grid_thw, r, cp_size)
        sizes.append(sum(per_image[imgs]))
    return all_gather_uneven(local_embeds, sizes, group)


def encode_vision_over_cp(vision_fn, pixel_values: torch.Tensor, grid_thw: torch.Tensor, spatial_merge_size: int,
                          group=None) -> torch.Tensor:
    """Run `vision_fn(pixels, grid) → [n_tok, h]` on this CP rank's share of the images; return all images'
    embeddings (image order, gradients flow back to the rank that encoded each image).

    A rank left without images (fewer images than ranks) encodes the first image and keeps none of it, with a
    zero-weighted dependence, so its ViT parameters still get (zero) gradients and collectives stay matched.
    """
    cp = 1 if group is None else dist.get_world_size(group)
    if cp == 1:
        return vision_fn(pixel_values, grid_thw)
    imgs, rows = partition_images_for_cp(grid_thw, dist.get_rank(group), cp)
    if imgs.stop > imgs.start:
        local = vision_fn(pixel_values[rows], grid_thw[imgs])
    else:
        first = int(grid_thw[0].prod())
        out = vision_fn(pixel_values[:first], grid_thw[:1])
        local = out[:0] + 0.0 * out.sum()
    return gather_image_embeddings(local, grid_thw, cp, spatial_merge_size, group)


# ---------------------------------------------------------------- loss


def reduce_loss_across_cp(loss_sum: torch.Tensor, num_tokens: torch.Tensor, group=None):
    """Sum (loss, token count) over the CP group; returns the reduced pair (not divided: per-token averaging is
    the trainer's, over the whole global batch)."""
    pair = torch.stack([loss_sum.detach().float(), num_tokens.detach().float()])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(pair, group=group)
    return pair[0], pair[1]
