"""HF `Qwen2_5_VLConfig` → megatron `TransformerConfig`s (language model, vision tower, merger projector).

Every dimension is read from the HF config; nothing about a model size is assumed. Both config layouts are
accepted: transformers 5 (`text_config.rope_parameters`) and older ones (`rope_theta`, `rope_scaling`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megatron_mmpl.models.qwen25vl.padding import padded_vit_ffn

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
# transformers' default when a config carries no mrope_section.
DEFAULT_MROPE_SECTION = (16, 24, 24)


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def as_hf_config(hf_config):
    """Accept a `Qwen2_5_VLConfig`, a config.json dict, or a preset name."""
    if isinstance(hf_config, str):
        from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset

        return hf_config_from_preset(hf_config)
    if isinstance(hf_config, dict):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(**hf_config)
    return hf_config


def text_config(hf_config):
    """The LM sub-config (transformers ≥ 4.52 nests it as `text_config`; older configs are flat)."""
    return getattr(hf_config, "text_config", None) or hf_config


def rope_settings(hf_config) -> tuple[float, list[int]]:
    """(rope_theta, mrope_section) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`.

    Length-extension scaling (linear / YaRN) is read separately by `rope_scaling`."""
    tc = text_config(hf_config)
    params = dict(getattr(tc, "rope_parameters", None) or {})
    scaling = dict(getattr(tc, "rope_scaling", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(tc, "rope_theta", None) or getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("the HF config has no rope_theta (neither rope_parameters.rope_theta nor rope_theta)")
    section = params.get("mrope_section", scaling.get("mrope_section", DEFAULT_MROPE_SECTION))
    rope_scaling(hf_config)  # refuses unsupported types early
    return float(theta), [int(x) for x in section]


def rope_scaling(hf_config) -> dict | None:
    """The LM's RoPE length-extension settings (HF keys: rope_type linear|yarn, factor, ...), or None for plain
    M-RoPE. Applied by the model through attention/rope_scaling.py, as transformers applies them."""
    tc = text_config(hf_config)
    params = dict(getattr(tc, "rope_parameters", None) or {})
    scaling = dict(getattr(tc, "rope_scaling", None) or getattr(hf_config, "rope_scaling", None) or {})
    src = params if "rope_type" in params else scaling
    rope_type = src.get("rope_type", src.get("type", "default"))
    if rope_type in ("default", "mrope"):
        return None
    if rope_type not in ("linear", "yarn"):
        raise ValueError(f"rope_type={rope_type!r} is not supported; use default, linear or yarn")
    out = {k: v for k, v in src.items() if k not in ("mrope_section", "rope_theta", "type")}
    out["rope_type"] = rope_type  # legacy configs also carry type="mrope" beside rope_type
    return out


def tie_embeddings(hf_config) -> bool:
    """Tied input/output embeddings: the top-level flag (3B ties, 7B does not), or the text config's."""
    return bool(getattr(hf_config, "tie_word_embeddings", False)) or bool(
        getattr(text_config(hf_config), "tie_word_embeddings", False)
    )


@dataclass(frozen=True)
class VisionDims:
    """The ViT facts that are not TransformerConfig fields."""

    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    out_hidden_size: int
    rope_theta: float

    @property
    def patch_dim(self) -> int:
        """Flattened pixels per patch: C · temporal_patch · patch · patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class Qwen25VLConfigs:
    """Everything `build_model` needs, derived from one HF config."""

    language: object  # TransformerConfig
    vision: object  # TransformerConfig
    projector: object  # TransformerConfig (merger MLP)
    vision_dims: VisionDims
    vocab_size: int
    rotary_base: float
    mrope_section: list[int]
    tie_embeddings: bool
    max_position_embeddings: int
    image_token_id: int
    video_token_id: int
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
    """Derive the megatron configs of the LM, the ViT and the merger from a Qwen2.5-VL HF config.

    `overrides` are extra TransformerConfig fields applied to all three; `language_overrides` only to the LM,
    `vision_overrides` only to the ViT blocks (e.g. recompute settings). `first_stage_layers`: LM layers on
    pipeline stage 0 (which also runs the ViT); the rest are split evenly over the other stages.
    `fused_kernels` (CUDA only): megatron's fused SwiGLU in the LM and ViT MLPs and a compiled RoPE kernel
    (compat/cuda_rope.py); the merger keeps its exact GELU (megatron's fused bias-GELU is the tanh approximation).
    """
    from megatron.core.transformer import TransformerConfig

    hf_config = as_hf_config(hf_config)
    tc, vc = text_config(hf_config), hf_config.vision_config
    theta, mrope = rope_settings(hf_config)
    heads, groups = tc.num_attention_heads, tc.num_key_value_heads or tc.num_attention_heads
    if tc.hidden_size % heads:
        raise ValueError(f"text hidden_size={tc.hidden_size} is not divisible by num_attention_heads={heads}")
    head_dim = tc.hidden_size // heads
    if sum(mrope) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2} (head_dim {head_dim})")
    if heads % groups:
        raise ValueError(f"num_attention_heads={heads} is not divisible by num_key_value_heads={groups}")
    merge = vc.spatial_merge_size
    _check_divisible(
        tp, num_attention_heads=heads, num_key_value_heads=groups, intermediate_size=tc.intermediate_size,
        vocab_size=tc.vocab_size, vision_num_heads=vc.num_heads,
        vision_intermediate_size_padded=padded_vit_ffn(vc.intermediate_size),
        merger_hidden=vc.hidden_size * merge**2,
    )
    layers = tc.num_hidden_layers
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
    if vc.hidden_size % vc.num_heads:
        raise ValueError(f"vision hidden_size={vc.hidden_size} is not divisible by num_heads={vc.num_heads}")
    if (vc.window_size // merge // vc.patch_size) < 1:
        raise ValueError(
            f"vision window_size={vc.window_size} is smaller than one merged patch ({merge}x{vc.patch_size} px)"
        )

    cuda = torch.cuda.is_available()
    common = dict(
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda, hidden_dropout=0.0, attention_dropout=0.0, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        bias_dropout_fusion=False, bias_activation_fusion=False, normalization="RMSNorm",
        tensor_model_parallel_size=tp, init_method_std=getattr(tc, "initializer_range", 0.02),
    )
    common.update(overrides or {})
    fused = {}
    if cuda and fused_kernels:
        from megatron_mmpl.compat import cuda_rope

        cuda_rope.install()
        fused = dict(bias_activation_fusion=True, apply_rope_fusion=True)
    language = TransformerConfig(
        num_layers=layers, hidden_size=tc.hidden_size, num_attention_heads=heads, num_query_groups=groups,
        kv_channels=head_dim, ffn_hidden_size=tc.intermediate_size, add_qkv_bias=True, add_bias_linear=False,
        gated_linear_unit=True, activation_func=activation(tc.hidden_act), layernorm_epsilon=tc.rms_norm_eps,
        mrope_section=list(mrope), pipeline_model_parallel_size=pp, context_parallel_size=cp,
        sequence_parallel=sequence_parallel, num_layers_in_first_pipeline_stage=first_stage_layers,
        **{**common, **fused, **(language_overrides or {})},
    )
    vhead = vc.hidden_size // vc.num_heads
    vision = TransformerConfig(
        num_layers=vc.depth, hidden_size=vc.hidden_size, num_attention_heads=vc.num_heads,
        num_query_groups=vc.num_heads, kv_channels=vhead, ffn_hidden_size=padded_vit_ffn(vc.intermediate_size),
        add_qkv_bias=True, add_bias_linear=True, gated_linear_unit=True, activation_func=activation(vc.hidden_act),
        layernorm_epsilon=VISION_RMS_EPS, pipeline_model_parallel_size=1, context_parallel_size=1,
        **{**common, **fused, **(vision_overrides or {})},
    )
    projector = TransformerConfig(
        num_layers=1, hidden_size=vc.out_hidden_size, num_attention_heads=tp, ffn_hidden_size=vc.hidden_size * merge**2,
        add_bias_linear=True, gated_linear_unit=False, activation_func=F.gelu, layernorm_epsilon=VISION_RMS_EPS,
        pipeline_model_parallel_size=1, context_parallel_size=1, **common,
    )
    vrope = dict(getattr(vc, "rope_parameters", None) or {})
    dims = VisionDims(
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
        in_channels=getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3), spatial_merge_size=merge,
        window_size=vc.window_size, fullatt_block_indexes=tuple(int(i) for i in vc.fullatt_block_indexes),
        out_hidden_size=vc.out_hidden_size, rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    bad_full = [i for i in dims.fullatt_block_indexes if not 0 <= i < vc.depth]
    if bad_full:
        raise ValueError(f"vision fullatt_block_indexes {bad_full} are outside the {vc.depth} blocks")
    if vc.out_hidden_size != tc.hidden_size:
        raise ValueError(f"vision out_hidden_size={vc.out_hidden_size} must equal the LM hidden_size={tc.hidden_size}")
    extra = {}
    scaling = rope_scaling(hf_config)
    if scaling is not None:  # inverse frequencies swapped in after the build; YaRN's factor via softmax_scale
        from megatron_mmpl.attention.rope_scaling import mrope_inv_freq, set_rope_softmax_scale

        extra["rope_inv_freq"], attn_factor = mrope_inv_freq(head_dim, theta, scaling)
        set_rope_softmax_scale(language, attn_factor)
    return Qwen25VLConfigs(
        language=language, vision=vision, projector=projector, vision_dims=dims, vocab_size=tc.vocab_size,
        rotary_base=theta, mrope_section=list(mrope), tie_embeddings=tie_embeddings(hf_config),
        max_position_embeddings=getattr(tc, "max_position_embeddings", 32768),
        image_token_id=int(hf_config.image_token_id), video_token_id=int(hf_config.video_token_id), extra=extra,
    )
