"""3D M-RoPE position ids of a Qwen2.5-VL sample, as transformers' `get_rope_index` computes them, vectorised.

A pure function of the token ids and the image/video grids, so the data pipeline computes positions per sample
(before packing) without a model. Text advances every axis by 1 per token; an image or video starts all axes at
the running position, lays its merged grid out over (t, h, w), and advances the text position by
max(h, w) / spatial_merge_size — not by its token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_index_kwargs(hf_config) -> dict:
    """The config values `rope_index` needs, from a transformers `Qwen2_5_VLConfig`."""
    vc = hf_config.vision_config
    return dict(
        spatial_merge_size=int(vc.spatial_merge_size),
        tokens_per_second=vc.tokens_per_second,
        image_token_id=int(hf_config.image_token_id),
        video_token_id=int(hf_config.video_token_id),
        vision_start_token_id=int(hf_config.vision_start_token_id),
    )


def _vision_items(
    is_tok: torch.Tensor, grid_thw, merge: int, intervals: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per vision token of one kind: (t, h, w) offsets inside its item; per item: first token index, advance."""
    where = is_tok.nonzero().squeeze(1)
    empty = torch.zeros(0, dtype=torch.long)
    if grid_thw is None or len(grid_thw) == 0:
        if where.numel():
            raise ValueError(f"{where.numel()} {kind} pad token(s) in input_ids but no {kind}_grid_thw was given")
        return empty.view(3, 0), empty, empty, empty
    g = torch.as_tensor(grid_thw, dtype=torch.long).view(-1, 3)
    lt, lh, lw = g[:, 0], g[:, 1] // merge, g[:, 2] // merge
    counts = lt * lh * lw
    if where.numel() != int(counts.sum()):
        raise ValueError(
            f"{where.numel()} {kind} pad token(s) in input_ids but {kind}_grid_thw {g.tolist()} implies "
            f"{counts.tolist()} = {int(counts.sum())} (t*h*w/{merge}^2 each); the prompt and the grids disagree"
        )
    item = torch.repeat_interleave(torch.arange(len(g)), counts)
    starts = torch.cumsum(counts, 0) - counts
    k = torch.arange(where.numel()) - starts[item]  # token offset inside its item
    hw = (lh * lw)[item]
    ti, hi, wi = k // hw, (k % hw) // lw[item], k % lw[item]
    first, last = where[starts], where[starts + counts - 1]
    if not torch.equal(last - first + 1, counts):
        bad = (last - first + 1 != counts).nonzero().squeeze(1).tolist()
        raise ValueError(f"{kind}(s) {bad}: pad tokens are not contiguous; each {kind} must be one run of pad tokens")
    # temporal ids: (t * interval).long() with the interval in the dtype transformers uses (exact float rounding)
    tpos = (ti * intervals[item]).long()
    return torch.stack([tpos, hi, wi]), first, last, torch.maximum(lh, lw)


def rope_index(
    input_ids: torch.Tensor,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    attention_mask: torch.Tensor | None = None,
    *,
    spatial_merge_size: int,
    tokens_per_second,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Positions [3, s] (int64) and the mrope delta (max position + 1 - valid length) of ONE sample.

    input_ids [s]; image_grid_thw [n_img, 3] and video_grid_thw [n_vid, 3] for this sample's images/videos in
    order of appearance; second_per_grid_ts [n_vid] (tensor or numbers; None = 1 s); attention_mask [s]
    (positions of masked tokens are 0, as in transformers). When `vision_start_token_id` is given, every
    image/video must follow one (a cheap check that the prompt was built by the chat template).
    """
    ids = torch.as_tensor(input_ids).view(-1)
    s = ids.numel()
    keep = None if attention_mask is None else torch.as_tensor(attention_mask).view(-1).bool()
    if keep is not None:
        ids = ids[keep]
    n = ids.numel()
    n_vid = 0 if video_grid_thw is None else len(video_grid_thw)
    if second_per_grid_ts is None:
        v_int = torch.full((n_vid,), tokens_per_second)  # int when tokens_per_second is (integer arithmetic)
    elif isinstance(second_per_grid_ts, torch.Tensor):
        v_int = (tokens_per_second * second_per_grid_ts.view(-1)).view(-1)
    else:
        v_int = torch.tensor([tokens_per_second * x for x in second_per_grid_ts])
    if v_int.numel() != n_vid:
        raise ValueError(f"second_per_grid_ts has {v_int.numel()} entries for {n_vid} video(s)")
    one = torch.ones(0 if image_grid_thw is None else len(image_grid_thw), dtype=torch.long)
    img = _vision_items(ids == image_token_id, image_grid_thw, spatial_merge_size, one, "image")
    vid = _vision_items(ids == video_token_id, video_grid_thw, spatial_merge_size, v_int, "video")

    is_vis = (ids == image_token_id) | (ids == video_token_id)
    advance = (~is_vis).long()  # text: +1 per token; an item: +max(h, w)/merge at its last token
    for _, _first, last, adv in (img, vid):
        advance[last] += adv
    start = torch.cumsum(advance, 0) - advance  # running position before each token
    pos = start.expand(3, n).clone()
    for offs, first, last, _ in (img, vid):
        if vision_start_token_id is not None and first.numel():
            prev = torch.where(first > 0, ids[(first - 1).clamp_min(0)], torch.full_like(first, -1))
            if (prev != vision_start_token_id).any():
                raise ValueError(
                    f"vision item(s) at token index {first[prev != vision_start_token_id].tolist()} do not follow "
                    f"vision_start_token_id={vision_start_token_id}"
                )
        mask = torch.zeros(n, dtype=torch.bool)
        for f, ll in zip(first.tolist(), last.tolist()):
            mask[f : ll + 1] = True
        pos[:, mask] += offs
    delta = int(pos.max()) + 1 - n if n else 0
    if keep is None:
        return pos, delta
    out = torch.zeros(3, s, dtype=torch.long)
    out[:, keep] = pos
    return out, delta


def rope_index_batch(
    input_ids: torch.Tensor,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    attention_mask: torch.Tensor | None = None,
    **config,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched form with transformers' conventions: ids [b, s], grids of the whole batch in order.

    Returns positions [3, b, s] and deltas [b, 1]."""
    b = input_ids.shape[0]
    merge = config["spatial_merge_size"]
    grids = {"image": _as_list(image_grid_thw), "video": _as_list(video_grid_thw)}
    secs = second_per_grid_ts  # a tensor or a list: both slice the same way
    used = {"image": 0, "video": 0}
    out, deltas = torch.zeros(3, *input_ids.shape, dtype=torch.long), []
    for i in range(b):
        ids = input_ids[i] if attention_mask is None else input_ids[i][attention_mask[i].bool()]
        take = {}
        for kind, tok in (("image", config["image_token_id"]), ("video", config["video_token_id"])):
            need, j = int((ids == tok).sum()), used[kind]
            while need > 0 and j < len(grids[kind]):
                t, h, w = (int(x) for x in grids[kind][j])
                need -= t * (h // merge) * (w // merge)
                j += 1
            take[kind] = (used[kind], j)
            used[kind] = j
        (i0, i1), (v0, v1) = take["image"], take["video"]
        pos, d = rope_index(
            input_ids[i],
            None if grids["image"] is None else grids["image"][i0:i1],
            None if grids["video"] is None else grids["video"][v0:v1],
            None if secs is None else secs[v0:v1],
            None if attention_mask is None else attention_mask[i],
            **config,
        )
        out[:, i] = pos
        deltas.append(d)
    return out, torch.tensor(deltas).unsqueeze(1)


def _as_list(grid) -> Sequence | None:
    return None if grid is None else [tuple(int(x) for x in g) for g in grid]
