"""Loader over real shards: exact resume with workers > 0, corrupt samples skipped/counted/aborted, build checks."""

import json
import shutil

import numpy as np
import pytest
import torch

from megatron_mmpl.data.loader import DecodeAbort, LoaderOptions, build_train_loader
from megatron_mmpl.data.shards import load_index, load_shard_samples
from megatron_mmpl.data.tokenizer import build_tiny_tokenizer, special_ids

from .shardsets import make_needle_shards

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_needle_shards(tmp_path_factory.mktemp("needle") / "shards")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _opts(root, **kw):
    base = dict(shards=str(root), recipe="balanced", min_len=256, max_len=1024, max_seq_len=1024, num_workers=2,
                seed=7, pack_buffer=3, pad_multiple=4, task_weights={"extraction": 8, "reasoning": 2})
    base.update(kw)
    return LoaderOptions(**base)


def _take(loader, n):
    out = []
    for b in loader:
        out.append({k: v.clone() for k, v in b.items()})
        if len(out) == n:
            break
    return out


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_workers_is_exact(shards, tok):
    k, m = 3, 5
    ref = _take(build_train_loader(_opts(shards), tok, dp_rank=0, dp_size=1), k + m)
    first = build_train_loader(_opts(shards), tok, dp_rank=0, dp_size=1)
    got = _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able: goes into any checkpoint
    assert all(_same(a, b) for a, b in zip(got, ref[:k]))
    fresh = build_train_loader(_opts(shards), tok, dp_rank=0, dp_size=1)
    fresh.load_state_dict(state)
    rest = _take(fresh, m)
    assert all(_same(a, b) for a, b in zip(rest, ref[k:])), "resumed batches differ from the uninterrupted run"
    # a second save/restore from the resumed loader also lands exactly (rotation of workers composes)
    again = build_train_loader(_opts(shards), tok, dp_rank=0, dp_size=1)
    again.load_state_dict(json.loads(json.dumps(fresh.state_dict())))
    more = _take(build_train_loader(_opts(shards), tok, dp_rank=0, dp_size=1), k + m + 2)[k + m:]
    assert all(_same(a, b) for a, b in zip(_take(again, 2), more))
    # iterating the same loader again continues where it stopped (no replay)
    cont = build_train_loader(_opts(shards), tok, dp_rank=0, dp_size=1)
    _take(cont, k)
    assert all(_same(a, b) for a, b in zip(_take(cont, m), ref[k:]))
    # different seed -> different stream; wrong worker count -> clear error
    other = _take(build_train_loader(_opts(shards, seed=8), tok, dp_rank=0, dp_size=1), 2)
    assert not all(_same(a, b) for a, b in zip(other, ref[:2]))
    with pytest.raises(ValueError, match="num_workers"):
        build_train_loader(_opts(shards, num_workers=1), tok, dp_rank=0, dp_size=1).load_state_dict(state)


def test_batches_follow_contract(shards, tok):
    loader = build_train_loader(_opts(shards, num_workers=0), tok, dp_rank=0, dp_size=1)
    sid = special_ids(tok)
    for b in _take(loader, 4):
        s = b["input_ids"].shape[1]
        cu = b["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == s and s <= 1024 and ((cu[1:] - cu[:-1]) % 4 == 0).all()
        assert b["position_ids"].shape == (3, 1, s) and b["labels"].shape == (1, s)
        n_pad_tok = int((b["input_ids"] == sid.image_pad).sum())
        assert n_pad_tok == int(b["image_grid_thw"].prod(1).sum()) // 4
        assert b["pixel_values"].shape == (int(b["image_grid_thw"].prod(1).sum()), 3 * 2 * 14 * 14)
        # each sample supervises exactly its colour word + <|im_end|>
        assert int(b["loss_mask"].sum()) == 2 * (len(cu) - 1)
        sup = b["labels"][b["loss_mask"].bool()]
        assert int((sup == sid.im_end).sum()) == len(cu) - 1
    assert loader.stats()["corrupt"] == 0


def test_corrupt_samples_skipped_counted_then_abort(shards, tok, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    index = load_index(bad)
    rows = [(sh, r) for sh in index["shards"] for r in load_shard_samples(bad, sh)]
    victims = rows[::3]
    for sh, (_, off, _, _) in victims:  # garble the JSON header member of every third sample
        with open(bad / sh["path"], "r+b") as f:
            f.seek(off + 512)
            f.write(b"\xff" * 16)
    loader = build_train_loader(_opts(bad, num_workers=0), tok, dp_rank=0, dp_size=1)
    _take(loader, 12)
    st = loader.stats()
    assert st["corrupt"] > 0 and st["samples"] > 0
    assert "skipping undecodable sample" in caplog.text
    for sh, (_, off, _, _) in rows:
        with open(bad / sh["path"], "r+b") as f:
            f.seek(off + 512)
            f.write(b"\xff" * 16)
    with pytest.raises(DecodeAbort, match="consecutive samples failed"):
        _take(build_train_loader(_opts(bad, num_workers=0, max_consecutive_failures=3), tok, dp_rank=0,
                                 dp_size=1), 1)


def test_long_samples_skipped_or_refused(shards, tok):
    loader = build_train_loader(_opts(shards, num_workers=0, max_seq_len=600, max_len=1024), tok,
                                dp_rank=0, dp_size=1)
    for b in _take(loader, 3):
        assert b["input_ids"].shape[1] <= 600
    assert loader.stats()["skipped_long"] > 0
    strict = build_train_loader(_opts(shards, num_workers=0, max_seq_len=600, skip_long=False), tok,
                                dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="max_seq_len"):
        _take(strict, 3)


def test_wrong_tokenizer_is_refused(shards):
    with pytest.raises(ValueError, match="tokenizer"):
        build_train_loader(_opts(shards), build_tiny_tokenizer(first_added_id=600), dp_rank=0, dp_size=1)


def test_needle_pages_are_separable(shards, tok):
    """The needle is learnable by construction: only the marked page has saturated colour."""
    from megatron_mmpl.data.images import ImageProcessor
    from megatron_mmpl.data.schema import Sample
    from megatron_mmpl.data.shards import read_members

    index = load_index(shards)
    sh = index["shards"][0]
    key, off, nb, _ = load_shard_samples(shards, sh)[0]
    with open(shards / sh["path"], "rb") as f:
        s = Sample.from_members(*read_members(f, off, nb))
    sat = []
    for page in s.pages:
        pv, _ = ImageProcessor()(page)
        rgb = pv.reshape(-1, 3, 2, 14, 14)[:, :, 0].transpose(1, 0, 2, 3).reshape(3, -1)
        sat.append(float((rgb.max(0) - rgb.min(0)).max()))
    assert int(np.argmax(sat)) == s.evidence_pages[0] == s.meta["marked_page"]
    assert s.meta["chance"] == 0.25 and s.messages[-1]["content"][0]["text"] in s.meta["choices"]


def test_a_second_source_gets_its_token_share_and_resumes_exactly(shards, tok, tmp_path):
    """data.sources: short samples (another shard directory) mixed in at 25 % of the drawn tokens."""
    short = make_needle_shards(tmp_path / "short", per_pool=4, targets=(256,), seed=3)
    short_keys = {k for sh in load_index(short)["shards"] for k, *_ in load_shard_samples(short, sh)}
    assert short_keys.isdisjoint(k for sh in load_index(shards)["shards"] if sh["bucket"] != "256"
                                 for k, *_ in load_shard_samples(shards, sh))
    opts = _opts(shards, num_workers=0, min_len=512, max_len=1024, max_seq_len=2048, sources={str(short): 0.25})
    loader = build_train_loader(opts, tok, dp_rank=0, dp_size=1)
    ds = loader.dataset
    assert len(ds.ps.pools) == 6 + 2 and abs(ds.weights[-2:].sum() - 0.25) < 1e-9
    tokens = {"short": 0, "main": 0}
    for i, _ in enumerate(loader):
        for key, n in zip(loader.last_info["keys"], loader.last_info["lengths"]):
            tokens["short" if key in short_keys else "main"] += n
        if i == 59:
            break
    share = tokens["short"] / sum(tokens.values())
    assert 0.17 < share < 0.33, tokens  # 25 % of tokens in expectation; ~100 samples drawn
    state = loader.state_dict()
    after = _take(loader, 3)
    again = build_train_loader(opts, tok, dp_rank=0, dp_size=1)
    again.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(after, _take(again, 3)))
    bad = _opts(shards, sources={str(tmp_path / "none"): 0.1})
    with pytest.raises(FileNotFoundError):
        build_train_loader(bad, tok, dp_rank=0, dp_size=1)
