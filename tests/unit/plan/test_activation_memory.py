"""The planner's per-layer activation formula equals, to the byte, what autograd keeps for one real LM layer and
one ViT block of this trainer (megatron local layer + CoreAttention), at TP=2 with sequence parallel (LM), for
recompute none / selective (core attention; MLP) / full; fp32 on CPU (unfused kernels: cuda=False). On a GPU: the
same at the Qwen2.5-VL-7B shapes in bf16 with cuda=True (flash/cuDNN attention, CUDA rms_norm, fused SwiGLU,
compiled RoPE)."""

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed
from megatron_mmpl.plan.memory import SELECTIVE_MLP

pytestmark = pytest.mark.distributed

SEQ = 512
CU = [0, 200, 512]  # two packed samples (LM); the ViT gets three windows
VIT_WINDOWS_8K = tuple(torch.tensor([0] + [64] * 116 + [48] * 16).cumsum(0).tolist())  # like a page row, regrouped
CU_VIT = [0, 64, 128, 192, 256, 320, 368, 416, 464, 512]  # windows of one size back to back, as the tower has them


def _shape_dict(preset: str = "tiny"):
    from megatron_mmpl.models.qwen25vl.presets import preset_dict

    if preset != "tiny":  # one LM layer: the "full" measurement runs a whole TransformerBlock
        raw = preset_dict(preset)
        raw["num_hidden_layers"] = 1
        return raw
    raw = preset_dict("tiny")
    raw["text_config"].update(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=1)
    raw["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]
    raw["vision_config"].update(hidden_size=128, intermediate_size=384, num_heads=4, out_hidden_size=256)
    return raw


def _saved_bytes(module, x, **kw) -> int:
    """Bytes of distinct storages autograd saves in one forward (parameters and the input excluded), counted
    after the forward: megatron's norm recompute (`layernorm`) frees the storage of outputs it saved."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t is not x:
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), st)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x, attention_mask=None, **kw)
    total = sum(st.nbytes() for st in seen.values())
    del out
    return total


def _fused_qkv_rope(module) -> set[bool]:
    """Whether each self-attention of `module` takes the one-kernel QKV-bias-RoPE path (the formula's q, k, v
    assume it does in the ViT on CUDA, and nowhere else)."""
    from megatron_mmpl.attention.qkv_rope import QKVRopeSelfAttention

    return {m.fused_qkv_rope for m in module.modules() if isinstance(m, QKVRopeSelfAttention)}


def _measure(tp: int, preset: str = "tiny", seq: int = SEQ, cu=tuple(CU), cu_vit=tuple(CU_VIT), bf16: bool = False):
    from megatron.core.transformer.spec_utils import build_module
    from transformers import Qwen2_5_VLConfig

    from megatron_mmpl.models.qwen25vl.configs import megatron_configs
    from megatron_mmpl.models.qwen25vl.specs import (
        VisionSegments,
        language_layer_spec,
        packed_seq_params,
        vision_layer_spec,
    )
    from megatron_mmpl.parallel.process_groups import destroy_parallel, initialize_parallel

    initialize_parallel(tp=tp)
    torch.manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if bf16 else torch.float32
    hf = Qwen2_5_VLConfig(**_shape_dict(preset))
    out = {}
    for recompute in ("none", "selective", "selective_mlp", "full"):
        over = {"none": {}, "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
                "selective_mlp": {"recompute_granularity": "selective", "recompute_modules": list(SELECTIVE_MLP)},
                "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
                }[recompute]
        cfgs = megatron_configs(hf, tp=tp, sequence_parallel=tp > 1, overrides=over, dtype=dtype)
        h, hv = cfgs.language.hidden_size, cfgs.vision.hidden_size
        psp = packed_seq_params(torch.tensor(cu, dtype=torch.int32, device=dev))
        if recompute == "full":  # megatron checkpoints whole layers in TransformerBlock; measure through one
            from megatron.core.transformer.transformer_block import TransformerBlock

            from megatron_mmpl.models.qwen25vl.specs import block_spec

            lm = TransformerBlock(cfgs.language, block_spec(language_layer_spec("sdpa"), cfgs.language),
                                  post_layer_norm=False)
        else:
            lm = build_module(language_layer_spec("sdpa"), config=cfgs.language, layer_number=1)
        lm.to(dev)
        out.setdefault("lm_fused_qkv_rope", set()).update(_fused_qkv_rope(lm))
        x = torch.randn(seq // tp, 1, h, device=dev, dtype=dtype, requires_grad=True)  # SP: this rank's rows
        rope = torch.randn(seq, 1, 1, h // cfgs.language.num_attention_heads, device=dev)
        saved = _saved_bytes(lm, x, rotary_pos_emb=rope, packed_seq_params=psp)
        out[f"lm_{recompute}"] = (saved + x.nbytes) / seq  # per token of the row (SP shards only norm regions)
        del lm
        if recompute in ("none", "selective"):  # the ViT's blocks run none or core-attention recompute
            xv = torch.randn(seq, 1, hv, device=dev, dtype=dtype, requires_grad=True)
            ropev = torch.randn(seq, 1, 1, hv // cfgs.vision.num_attention_heads, device=dev)
            block_rows = torch.randperm(seq, generator=torch.Generator().manual_seed(0)).to(dev)
            frame_rows = torch.argsort(block_rows)
            segs = VisionSegments(
                window=packed_seq_params(torch.tensor(cu_vit, dtype=torch.int32, device=dev)),
                full=packed_seq_params(torch.tensor([0, seq // 2, seq], dtype=torch.int32, device=dev)),  # 2 frames
                frame_rows=frame_rows, block_rows=block_rows, frame_rope=ropev[frame_rows])
            for kind, full_layers in (("window", ()), ("full", (0,))):
                vit = build_module(vision_layer_spec(full_layers, "sdpa"), config=cfgs.vision, layer_number=1).to(dev)
                out.setdefault("vit_fused_qkv_rope", set()).update(_fused_qkv_rope(vit))
                out[f"vit_{kind}_{recompute}"] = (_saved_bytes(vit, xv, rotary_pos_emb=ropev, packed_seq_params=segs)
                                                  + xv.nbytes) / seq
                del vit
    destroy_parallel()
    return out


def test_formula_matches_saved_tensors():
    from megatron_mmpl.models.qwen25vl.spec import ModelSpec
    from megatron_mmpl.plan.memory import lm_layer_activation_bytes, vit_block_activation_bytes

    m = ModelSpec.from_hf(_shape_dict())
    # CPU ranks (gloo) whatever the host has: the formula is checked here for torch's composite RMSNorm and the
    # math SDPA, which is what a CPU keeps (the GPU kernels are the bf16 test below), and 2 ranks need no 2 GPUs.
    measured = run_distributed(_measure, 2, 2, timeout=300, device="cpu")
    for rank_result in measured:
        # CPU: megatron's own QKV bias and RoPE in both towers
        assert rank_result["lm_fused_qkv_rope"] == rank_result["vit_fused_qkv_rope"] == {False}
        lm = lm_layer_activation_bytes(m, 2, True, "selective", elem=4, cuda=False, modules=SELECTIVE_MLP)
        assert rank_result["lm_selective_mlp"] == pytest.approx(lm, rel=1e-4), (rank_result, lm)
        for recompute in ("none", "selective"):
            lm = lm_layer_activation_bytes(m, 2, True, recompute, elem=4, cuda=False)
            assert rank_result[f"lm_{recompute}"] == pytest.approx(lm, rel=1e-4), (recompute, rank_result, lm)
            for kind in ("window", "full"):
                vit = vit_block_activation_bytes(m, 2, recompute, elem=4, cuda=False, windowed=kind == "window")
                # the full block also keeps the int64 rows into frames and back: one pair per forward, shared by
                # every full block, so per block of a real ViT they are not counted
                shared = 2 * 8 if kind == "full" else 0
                got = rank_result[f"vit_{kind}_{recompute}"] - shared
                assert got == pytest.approx(vit, rel=1e-4), (kind, recompute, rank_result, vit)
        # full: the block keeps the layer input (SP rows) plus the RoPE table (whole row, fp32), once per chunk
        full = lm_layer_activation_bytes(m, 2, True, "full", elem=4) + 4 * m.head_dim
        assert rank_result["lm_full"] == pytest.approx(full, rel=1e-4), (rank_result, full)


@pytest.mark.gpu
def test_formula_matches_saved_tensors_7b_bf16_on_gpu():
    """Qwen2.5-VL-7B layer and ViT block, bf16 on one GPU, 8K tokens in 3 samples / 8K patches in 64-patch
    windows: the planner's numbers (cuda=True) within 2 % of what autograd keeps."""
    from megatron_mmpl.models.qwen25vl.spec import ModelSpec
    from megatron_mmpl.plan.memory import lm_layer_activation_bytes, vit_block_activation_bytes

    m = ModelSpec.from_hf(_shape_dict("qwen25vl-7b"))
    seq = 8192
    (got,) = run_distributed(_measure, 1, 1, "qwen25vl-7b", seq, (0, 1000, 5000, seq),
                             VIT_WINDOWS_8K, True, timeout=600, device="cuda")
    assert got["vit_fused_qkv_rope"] == {True}, "every ViT block takes the one-kernel QKV-bias-RoPE path"
    assert got["lm_fused_qkv_rope"] == {False}, "LM layers keep megatron's QKV bias and compiled RoPE"
    lm = lm_layer_activation_bytes(m, 1, False, "selective", modules=SELECTIVE_MLP)
    assert got["lm_selective_mlp"] == pytest.approx(lm, rel=0.02), (got, lm)
    for recompute in ("none", "selective"):
        lm = lm_layer_activation_bytes(m, 1, False, recompute)
        assert got[f"lm_{recompute}"] == pytest.approx(lm, rel=0.02), (recompute, got, lm)
        for kind in ("window", "full"):
            vit = vit_block_activation_bytes(m, 1, recompute, windowed=kind == "window")
            assert got[f"vit_{kind}_{recompute}"] == pytest.approx(vit, rel=0.02), (kind, recompute, got, vit)
    assert got["lm_full"] == pytest.approx(lm_layer_activation_bytes(m, 1, False, "full") + 4 * m.head_dim, rel=0.02)
