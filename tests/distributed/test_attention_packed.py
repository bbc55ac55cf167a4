"""Packed rows through a tiny mrope GPTModel with CoreAttention: logits equal each sample run alone (fp32, ≤1e-5),
and equal megatron's stock local DotProductAttention on the unpacked samples."""

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed
from tests.distributed.attention_models import build_gpt, packed_batch

pytestmark = pytest.mark.distributed


def _packed_vs_unpacked():
    from megatron_mmpl.parallel.context_parallel import packed_seq_params
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    initialize_parallel()
    torch.manual_seed(0)
    ref_model = build_gpt(stock_attention=True).eval()
    batch = packed_batch()
    cu = batch["cu_seqlens"].tolist()
    out = {}
    with torch.no_grad():
        per_sample_stock = []
        for a, b in zip(cu[:-1], cu[1:]):
            n = b - a
            mask = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)
            per_sample_stock.append(ref_model(batch["input_ids"][:, a:b], batch["position_ids"][:, :, a:b], mask))
        stock = torch.cat(per_sample_stock, 1)
        for backend in ("sdpa", "flex"):
            model = build_gpt(backend=backend).eval()
            model.load_state_dict(ref_model.state_dict())
            packed = model(batch["input_ids"], batch["position_ids"], None,
                           packed_seq_params=packed_seq_params(batch["cu_seqlens"]))
            alone = torch.cat([model(batch["input_ids"][:, a:b], batch["position_ids"][:, :, a:b], None)
                               for a, b in zip(cu[:-1], cu[1:])], 1)
            out[backend] = ((packed - alone).abs().max().item(), (alone - stock).abs().max().item(),
                            stock.abs().max().item(), packed.shape)
    return out


def test_packed_logits_equal_per_sample_logits():
    (res,) = run_distributed(_packed_vs_unpacked, 1)
    for backend, (d_pack, d_stock, scale, shape) in res.items():
        assert shape[1] == sum((7, 10, 1, 5)), shape
        assert d_pack <= 1e-5 * max(1.0, scale), (backend, d_pack)
        assert d_stock <= 1e-5 * max(1.0, scale), (backend, d_stock)
