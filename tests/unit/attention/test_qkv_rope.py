"""The fused QKV-bias-RoPE self-attention computes megatron's SelfAttention: outputs and every gradient equal on
an LM layer (GQA, packed samples) and a ViT block (multi-head, windows), fp32 on CPU (the kernel's eager form;
CUDA compiles the same function)."""


import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed
from tests.triton_kernels import triton_device

pytestmark = pytest.mark.distributed

SEQ = 96
TOL = 1e-6  # fp32: same operations in the same order; observed 0 to ~1e-7


def _compare(tp: int = 1):
    from megatron.core.transformer.spec_utils import build_module
    from transformers import Qwen2_5_VLConfig

    from megatron_mmpl.attention.qkv_rope import QKVRopeSelfAttention, fusable
    from megatron_mmpl.models.qwen25vl.configs import megatron_configs
    from megatron_mmpl.models.qwen25vl.presets import preset_dict
    from megatron_mmpl.models.qwen25vl.specs import language_layer_spec, packed_seq_params, vision_layer_spec
    from megatron_mmpl.parallel.process_groups import destroy_parallel, initialize_parallel

    initialize_parallel(tp=tp)
    cfgs = megatron_configs(Qwen2_5_VLConfig(**preset_dict("tiny")), tp=tp, dtype=torch.float32)
    out = {}
    for name, spec, cfg, cu in (("lm", language_layer_spec("sdpa"), cfgs.language, [0, 40, SEQ]),
                                ("vit", vision_layer_spec((), "sdpa"), cfgs.vision, [0, 16, 32, 48, 64, 80, SEQ])):
        torch.manual_seed(0)
        layer = build_module(spec, config=cfg, layer_number=1)
        attn = layer.self_attention
        assert isinstance(attn, QKVRopeSelfAttention) and not attn.fused_qkv_rope  # CPU: megatron's path
        out[name + "_fusable"] = fusable(attn)  # the one-kernel path applies (the ViT takes it on CUDA)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.5) if p.dim() < 2 else p.normal_(0, p.shape[-1] ** -0.5)
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(SEQ, 1, cfg.hidden_size, generator=g)
        rope = 3 * torch.randn(SEQ, 1, 1, cfg.kv_channels, generator=g)
        dy = torch.randn(SEQ, 1, cfg.hidden_size, generator=g)
        psp = packed_seq_params(torch.tensor(cu, dtype=torch.int32))
        res = []
        for fused in (False, True):
            attn.fused_qkv_rope = fused
            layer.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_(True)
            y, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=psp)
            y.backward(dy)
            res.append({"out": y.detach(), "dx": x.grad, **{n: p.grad for n, p in layer.named_parameters()}})
        out[name] = {k: ((res[0][k] - res[1][k]).abs().max() / res[0][k].abs().max()).item() for k in res[0]}
        out[name + "_bias"] = attn.linear_qkv.bias is not None
    destroy_parallel()
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_path_equals_megatrons(tp):
    """tp=2: each rank's heads (the LM: 2 q heads in 1 KV group; the ViT: 1 head) through the kernel."""
    for got in run_distributed(_compare, tp, tp, timeout=300, device="cpu"):
        assert got["lm_fusable"] and got["vit_fusable"]
        assert got["lm_bias"] and got["vit_bias"]  # both towers carry a QKV bias, which the kernel adds
        for tower in ("lm", "vit"):
            assert len(got[tower]) > 8, got[tower]  # out, dx and every parameter's gradient
            assert max(got[tower].values()) <= TOL, got[tower]


def test_compiled_kernel_equals_eager_and_compiles_once_for_every_length():
    """The function CUDA runs, compiled here by inductor on CPU: q, k, v and the gradients of the GEMM output and
    the bias equal the eager function's (fp32; the bias gradient is a reduction over the rows, observed ≤ 3e-5),
    and three sequence lengths share one graph (the length is marked dynamic: no recompile per row length)."""
    from torch._dynamo.utils import counters

    from megatron_mmpl.attention.qkv_rope import _qkv_bias_rope, compiled_qkv_bias_rope, sequence_dynamic

    torch._dynamo.reset()
    counters.clear()
    per_group, d, groups, rot = 2, 16, 3, 12  # GQA, partial rotary width: the general case
    fn = compiled_qkv_bias_rope(per_group, d, True)
    for s in (40, 70, 131):
        g = torch.Generator().manual_seed(s)
        mixed = torch.randn(s, 1, groups * (per_group + 2) * d, generator=g, requires_grad=True)
        bias = torch.randn(mixed.shape[-1], generator=g, requires_grad=True)
        freqs = 3 * torch.randn(s, 1, 1, rot, generator=g)
        got = fn(*sequence_dynamic(mixed, freqs), bias)
        ref = _qkv_bias_rope(mixed, bias, freqs, per_group, d)
        dys = [torch.randn(t.shape, generator=g) for t in ref]
        assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-5
        grads = torch.autograd.grad(got, (mixed, bias), dys)
        want = torch.autograd.grad(ref, (mixed, bias), dys)
        assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, want)) <= 1e-5
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("has_bias", [True, False])
def test_written_out_backward_equals_autograds(has_bias):
    """`QKVBiasRope` (the path CUDA runs: compiled forward, written-out compiled backward; compiled here by inductor
    on CPU) gives the eager function's q, k, v and autograd's gradients of the GEMM output and the bias, in fp64 to
    1e-12 (the same sums in another order; observed ~1e-16), for gradients laid out contiguously and as SDPA's
    [b, h, s, d] transposes; two lengths share one forward and one backward graph."""
    from torch._dynamo.utils import counters

    from megatron_mmpl.attention.qkv_rope import QKVBiasRope, _qkv_bias_rope

    torch._dynamo.reset()
    counters.clear()
    per_group, d, groups, rot = 2, 16, 3, 12  # GQA, partial rotary width
    for s in (40, 77):
        g = torch.Generator().manual_seed(s)
        mixed = torch.randn(s, 1, groups * (per_group + 2) * d, generator=g, dtype=torch.float64, requires_grad=True)
        bias = (torch.randn(mixed.shape[-1], generator=g, dtype=torch.float64, requires_grad=True)
                if has_bias else None)
        freqs = 3 * torch.randn(s, 1, 1, rot, generator=g, dtype=torch.float64)
        inputs = (mixed, bias) if has_bias else (mixed,)
        got = QKVBiasRope.apply(mixed, bias, freqs, per_group, d)
        ref = _qkv_bias_rope(mixed, bias, freqs, per_group, d)
        assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-12
        assert all(t.is_contiguous() for t in got)
        for layout in ("contiguous", "sdpa"):
            dys = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref]
            if layout == "sdpa":
                dys = [y.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3) for y in dys]
            grads = torch.autograd.grad(got, inputs, dys, retain_graph=True)
            want = torch.autograd.grad(ref, inputs, dys, retain_graph=True)
            assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, want)) <= 1e-12, layout
    assert counters["stats"]["unique_graphs"] <= 2 * 2, dict(counters["stats"])  # forward + backward (each layout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_triton_backward_equals_the_written_out_function(dtype, monkeypatch):
    """The Triton kernel of QKVBiasRope's backward (the default on CUDA; run on CUDA when present, else in Triton's
    interpreter) equals `_qkv_bias_rope_grad`'s d(mixed) for GQA with a partial rotary width and for the ViT's
    heads, with gradients in SDPA's [b, h, s, d] strides and contiguous, b=2 rows sharing freqs: fp64 to 1e-12,
    bf16 within one bf16 ulp of the fp64 result on the same bf16 inputs (2⁻⁷ of the largest value: the
    interpreter rounds bf16 by truncation)."""
    from megatron_mmpl.attention import qkv_rope_backward

    with triton_device(monkeypatch, qkv_rope_backward) as dev:
        for case in ((37, 2, 3, 2, 16, 12), (45, 1, 4, 1, 80, 80)):
            _check_triton_backward(dev, dtype, *case)


def _check_triton_backward(dev, dtype, s, b, groups, per_group, d, rot):
    """One shape of the test above."""
    from megatron_mmpl.attention import qkv_rope_backward
    from megatron_mmpl.attention.qkv_rope import _qkv_bias_rope_grad

    g = torch.Generator().manual_seed(s)
    dq = torch.randn(b, groups * per_group, s, d, generator=g, dtype=torch.float64).permute(2, 0, 1, 3)
    dk = torch.randn(s, b, groups, d, generator=g, dtype=torch.float64)
    dv = torch.randn(b, groups, s, d, generator=g, dtype=torch.float64).permute(2, 0, 1, 3)
    freqs = 3 * torch.randn(s, 1, 1, rot, generator=g, dtype=torch.float64)
    cast = [t.to(dev, dtype) for t in (dq, dk, dv)] + [freqs.to(dev, torch.float64 if dtype == torch.float64
                                                                   else torch.float32)]
    want, _ = _qkv_bias_rope_grad(*(t.cpu().double() for t in cast), per_group, d, False)  # rounded inputs
    got = qkv_rope_backward.qkv_rope_grad_triton(*cast, per_group, d)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
    assert err <= (1e-12 if dtype == torch.float64 else 2**-7), (s, err)
