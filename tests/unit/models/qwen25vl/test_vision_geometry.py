"""The ViT's window regrouping: windows of one size back to back, the same windows and rows, and the map back to
frames exact; patch coordinates and RoPE angles as written out; the inverse permutation (the whole tower against
transformers is tests/distributed/test_qwen25vl_parity.py)."""

import pytest
import torch

from megatron_mmpl.attention.segments import inverse_permutation
from megatron_mmpl.models.qwen25vl.vision_geometry import (
    frame_cu_seqlens,
    patch_coords,
    rope_from_coords,
    vision_inv_freq,
    window_order,
    windows_by_size,
)

pytestmark = pytest.mark.unit

MERGE, WINDOW, PATCH, UNIT = 2, 112, 14, 4  # the released models: windows of 4×4 merge blocks = 64 patches


def _windows(order, cu):
    """Each window as the tuple of processor patch rows it holds, in row order."""
    patches = (order[:, None] * UNIT + torch.arange(UNIT)).view(-1)
    return [tuple(patches[a:b].tolist()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]


def _regroup(grid):
    grid = torch.tensor(grid)
    order, cu = window_order(grid, MERGE, WINDOW, PATCH)
    frames = frame_cu_seqlens(grid)
    return (order, cu), windows_by_size(order, cu, frames, UNIT), frames


def test_pages_of_several_window_sizes_are_regrouped_and_map_back_to_frames():
    # windows of 64, 48, 16 and 12 patches
    (order, cu), (order2, cu2, src), frames = _regroup([[1, 80, 62], [1, 80, 62], [1, 42, 46]])
    sizes = (cu2[1:] - cu2[:-1]).tolist()
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) > 2  # one run per size, largest first
    assert sorted(_windows(order2, cu2)) == sorted(_windows(order, cu))  # the same windows, whole
    assert torch.equal(torch.sort(src).values, torch.arange(int(cu[-1])))  # a permutation of the rows
    before = (order[:, None] * UNIT + torch.arange(UNIT)).view(-1)
    after = (order2[:, None] * UNIT + torch.arange(UNIT)).view(-1)
    assert torch.equal(after, before[src])  # regrouped row i is window-order row src[i]
    assert torch.equal(after[torch.argsort(src)], before)  # frame_rows = argsort(src) restores frames
    frame_of = torch.bucketize(before, frames[1:].long(), right=True)
    assert bool((frame_of[1:] >= frame_of[:-1]).all())  # window order keeps each frame contiguous


def test_one_frame_or_one_window_size_needs_no_gather_into_frames():
    (_, cu), (order2, cu2, src), _ = _regroup([[1, 80, 62]])  # one page: its frame stays whole
    assert src is None and (cu2[1:] - cu2[:-1]).tolist() != (cu[1:] - cu[:-1]).tolist()
    (order, cu), (order2, cu2, src), _ = _regroup([[1, 64, 64], [2, 32, 32]])  # every window 64 patches
    assert src is None and torch.equal(order2, order) and torch.equal(cu2, cu)


def test_patch_coords_and_angles_as_written_out():
    # per frame, merge blocks row-major and each block's m×m patches row-major; a repeated grid comes from the cache
    coords = patch_coords(torch.tensor([[1, 4, 6], [2, 2, 2], [1, 4, 6]]), MERGE)
    first = [(r, c) for br in range(2) for bc in range(3) for r in (2 * br, 2 * br + 1) for c in (2 * bc, 2 * bc + 1)]
    assert [tuple(x) for x in coords[:24].tolist()] == first == [tuple(x) for x in coords[32:].tolist()]
    assert coords[24:28].tolist() == coords[28:32].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]  # t=2: twice
    inv = vision_inv_freq(16, 10000.0)
    assert torch.equal(inv, 1.0 / (10000.0 ** (torch.tensor([0.0, 2.0, 4.0, 6.0]) / 8)))
    angles = rope_from_coords(coords.to(torch.int32), inv)
    assert torch.equal(angles, torch.cat([coords[:, :1].float() * inv, coords[:, 1:].float() * inv], dim=-1))


def test_inverse_permutation_is_argsort():
    for n in (0, 1, 7, 5000):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        assert torch.equal(inverse_permutation(perm), torch.argsort(perm))
