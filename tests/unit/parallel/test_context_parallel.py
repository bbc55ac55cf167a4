"""Zigzag CP plan: every token on exactly one rank (chunks r and 2·CP−1−r), split/unshuffle round trip with
the right pad values, and image partition contiguous and balanced by patch count."""

import pytest
import torch

from megatron_mmpl.parallel.context_parallel import (
    make_zigzag_plan,
    pad_cu_seqlens,
    partition_images_for_cp,
    split_packed_batch,
    zigzag_index,
    zigzag_unshuffle_index,
)

pytestmark = pytest.mark.unit


def test_zigzag_index_deals_chunks_r_and_mirror():
    cu = [0, 8, 16]
    assert zigzag_index(cu, 0, 2).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert zigzag_index(cu, 1, 2).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="not a multiple of 2\\*cp=4"):
        zigzag_index([0, 6], 0, 2)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_split_then_unshuffle_round_trips(cp):
    lengths = [7, 10, 1, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    s = int(cu[-1])
    batch = {"input_ids": torch.arange(1, s + 1)[None], "labels": torch.arange(1, s + 1)[None],
             "loss_mask": torch.ones(1, s), "position_ids": torch.arange(s).expand(3, 1, s) + 100, "cu_seqlens": cu}
    shares = [split_packed_batch(batch, r, cp) for r in range(cp)]
    padded = pad_cu_seqlens(cu, 2 * cp)
    assert all(sh["cu_seqlens"].tolist() == padded for sh in shares)
    assert len({sh["input_ids"].shape[1] for sh in shares}) == 1  # equal shares
    perm = zigzag_unshuffle_index(padded, cp)
    ids = torch.cat([sh["input_ids"] for sh in shares], 1)[:, perm]
    plan = shares[0]["cp_plan"]
    assert torch.equal(ids[:, plan.dest], batch["input_ids"])  # real tokens back in place
    pad = torch.ones(padded[-1], dtype=torch.bool)
    pad[plan.dest] = False
    labels = torch.cat([sh["labels"] for sh in shares], 1)[:, perm]
    mask = torch.cat([sh["loss_mask"] for sh in shares], 1)[:, perm]
    pos = torch.cat([sh["position_ids"] for sh in shares], 2)[:, :, perm]
    assert (ids[0, pad] == 0).all() and (labels[0, pad] == -100).all() and (mask[0, pad] == 0).all()
    assert torch.equal(pos[:, :, plan.dest], batch["position_ids"])


def test_plan_multiple_for_sequence_parallel():
    plan = make_zigzag_plan([0, 3, 20], 0, 2, multiple=8)
    assert plan.cu_seqlens_padded == [0, 8, 32]
    with pytest.raises(ValueError, match="multiple of 2\\*cp"):
        make_zigzag_plan([0, 3], 0, 2, multiple=6)


def test_partition_images_balanced_and_contiguous():
    grids = torch.tensor([[1, 4, 4], [1, 8, 8], [1, 2, 2], [1, 4, 6], [1, 6, 6], [1, 2, 4]])
    patches = grids.prod(-1)
    for cp in (1, 2, 3, 4):
        parts = [partition_images_for_cp(grids, r, cp) for r in range(cp)]
        assert parts[0][0].start == 0 and parts[-1][0].stop == len(grids)
        for (a, pa), (b, pb) in zip(parts[:-1], parts[1:]):
            assert a.stop == b.start and pa.stop == pb.start
        for imgs, rows in parts:
            assert rows.stop - rows.start == int(patches[imgs].sum())
            # balanced up to one image
            assert abs(int(patches[imgs].sum()) - patches.sum().item() / cp) <= patches.max().item()
    assert partition_images_for_cp(torch.zeros(0, 3, dtype=torch.long), 1, 2) == (slice(0, 0), slice(0, 0))
    one = torch.tensor([[1, 4, 4]])
    assert [partition_images_for_cp(one, r, 2)[0] for r in range(2)] in ([slice(0, 1), slice(1, 1)],
                                                                        [slice(0, 0), slice(0, 1)])
