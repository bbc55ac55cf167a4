"""The training loss of models/qwen25vl/language_model.py (supervised positions only, in checkpointed chunks) equals
megatron's unchunked path on the supervised tokens: per-token loss and the gradients of both towers of the masked
loss, fp32, at TP=1 and at TP=2 with sequence parallelism (≤1e-6 relative); unsupervised positions get loss 0."""

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed
PARTS = [4, ("image", 1, 4, 6), 3, ("image", 1, 8, 4), 5]  # 28 tokens
TOL = 1e-6


def _loss_and_grads(weights, tp, sp, chunk):
    from megatron_mmpl.models.qwen25vl.build import build_model, gather_full_weights, load_full_weights
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset
    from megatron_mmpl.models.qwen25vl.testing import mm_prompt
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    layout = initialize_parallel(tp=tp)
    cfg = hf_config_from_preset("tiny")
    model = build_model(cfg, layout, sequence_parallel=sp)
    load_full_weights(model, weights)
    model.language_model.loss_chunk_tokens = chunk
    batch = mm_prompt(cfg, PARTS, seed=1)
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, cfg.text_config.vocab_size, batch["input_ids"].shape, generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.6] = -100  # unsupervised positions, as the data marks them
    mask = (labels >= 0).float()
    loss = model(batch["input_ids"], batch["position_ids"], pixel_values=batch["pixel_values"],
                 image_grid_thw=batch["image_grid_thw"], labels=labels)
    (loss.float() * mask).sum().backward()
    loss = loss.detach().float() * mask
    if sp:  # megatron's finalize step all-reduces the grads of SP-replicated params (norms) over TP
        from megatron.core import parallel_state as ps

        for p in model.parameters():
            if getattr(p, "sequence_parallel", False) and p.grad is not None:
                torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    return loss, gather_full_weights(model, grads=True), (loss.detach() != 0).sum().item()


@pytest.fixture(scope="module")
def weights():
    from megatron_mmpl.models.qwen25vl.hf_mapping import hf_to_mcore_dict
    from megatron_mmpl.models.qwen25vl.testing import tiny_hf_model

    hf = tiny_hf_model("tiny", seed=0)
    return hf_to_mcore_dict(hf.state_dict(), hf.config)


def _close(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item() <= TOL


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)])
def test_chunked_loss_equals_unchunked(weights, tp, sp):
    ref = run_distributed(_loss_and_grads, tp, weights, tp, sp, 0)
    got = run_distributed(_loss_and_grads, tp, weights, tp, sp, 5)  # 28 tokens: chunks of 5 local positions
    for (l0, g0, _), (l1, g1, nonzero) in zip(ref, got):
        assert l1.shape == l0.shape and _close(l1, l0), (l1 - l0).abs().max()
        assert 0 < nonzero < l1.numel()
        assert g1.keys() == g0.keys()
        bad = [n for n in g0 if not _close(g1[n], g0[n])]
        assert not bad, bad
