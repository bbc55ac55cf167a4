"""2 DP x 2 TP on 4 gloo ranks: TP peers get identical batches, DP ranks disjoint samples whose union covers each
pool's epoch without duplicates, with the DP rank/size taken from megatron's parallel_state (not the global rank)."""

import hashlib

import pytest

from megatron_mmpl.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed
BATCHES = 40


def _rank_stream(root: str):
    from megatron.core import parallel_state as ps

    from megatron_mmpl.data.loader import LoaderOptions, build_train_loader
    from megatron_mmpl.data.tokenizer import build_tiny_tokenizer
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    initialize_parallel(tp=2)
    opts = LoaderOptions(shards=root, recipe="balanced", min_len=256, max_len=1024, max_seq_len=1024, num_workers=2,
                         seed=11, pack_buffer=3, task_weights={"extraction": 1, "reasoning": 1})
    loader = build_train_loader(opts, build_tiny_tokenizer())  # DP rank/size from parallel_state
    hashes, seen = [], []
    for i, b in enumerate(loader):
        h = hashlib.sha1()
        for k in sorted(b):
            h.update(k.encode() + b[k].numpy().tobytes())
        hashes.append(h.hexdigest())
        info = loader.last_info
        seen += list(zip(info["keys"], info["epochs"]))
        if i + 1 == BATCHES:
            break
    return ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank(), hashes, seen


def test_dp2_tp2_split(tmp_path):
    from tests.unit.data.shardsets import make_needle_shards

    root = make_needle_shards(tmp_path / "shards", per_pool=4)
    res = run_distributed(_rank_stream, 4, str(root), timeout=300)
    by_dp = {}
    for dp, tp, hashes, seen in res:
        by_dp.setdefault(dp, []).append((tp, hashes, seen))
    assert sorted(by_dp) == [0, 1] and all(len(v) == 2 for v in by_dp.values())
    for dp, peers in by_dp.items():  # TP peers: bit-identical batches
        assert peers[0][1] == peers[1][1], f"TP peers of DP rank {dp} got different batches"
    first_epoch = {dp: [k for k, e in peers[0][2] if e == 0] for dp, peers in by_dp.items()}
    for dp, keys in first_epoch.items():
        assert len(keys) == len(set(keys)), f"DP rank {dp} repeats a sample within an epoch"
    assert not set(first_epoch[0]) & set(first_epoch[1]), "DP ranks share samples"
    # union over DP ranks of each pool's first epoch = every sample of the pool (each rank got its half)
    from megatron_mmpl.data.mixture import PoolSet
    from megatron_mmpl.data.shards import load_index

    pools = PoolSet.from_index(str(root), load_index(root)).pools
    union = set(first_epoch[0]) | set(first_epoch[1])
    for p in pools:
        assert set(p.keys) <= union, f"pool {p.name}: epoch not covered: missing {sorted(set(p.keys) - union)}"
    assert union == {k for p in pools for k in p.keys}
    assert len(first_epoch[0]) == len(first_epoch[1]) == len(union) // 2
