"""CoreAttention equals a plain masked softmax attention (fp32, ≤1e-6) for packed/unpacked, causal/bidirectional,
GQA, every backend; the CP block plan reproduces the full result on every rank's zigzag share."""

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from megatron_mmpl.attention.core_attention import CoreAttention
from megatron_mmpl.attention.flex import document_block_mask, flex_packed
from megatron_mmpl.attention.sdpa import sdpa_blocks
from megatron_mmpl.attention.segments import group_blocks, plan_blocks, token_coords
from megatron_mmpl.parallel.context_parallel import pad_cu_seqlens, zigzag_index

pytestmark = pytest.mark.unit

NQ, NKV, D = 4, 2, 8
TOL = 1e-6


def _config(**kw):
    return TransformerConfig(num_layers=1, hidden_size=NQ * D, num_attention_heads=NQ, num_query_groups=NKV,
                             attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True, **kw)


def _reference(q, k, v, cu, causal, scale=None, keep=None):
    """Plain attention with an explicit [b, sq, sk] mask built from segment ids (and causality)."""
    sq, b, nq, d = q.shape
    k = k.repeat_interleave(nq // k.shape[2], dim=2)
    v = v.repeat_interleave(nq // v.shape[2], dim=2)
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
    allow = seg[:, None] == seg[None, :]
    if causal:
        allow &= torch.ones(sq, sq, dtype=torch.bool).tril()
    allow = allow.expand(b, sq, sq)
    if keep is not None:
        allow = allow & keep
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * (scale or 1 / math.sqrt(d))
    scores = scores.masked_fill(~allow[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num()  # fully masked rows (padding) → 0
    return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(sq, b, nq * d)


def _qkv(s, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, NQ, D, generator=g), torch.randn(s, b, NKV, D, generator=g),
            torch.randn(s, b, NKV, D, generator=g))


def _attn(mask_type=AttnMaskType.causal, backend=None, **kw):
    return CoreAttention(_config(), 1, mask_type, "self", backend=backend, **kw).eval()


CU = [0, 5, 6, 13, 24]  # uneven segments, one of length 1


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask])
def test_packed_matches_masked_reference(backend, mask_type):
    q, k, v = _qkv(CU[-1])
    psp = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor(CU, dtype=torch.int32),
                          cu_seqlens_kv=torch.tensor(CU, dtype=torch.int32))
    out = _attn(mask_type, backend)(q, k, v, None, packed_seq_params=psp)
    ref = _reference(q, k, v, CU, mask_type == AttnMaskType.causal)
    assert out.shape == (CU[-1], 1, NQ * D)
    assert (out - ref).abs().max() <= TOL


def test_thd_input_and_custom_scale_and_trailing_padding():
    q, k, v = _qkv(26)  # rows 24..25 are after cu_seqlens[-1]: they form one extra segment
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor(CU, dtype=torch.int32),
                          cu_seqlens_kv=torch.tensor(CU, dtype=torch.int32))
    out = _attn(softmax_scale=0.3)(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=psp)
    ref = _reference(q, k, v, CU + [26], True, scale=0.3)
    assert out.shape == (26, NQ * D)
    assert (out - ref[:, 0]).abs().max() <= TOL


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_unpacked_batch_rows_are_segments(backend):
    q, k, v = _qkv(7, b=3)
    out = _attn(backend=backend)(q, k, v, None)
    assert (out - _reference(q, k, v, [0, 7], True)).abs().max() <= TOL


def test_unpacked_padding_mask_follows_megatron_convention():
    q, k, v = _qkv(6, b=2)
    masked = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    masked[1, ..., 4:] = True  # True = do not attend (megatron); row 1 has two padding keys
    out = _attn(AttnMaskType.padding)(q, k, v, masked)
    ref = _reference(q, k, v, [0, 6], False, keep=~masked[:, 0])
    assert (out - ref).abs().max() <= TOL


def test_dropout_only_in_training():
    cfg = _config()
    cfg.attention_dropout = 0.5
    attn = CoreAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(8)
    ref = _reference(q, k, v, [0, 8], True)
    assert (attn.eval()(q, k, v, None) - ref).abs().max() <= TOL
    assert (attn.train()(q, k, v, None) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("cp", [2, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_cp_blocks_reproduce_full_attention_on_each_share(cp, causal):
    """Each rank's zigzag share of queries against the full K/V equals the same rows of full attention."""
    cu = pad_cu_seqlens([0, 5, 6, 17], 2 * cp)
    q, k, v = _qkv(cu[-1], seed=1)
    ref = _reference(q, k, v, cu, causal)
    for rank in range(cp):
        idx = zigzag_index(cu, rank, cp)
        blocks = plan_blocks(cu, causal, rank, cp)
        out = sdpa_blocks(q[idx], k, v, group_blocks(blocks, "cpu"), 1 / math.sqrt(D))
        out = out.reshape(len(idx), 1, -1)
        assert (out - ref[idx]).abs().max() <= TOL, ("sdpa", rank)
        coords = token_coords(blocks, cu, "cpu")
        mask = document_block_mask(("t", tuple(cu), rank, cp, causal), lambda c=coords: c, causal)
        out = flex_packed(q[idx], k, v, mask, 1 / math.sqrt(D)).reshape(len(idx), 1, -1)
        assert (out - ref[idx]).abs().max() <= TOL, ("flex", rank)


def test_backend_selection():
    from megatron_mmpl.attention.backend import auto_backend, set_attention_backend

    cfg = set_attention_backend(_config(), "flex")
    assert CoreAttention(cfg, 1, AttnMaskType.causal, "self").backend == "flex"
    assert CoreAttention(cfg, 1, AttnMaskType.causal, "self", backend="sdpa").backend == "sdpa"
    assert CoreAttention(_config(), 1, AttnMaskType.causal, "self").backend == "auto"
    assert auto_backend("cpu", 1000, 10) == "sdpa"
    assert auto_backend("cuda", 1000, 100) == "flex" and auto_backend("cuda", 2, 65536) == "sdpa"
    with pytest.raises(ValueError, match="not one of"):
        set_attention_backend(_config(), "flash")


@pytest.mark.parametrize("causal", [True, False])
def test_equal_blocks_run_batched_and_land_in_row_order(causal):
    """ViT-like rows: many equal windows with smaller edge windows between them (gathered groups), and equal
    back-to-back frames (a view): grouped SDPA equals per-segment attention, rows in their own order."""
    windows = [0]
    for size in [16, 16, 16, 12] * 3 + [9]:
        windows.append(windows[-1] + size)
    frames = [0, 20, 40, 60]
    for cu in (windows, frames):
        q, k, v = _qkv(cu[-1], b=2, seed=3)
        plan = group_blocks(plan_blocks(cu, causal), "cpu")
        assert len(plan.groups) == len(set(b - a for a, b in zip(cu[:-1], cu[1:])))
        out = sdpa_blocks(q, k, v, plan, 1 / math.sqrt(D)).reshape(cu[-1], 2, -1)
        assert (out - _reference(q, k, v, cu, causal)).abs().max() <= TOL
    frames_plan = group_blocks(plan_blocks(frames, causal), "cpu")
    assert frames_plan.perm is None and frames_plan.inverse is None  # frames: a view, no reorder
    windows_plan = group_blocks(plan_blocks(windows, causal), "cpu")
    assert windows_plan.perm is not None and torch.equal(windows_plan.perm[windows_plan.inverse],
                                                         torch.arange(windows[-1]))


def test_grouped_sdpa_gradients_equal_per_segment():
    """The reorder's hand-written backward (gather by the inverse) gives the reference gradients."""
    cu = [0, 16, 28, 44, 56, 72]
    q, k, v = (t.requires_grad_() for t in _qkv(cu[-1], seed=4))
    out = sdpa_blocks(q, k, v, group_blocks(plan_blocks(cu, False), "cpu"), 1 / math.sqrt(D))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = torch.autograd.grad(_reference(q, k, v, cu, False).square().sum(), (q, k, v))
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(grads, ref))


def test_groups_back_to_back_are_cut_by_one_split():
    """Windows of one size back to back (the ViT tower's regrouping): the groups tile the row in order, q, k, v are
    cut by one torch.split each (its backward writes each gradient once), and values and gradients equal the
    reference."""
    from megatron_mmpl.attention.sdpa import _tiling

    cu = [0, 16, 32, 48, 60, 72, 81]  # three windows of 16, two of 12, one of 9, in that order
    plan = group_blocks(plan_blocks(cu, False), "cpu")
    assert plan.perm is None and _tiling(plan, cu[-1], cu[-1]) == [48, 24, 9]
    q, k, v = (t.requires_grad_() for t in _qkv(cu[-1], b=2, seed=5))
    out = sdpa_blocks(q, k, v, plan, 1 / math.sqrt(D))
    seen = set()

    def walk(fn):  # the autograd graph between the output and q
        if fn is not None and fn not in seen:
            seen.add(fn)
            for nxt, _ in fn.next_functions:
                walk(nxt)

    walk(out.grad_fn)
    names = {type(f).__name__ for f in seen}
    assert any(n.startswith("Split") for n in names) and not any(n.startswith("Slice") for n in names), names
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_out = _reference(q, k, v, cu, False)
    ref = torch.autograd.grad(ref_out.square().sum(), (q, k, v))
    assert (out.reshape(cu[-1], 2, -1) - ref_out).abs().max() <= TOL
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(grads, ref))
    apart = group_blocks(plan_blocks([0, 16, 28, 44], False), "cpu")  # the 16s not adjacent: the plan's reorder
    assert apart.perm is not None and _tiling(apart, 44, 44) == [32, 12]  # puts them back to back first
    cp = group_blocks(plan_blocks([0, 16, 32], True, 0, 2), "cpu")  # CP: keys are not the queries' own rows
    assert _tiling(cp, 16, 32) is None
