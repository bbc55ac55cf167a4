"""Megatron-Core runs on CPU/gloo through our runtime: TP=2 equals TP=1; dist checkpoints reshard bit-exactly."""

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed
from tests.distributed.attention_models import VOCAB, build_gpt

pytestmark = pytest.mark.distributed

SEQ, BATCH = 12, 2


def _build_gpt(tp: int, pp: int = 1):
    """megatron's stock GPTModel (local spec, its own attention) at this layout."""
    return build_gpt(tp=tp, pp=pp, stock_attention=True)


def _inputs():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(3, BATCH, SEQ).clone()
    pos[1] = pos[1] // 2  # distinct 3D positions per axis
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return tokens, pos, labels


def _tp_loss_and_grads(tp: int, full_sd: dict | None):
    """Loss, full (gathered) gradients and full weights of a GPTModel at TP=tp (weights from `full_sd` if given)."""
    from megatron_mmpl.parallel.process_groups import initialize_parallel
    from megatron_mmpl.parallel.tensor_shards import gather_full_state_dict, load_full_state_dict

    initialize_parallel(tp=tp)
    torch.manual_seed(0)
    model = _build_gpt(tp)
    if full_sd is not None:
        load_full_state_dict(model, full_sd)
    tokens, pos, labels = _inputs()
    mask = torch.ones(BATCH, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    loss = model(tokens, pos, mask, labels=labels).float().mean()
    loss.backward()
    return loss.item(), gather_full_state_dict(model, grads=True), gather_full_state_dict(model)


def test_tp2_matches_tp1_loss_and_grads():
    ((loss1, g1, w1),) = run_distributed(_tp_loss_and_grads, 1, 1, None)
    res = run_distributed(_tp_loss_and_grads, 2, 2, w1)
    for loss2, g2, w2 in res:
        assert all(torch.equal(w2[n], w1[n]) for n in w1)
        assert abs(loss2 - loss1) <= 1e-5 * abs(loss1), (loss2, loss1)
        assert g2.keys() == g1.keys()
        for n in g1:
            rel = (g2[n] - g1[n]).norm() / g1[n].norm().clamp_min(1e-12)
            assert rel <= 1e-5, (n, rel.item())


def _save_tp1(ckpt_dir: str):
    from megatron.core import dist_checkpointing

    from megatron_mmpl.parallel.process_groups import initialize_parallel

    initialize_parallel()
    torch.manual_seed(1)
    model = _build_gpt(1)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _load_at(ckpt_dir: str, tp: int, pp: int):
    import re

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_mmpl.parallel.process_groups import initialize_parallel
    from megatron_mmpl.parallel.tensor_shards import gather_full_state_dict

    initialize_parallel(tp=tp, pp=pp)
    torch.manual_seed(2)  # different init: everything must come from the checkpoint
    model = _build_gpt(tp, pp)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    offset = ps.get_pipeline_model_parallel_rank() * (2 // pp)
    rename = lambda n: re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + offset}.", n)
    return {rename(n): t for n, t in gather_full_state_dict(model).items()}


def test_dist_checkpoint_tp1_reshards_to_tp2_and_pp2(tmp_path):
    ckpt = str(tmp_path / "tp1")
    (tmp_path / "tp1").mkdir()
    (saved,) = run_distributed(_save_tp1, 1, ckpt)
    for tp, pp in ((2, 1), (1, 2)):
        per_rank = run_distributed(_load_at, 2, ckpt, tp, pp)
        seen = set()
        for loaded in per_rank:
            for n, t in loaded.items():
                assert torch.equal(t, saved[n]), (tp, pp, n)
                seen.add(n)
        assert seen == set(saved), (tp, pp, set(saved) ^ seen)
