"""The model's spec (spec.py) → megatron `TransformerConfig`s (language model, vision tower, merger projector).

Every dimension comes from the spec; nothing about a model size is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megatron_mmpl.attention.rope_scaling import mrope_inv_freq
from megatron_mmpl.compat import cuda_rope, swiglu
from megatron_mmpl.compat.rope import set_rope_softmax_scale
from megatron_mmpl.models.qwen25vl.spec import ModelSpec

# HF activation names → functions (those Qwen2.5-VL checkpoints use, plus close relatives).
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}
# transformers' Qwen2.5-VL vision blocks and merger norm use a fixed RMSNorm epsilon (not in the config).
VISION_RMS_EPS = 1e-6


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class Qwen25VLConfigs:
    """Everything `build_model` needs: the model's spec and the megatron configs derived from it."""

    language: object  # TransformerConfig
    vision: object  # TransformerConfig
    projector: object  # TransformerConfig (merger MLP)
    spec: ModelSpec
    extra: dict = field(default_factory=dict)


def _check_divisible(tp: int, **dims: int) -> None:
    bad = {k: v for k, v in dims.items() if v % tp}
    if bad:
        raise ValueError(
            f"tensor parallel size {tp} must divide {', '.join(f'{k}={v}' for k, v in bad.items())}; "
            f"choose a TP that divides them"
        )


def megatron_configs(
    hf_config,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    sequence_parallel: bool = False,
    first_stage_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    overrides: dict | None = None,
    language_overrides: dict | None = None,
    vision_overrides: dict | None = None,
    fused_kernels: bool = True,
) -> Qwen25VLConfigs:
    """Derive the megatron configs of the LM, the ViT and the merger from a model spec (or what `ModelSpec.of`
    takes: an HF config, a config.json dict, a preset name).

    `overrides` are extra TransformerConfig fields applied to all three; `language_overrides` only to the LM,
    `vision_overrides` only to the ViT blocks (e.g. recompute settings). `first_stage_layers`: LM layers on
    pipeline stage 0 (which also runs the ViT); the rest are split evenly over the other stages.
    `fused_kernels` (CUDA only): megatron's fused-SwiGLU slot in the LM and ViT MLPs, filled with Triton kernels
    (compat/swiglu.py), and a compiled RoPE kernel (compat/cuda_rope.py); the merger keeps its exact GELU
    (megatron's fused bias-GELU is the tanh approximation).
    """
    from megatron.core.transformer import TransformerConfig  # lazy: megatron's import costs seconds

    m = ModelSpec.of(hf_config)
    v, mrope = m.vision, list(m.mrope_section)
    head_dim = m.head_dim
    if sum(mrope) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2} (head_dim {head_dim})")
    if m.heads % m.kv_groups:
        raise ValueError(f"num_attention_heads={m.heads} is not divisible by num_key_value_heads={m.kv_groups}")
    merge = v.spatial_merge_size
    _check_divisible(
        tp, num_attention_heads=m.heads, num_key_value_heads=m.kv_groups, intermediate_size=m.ffn,
        vocab_size=m.vocab, vision_num_heads=v.num_heads, vision_intermediate_size_padded=v.built_ffn,
        merger_hidden=v.merged_hidden,
    )
    layers = m.layers
    if pp > layers:
        raise ValueError(f"pipeline parallel size {pp} is larger than the LM's {layers} layers; use pp <= {layers}")
    if first_stage_layers is not None:
        if pp == 1:
            raise ValueError("first_stage_layers needs pipeline parallelism (pp > 1); unset it for pp=1")
        rest = layers - first_stage_layers
        if first_stage_layers < 1 or rest < pp - 1 or rest % (pp - 1):
            raise ValueError(
                f"first_stage_layers={first_stage_layers} leaves {rest} of {layers} LM layers for {pp - 1} "
                f"later stage(s); it must be ≥ 1 and leave a positive multiple of {pp - 1}"
            )
    elif layers % pp:
        raise ValueError(
            f"LM layers {layers} are not divisible by pp={pp}; set first_stage_layers so the rest divide evenly"
        )
    if (v.window_size // merge // v.patch_size) < 1:
        raise ValueError(
            f"vision window_size={v.window_size} is smaller than one merged patch ({merge}x{v.patch_size} px)"
        )
    bad_full = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
    if bad_full:
        raise ValueError(f"vision fullatt_block_indexes {bad_full} are outside the {v.depth} blocks")
    if v.out_hidden_size != m.hidden:
        raise ValueError(f"vision out_hidden_size={v.out_hidden_size} must equal the LM hidden_size={m.hidden}")

    cuda = torch.cuda.is_available()
    common = dict(
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda, hidden_dropout=0.0, attention_dropout=0.0, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        bias_dropout_fusion=False, bias_activation_fusion=False, normalization="RMSNorm",
        tensor_model_parallel_size=tp, init_method_std=m.initializer_range,
    )
    common.update(overrides or {})
    fused = {}
    if cuda and fused_kernels:
        cuda_rope.install()
        swiglu.install()  # Triton kernels for the gated SiLU of both towers (compat/swiglu.py)
        # megatron's compiled bias + dropout + residual (one kernel instead of a broadcast bias add and an add)
        fused = dict(bias_activation_fusion=True, apply_rope_fusion=True, bias_dropout_fusion=True)
    language = TransformerConfig(
        num_layers=layers, hidden_size=m.hidden, num_attention_heads=m.heads, num_query_groups=m.kv_groups,
        kv_channels=head_dim, ffn_hidden_size=m.ffn, add_qkv_bias=True, add_bias_linear=False,
        gated_linear_unit=True, activation_func=activation(m.hidden_act), layernorm_epsilon=m.rms_norm_eps,
        mrope_section=mrope, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        sequence_parallel=sequence_parallel, num_layers_in_first_pipeline_stage=first_stage_layers,
        **{**common, **fused, **(language_overrides or {})},
    )
    vision = TransformerConfig(
        num_layers=v.depth, hidden_size=v.hidden_size, num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads, kv_channels=v.head_dim, ffn_hidden_size=v.built_ffn,
        add_qkv_bias=True, add_bias_linear=True, gated_linear_unit=True, activation_func=activation(v.hidden_act),
        layernorm_epsilon=VISION_RMS_EPS, pipeline_model_parallel_size=1, context_parallel_size=1,
        **{**common, **fused, **(vision_overrides or {})},
    )
    projector = TransformerConfig(
        num_layers=1, hidden_size=v.out_hidden_size, num_attention_heads=tp, ffn_hidden_size=v.merged_hidden,
        add_bias_linear=True, gated_linear_unit=False, activation_func=F.gelu, layernorm_epsilon=VISION_RMS_EPS,
        pipeline_model_parallel_size=1, context_parallel_size=1, **common,
    )
    extra = {}
    if m.rope_scaling is not None:  # inverse frequencies swapped in after the build; YaRN's factor via softmax_scale

        extra["rope_inv_freq"], attn_factor = mrope_inv_freq(head_dim, m.rope_theta, m.rope_scaling)
        set_rope_softmax_scale(language, attn_factor)
    return Qwen25VLConfigs(language=language, vision=vision, projector=projector, spec=m, extra=extra)
