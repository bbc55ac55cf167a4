"""CP=2 (2 ranks) and CP=2×TP=2 (4 ranks) equal CP=1 on the same packed batch:
logits, loss and gradients within 1e-5 relative (fp32, gloo), with samples whose lengths are not multiples of 2·CP."""

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed
from tests.distributed.attention_models import build_gpt, packed_batch

pytestmark = pytest.mark.distributed

RTOL = 1e-5


def _loss_logits_grads(tp, cp, full_sd, variants):
    """Per variant (backend, sequence_parallel): global loss, full-row logits [1,s,V], full gradients."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_mmpl.parallel.context_parallel import packed_seq_params, reduce_loss_across_cp, split_packed_batch
    from megatron_mmpl.parallel.process_groups import initialize_parallel
    from megatron_mmpl.parallel.tensor_shards import gather_full_state_dict, load_full_state_dict

    initialize_parallel(tp=tp, cp=cp)
    cp_group, cp_rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    batch = packed_batch()
    n_tokens = batch["loss_mask"].sum()
    out = {}
    for backend, sp in variants:
        torch.manual_seed(0)
        model = build_gpt(tp, cp, sequence_parallel=sp, backend=backend)
        if full_sd is not None:
            load_full_state_dict(model, full_sd)
        local = split_packed_batch(batch, cp_rank, cp, multiple=2 * cp * (tp if sp else 1)) if cp > 1 else batch
        psp = packed_seq_params(local["cu_seqlens"])
        labels = local["labels"].clamp_min(0)
        grads = backend != "flex"  # torch's FlexAttention has no CPU backward: forward only
        with torch.set_grad_enabled(grads):
            loss = model(local["input_ids"], local["position_ids"], None, labels=labels, packed_seq_params=psp)
        loss_sum = (loss * local["loss_mask"]).sum()
        if grads:
            (loss_sum / n_tokens).backward()
        # what DDP over the dp×cp group and finalize_model_grads (SP layer norms over TP) do in training
        for p in model.parameters() if grads else ():
            if cp > 1:
                dist.all_reduce(p.grad, group=cp_group)
            if sp and getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        total, count = reduce_loss_across_cp(loss_sum, local["loss_mask"].sum(), cp_group if cp > 1 else None)
        with torch.no_grad():
            logits = model(local["input_ids"], local["position_ids"], None, packed_seq_params=psp,
                           runtime_gather_output=True)
            logits = local["cp_plan"].gather(logits, seq_dim=1, group=cp_group) if cp > 1 else logits
        g = gather_full_state_dict(model, grads=True) if grads else None
        out[(backend, sp)] = ((total / count).item(), count.item(), logits, g)
    return out, (gather_full_state_dict(model) if full_sd is None else None)


def _check(ref, got):
    loss1, count1, logits1, g1 = ref
    loss2, count2, logits2, g2 = got
    assert count2 == count1
    assert abs(loss2 - loss1) <= RTOL * abs(loss1), (loss2, loss1)
    assert logits2.shape == logits1.shape, (logits2.shape, logits1.shape)
    assert (logits2 - logits1).abs().max() <= RTOL * logits1.abs().max()
    if g2 is None:
        return
    assert g2.keys() == g1.keys()
    for n in g1:
        rel = (g2[n] - g1[n]).norm() / g1[n].norm().clamp_min(1e-12)
        assert rel <= RTOL, (n, rel.item())


@pytest.fixture(scope="module")
def reference():
    ((res, weights),) = run_distributed(_loss_logits_grads, 1, 1, 1, None, [("sdpa", False)])
    return res[("sdpa", False)], weights


def test_cp2_equals_cp1(reference):
    ref, weights = reference
    for res, _ in run_distributed(_loss_logits_grads, 2, 1, 2, weights, [("sdpa", False), ("flex", False)]):
        for variant, got in res.items():
            try:
                _check(ref, got)
            except AssertionError as e:
                raise AssertionError(f"variant {variant}: {e}") from e


def test_cp2_tp2_equals_cp1(reference):
    ref, weights = reference
    for res, _ in run_distributed(_loss_logits_grads, 4, 2, 2, weights, [("sdpa", False), ("flex", False)]):
        for variant, got in res.items():
            try:
                _check(ref, got)
            except AssertionError as e:
                raise AssertionError(f"variant {variant}: {e}") from e


GRIDS = [[1, 4, 4], [1, 8, 8], [1, 2, 2], [1, 4, 6], [1, 6, 6]]


def _toy_vit(pixels, w):
    """Stands in for the ViT + 2×2 merger: 4 consecutive patches → one embedding."""
    return (pixels @ w).view(-1, 4, w.shape[1]).sum(1)


def _image_embeddings_over_cp(cp):
    """Each CP rank encodes its share of images; all-gathered embeddings and weight grads returned."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_mmpl.parallel.context_parallel import (
        encode_vision_over_cp,
        gather_image_embeddings,
        partition_images_for_cp,
    )
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    initialize_parallel(cp=cp)
    rank, group = ps.get_context_parallel_rank(), ps.get_context_parallel_group()
    grids = torch.tensor(GRIDS)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grids.prod(-1).sum()), 3, generator=g)
    w = torch.randn(3, 5, generator=g).requires_grad_()
    _, rows = partition_images_for_cp(grids, rank, cp)
    full = gather_image_embeddings(_toy_vit(pixels[rows], w), grids, cp, 2, group)
    coef = torch.randn(full.shape, generator=torch.Generator().manual_seed(10 + rank))  # rank-specific use
    (full * coef).sum().backward()
    dist.all_reduce(w.grad, group=group)
    # the one-call form, with a single image: one rank encodes it, the other encodes nothing but still has grads
    seen = []
    w2 = w.detach().clone().requires_grad_()
    one = grids[:1]
    emb = encode_vision_over_cp(lambda px, grid: seen.append(len(px)) or _toy_vit(px, w2), pixels[:16], one, 2, group)
    emb.sum().backward()
    return rows.stop - rows.start, full.detach(), w.grad, emb.detach(), w2.grad, seen


def test_images_partitioned_across_cp_and_embeddings_gathered():
    res = run_distributed(_image_embeddings_over_cp, 2, 2)
    g = torch.Generator().manual_seed(0)
    grids = torch.tensor(GRIDS)
    total = int(grids.prod(-1).sum())
    pixels = torch.randn(total, 3, generator=g)
    w = torch.randn(3, 5, generator=g).requires_grad_()
    full = _toy_vit(pixels, w)
    coefs = [torch.randn(full.shape, generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]
    sum((full * c).sum() for c in coefs).backward()
    counts = [r[0] for r in res]
    assert sum(counts) == total  # each patch encoded once, not CP times
    assert all(abs(n - total / 2) <= grids.prod(-1).max() for n in counts), counts  # about half each
    for _, emb, grad, *_ in res:
        assert (emb - full.detach()).abs().max() <= 1e-6
        assert (grad - w.grad).abs().max() <= 1e-5 * w.grad.abs().max()
    w1 = w.detach().clone().requires_grad_()
    one = _toy_vit(pixels[:16], w1)
    (2 * one.sum()).backward()  # both ranks use the embeddings
    assert [r[5] for r in res] == [[16], [16]]  # the image's 16 patches; the empty rank encodes it too...
    for _, _, _, emb, _, _ in res:
        assert (emb - one.detach()).abs().max() <= 1e-6  # ...but only one copy enters the result
    assert all(r[4] is not None for r in res)  # the empty rank's ViT has (zero) gradients
    assert (res[0][4] + res[1][4] - w1.grad).abs().max() <= 1e-5 * w1.grad.abs().max()
