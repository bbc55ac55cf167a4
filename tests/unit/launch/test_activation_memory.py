"""The planner's per-layer activation formula equals, to the byte, what autograd keeps for one real LM layer and
one ViT block of this trainer (megatron local layer + CoreAttention), at TP=2 with sequence parallel (LM), for
recompute none / selective / full; fp32 on CPU (so with torch's composite RMSNorm: fused_norm=False)."""

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

SEQ = 512
CU = [0, 200, 512]  # two packed samples (LM); the ViT gets three windows
CU_VIT = [0, 64, 128, 512]


def _shape_dict():
    from megatron_mmpl.models.qwen25vl.presets import preset_dict

    raw = preset_dict("tiny")
    raw["text_config"].update(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=1)
    raw["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]
    raw["vision_config"].update(hidden_size=128, intermediate_size=384, num_heads=4, out_hidden_size=256)
    return raw


def _saved_bytes(module, x, **kw) -> int:
    """Bytes of distinct storages autograd saves in one forward (parameters and the input excluded)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t is not x:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x, attention_mask=None, **kw)
    return sum(seen.values())


def _measure(tp: int):
    from megatron.core.transformer.spec_utils import build_module
    from transformers import Qwen2_5_VLConfig

    from megatron_mmpl.models.qwen25vl.configs import megatron_configs
    from megatron_mmpl.models.qwen25vl.specs import language_layer_spec, packed_seq_params, vision_layer_spec
    from megatron_mmpl.parallel.process_groups import destroy_parallel, initialize_parallel

    initialize_parallel(tp=tp)
    torch.manual_seed(0)
    hf = Qwen2_5_VLConfig(**_shape_dict())
    out = {}
    for recompute in ("none", "selective", "full"):
        over = {} if recompute == "none" else (
            {"recompute_granularity": "selective"} if recompute == "selective" else
            {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1})
        cfgs = megatron_configs(hf, tp=tp, sequence_parallel=tp > 1, overrides=over)
        h, hv = cfgs.language.hidden_size, cfgs.vision.hidden_size
        psp = packed_seq_params(torch.tensor(CU, dtype=torch.int32))
        if recompute == "full":  # megatron checkpoints whole layers in TransformerBlock; measure through one
            from megatron.core.transformer.transformer_block import TransformerBlock

            from megatron_mmpl.models.qwen25vl.specs import block_spec

            lm = TransformerBlock(cfgs.language, block_spec(language_layer_spec("sdpa"), cfgs.language),
                                  post_layer_norm=False)
        else:
            lm = build_module(language_layer_spec("sdpa"), config=cfgs.language, layer_number=1)
        x = torch.randn(SEQ // tp, 1, h, requires_grad=True)  # sequence parallel: this rank's rows
        rope = torch.randn(SEQ, 1, 1, h // cfgs.language.num_attention_heads)
        saved = _saved_bytes(lm, x, rotary_pos_emb=rope, packed_seq_params=psp)
        out[f"lm_{recompute}"] = (saved + x.nbytes) / SEQ  # per token of the row (SP shards only norm regions)
        if recompute != "full":
            vit = build_module(vision_layer_spec((), "sdpa"), config=cfgs.vision, layer_number=1)
            xv = torch.randn(SEQ, 1, hv, requires_grad=True)
            ropev = torch.randn(SEQ, 1, 1, hv // cfgs.vision.num_attention_heads)
            segs = packed_seq_params(torch.tensor(CU_VIT, dtype=torch.int32))
            out[f"vit_{recompute}"] = (_saved_bytes(vit, xv, rotary_pos_emb=ropev, packed_seq_params=segs)
                                       + xv.nbytes) / SEQ
    destroy_parallel()
    return out


def test_formula_matches_saved_tensors():
    from megatron_mmpl.config.plan import ModelShape, lm_layer_activation_bytes, vit_block_activation_bytes

    m = ModelShape.from_hf_dict(_shape_dict())
    measured = run_distributed(_measure, 2, 2, timeout=300)
    for rank_result in measured:
        for recompute in ("none", "selective"):
            lm = lm_layer_activation_bytes(m, 2, True, recompute, elem=4, fused_norm=False)
            vit = vit_block_activation_bytes(m, 2, recompute, elem=4, fused_norm=False)
            assert rank_result[f"lm_{recompute}"] == pytest.approx(lm, rel=1e-4), (recompute, rank_result, lm)
            assert rank_result[f"vit_{recompute}"] == pytest.approx(vit, rel=1e-4), (recompute, rank_result, vit)
        # full: the block keeps the layer input (SP rows) plus the RoPE table (whole row, fp32), once per chunk
        full = lm_layer_activation_bytes(m, 2, True, "full", elem=4) + 4 * m.head_dim
        assert rank_result["lm_full"] == pytest.approx(full, rel=1e-4), (rank_result, full)
