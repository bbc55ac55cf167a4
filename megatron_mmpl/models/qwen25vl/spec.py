"""The one description of a Qwen2.5-VL model's shape: `ModelSpec.from_hf(hf_config)`, frozen, built once.

Shapes, token ids, vision dims, RoPE (theta, M-RoPE sections, length-extension scaling) and tying, read from a
transformers `Qwen2_5_VLConfig` or a config.json dict in either layout (transformers 5 `text_config` /
`rope_parameters`, or the released checkpoints' flat fields with `rope_theta` / `rope_scaling`). Everything
downstream takes it: the megatron config builder, the planner, the FLOP counter, the HF mapping and the
checkpoint-compatibility check. Pure Python (the planner reads it without torch or transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mmpl.models.qwen25vl.padding import padded_vit_ffn
from megatron_mmpl.models.qwen25vl.presets import load_hf_dict

# transformers' default when a config carries no mrope_section.
DEFAULT_MROPE_SECTION = (16, 24, 24)
# transformers' defaults (Qwen2_5_VL{Text,Vision,}Config) for fields a config.json may leave out; the shape fields
# themselves have no default. tests/unit/models/test_spec.py checks these against transformers.
_TEXT_DEFAULTS = dict(num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=32768,
                      initializer_range=0.02, rope_theta=1e6, bos_token_id=151643, eos_token_id=151645)
_VISION_DEFAULTS = dict(hidden_act="silu", in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                        tokens_per_second=4, window_size=112, fullatt_block_indexes=(7, 15, 23, 31),
                        rope_theta=10000.0)
_TOP_DEFAULTS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                     vision_end_token_id=151653, tie_word_embeddings=False)
_REQUIRED = object()
_T, _V, _TOP = dict(defaults=_TEXT_DEFAULTS), dict(defaults=_VISION_DEFAULTS), dict(defaults=_TOP_DEFAULTS)


@dataclass(frozen=True)
class VisionSpec:
    """The ViT and its merger."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    out_hidden_size: int
    rope_theta: float
    tokens_per_second: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Flattened pixels per patch: C · temporal_patch · patch · patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def built_ffn(self) -> int:
        """The MLP width this trainer builds: `intermediate_size` zero-padded to a multiple of 64 (padding.py)."""
        return padded_vit_ffn(self.intermediate_size)

    @property
    def merged_hidden(self) -> int:
        """Width of one merged token before the merger MLP: m² patches side by side."""
        return self.hidden_size * self.spatial_merge_size**2


@dataclass(frozen=True)
class TokenIds:
    """Special token ids the model itself depends on (vision placeholders) and the text ends."""

    image: int
    video: int
    vision_start: int
    vision_end: int
    bos: int | None
    eos: int | None


@dataclass(frozen=True)
class ModelSpec:
    """The language model's shape and RoPE, the tied flag, the token ids and the `vision` tower."""

    layers: int
    hidden: int
    heads: int
    kv_groups: int
    ffn: int
    vocab: int
    hidden_act: str
    rms_norm_eps: float
    max_position_embeddings: int
    initializer_range: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    rope_scaling_items: tuple[tuple[str, object], ...] | None  # HF keys (rope_type linear|yarn, factor, ...)
    tied: bool
    tokens: TokenIds
    vision: VisionSpec

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_groups * self.head_dim

    @property
    def rope_scaling(self) -> dict | None:
        """Length-extension settings (applied by attention/rope_scaling.py as transformers does), None: plain M-RoPE."""
        return None if self.rope_scaling_items is None else dict(self.rope_scaling_items)

    @classmethod
    def of(cls, hf_config) -> ModelSpec:
        """`hf_config` itself when it is a ModelSpec, else `from_hf` (a preset name is resolved first)."""
        if isinstance(hf_config, ModelSpec):
            return hf_config
        if isinstance(hf_config, str):

            hf_config = load_hf_dict(hf_config)
        return cls.from_hf(hf_config)

    @classmethod
    def from_hf(cls, hf) -> ModelSpec:
        """From a transformers config object or a config.json dict (either layout)."""
        text = _section(hf, "text_config") or hf
        vis = _section(hf, "vision_config")
        if vis is None:
            raise ValueError("the HF config has no vision_config; is it a Qwen2.5-VL config?")
        theta, section, scaling = _rope(hf, text)
        heads = _get(text, "num_attention_heads", hf)
        vision = VisionSpec(
            depth=_get(vis, "depth"), hidden_size=_get(vis, "hidden_size"), num_heads=_get(vis, "num_heads"),
            intermediate_size=_get(vis, "intermediate_size"), hidden_act=_get(vis, "hidden_act", **_V),
            in_channels=int(_get(vis, "in_channels", default=None) or _get(vis, "in_chans", default=None)
                            or _VISION_DEFAULTS["in_channels"]),
            patch_size=_get(vis, "patch_size", **_V), temporal_patch_size=_get(vis, "temporal_patch_size", **_V),
            spatial_merge_size=_get(vis, "spatial_merge_size", **_V), window_size=_get(vis, "window_size", **_V),
            fullatt_block_indexes=tuple(int(i) for i in _get(vis, "fullatt_block_indexes", **_V)),
            out_hidden_size=_get(vis, "out_hidden_size"),
            rope_theta=float(dict(_get(vis, "rope_parameters", default=None) or {}).get(
                "rope_theta", _VISION_DEFAULTS["rope_theta"])),
            tokens_per_second=_get(vis, "tokens_per_second", **_V),
        )
        tokens = TokenIds(
            image=int(_get(hf, "image_token_id", **_TOP)), video=int(_get(hf, "video_token_id", **_TOP)),
            vision_start=int(_get(hf, "vision_start_token_id", **_TOP)),
            vision_end=int(_get(hf, "vision_end_token_id", **_TOP)),
            bos=_get(text, "bos_token_id", hf, **_T), eos=_get(text, "eos_token_id", hf, **_T),
        )
        spec = cls(
            layers=_get(text, "num_hidden_layers", hf), hidden=_get(text, "hidden_size", hf), heads=heads,
            kv_groups=_kv_groups(text, hf, heads),
            ffn=_get(text, "intermediate_size", hf), vocab=_get(text, "vocab_size", hf),
            hidden_act=_get(text, "hidden_act", hf, **_T), rms_norm_eps=float(_get(text, "rms_norm_eps", hf, **_T)),
            max_position_embeddings=int(_get(text, "max_position_embeddings", hf, **_T)),
            initializer_range=float(_get(text, "initializer_range", hf, **_T)),
            rope_theta=theta, mrope_section=section,
            rope_scaling_items=None if scaling is None else tuple(sorted(scaling.items())),
            tied=bool(_get(hf, "tie_word_embeddings", **_TOP)) or bool(
                _get(text, "tie_word_embeddings", default=False)),
            tokens=tokens, vision=vision,
        )
        if spec.hidden % spec.heads:
            raise ValueError(f"text hidden_size={spec.hidden} is not divisible by num_attention_heads={spec.heads}")
        if vision.hidden_size % vision.num_heads:
            raise ValueError(f"vision hidden_size={vision.hidden_size} is not divisible by "
                             f"num_heads={vision.num_heads}")
        return spec

    def weight_shapes(self) -> dict[str, object]:
        """The fields that decide every weight's shape, under their config.json names (two specs with equal ones
        load each other's weights)."""
        text = dict(num_hidden_layers=self.layers, hidden_size=self.hidden, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_groups, intermediate_size=self.ffn, vocab_size=self.vocab,
                    tie_word_embeddings=self.tied)
        vision = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                  "temporal_patch_size", "spatial_merge_size", "in_channels")
        return {**text, **{f"vision_config.{f}": getattr(self.vision, f) for f in vision}}


def weight_shape_differences(a: ModelSpec, b: ModelSpec) -> list[str]:
    """The weight-shape fields in which two specs differ, as 'field: a vs b'."""
    x, y = a.weight_shapes(), b.weight_shapes()
    return [f"{k}: {x[k]} vs {y[k]}" for k in x if x[k] != y[k]]


# ---- reading either config layout ------------------------------------------------------------------------------


def _section(cfg, name: str):
    return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)


def _has(cfg, key: str) -> bool:
    if isinstance(cfg, dict):
        return cfg.get(key) is not None
    try:
        return getattr(cfg, key, None) is not None
    except AttributeError:  # transformers raises for some absent attributes
        return False


def _get(cfg, key: str, *fallbacks, defaults: dict | None = None, default=_REQUIRED):
    """`key` of the first config section that has it (dict or attributes), else `default`, else transformers'
    default from `defaults`; a shape field without a value is an error naming it."""
    for c in (cfg, *fallbacks):
        if c is not None and _has(c, key):
            return c[key] if isinstance(c, dict) else getattr(c, key)
    if default is not _REQUIRED:
        return default
    if defaults and key in defaults:
        return defaults[key]
    raise ValueError(f"the HF config has no {key!r}; give it in config.json (or model.hf_overrides)")


def _kv_groups(text, hf, heads: int) -> int:
    """transformers: an absent num_key_value_heads is its default (8), an explicit null means one per head."""
    for c in (text, hf):
        present = _key_in(c, "num_key_value_heads")
        if present:
            return _get(c, "num_key_value_heads", default=None) or heads
    return _TEXT_DEFAULTS["num_key_value_heads"]


def _key_in(cfg, key: str) -> bool:
    return key in cfg if isinstance(cfg, dict) else key in getattr(cfg, "__dict__", {})


def _rope(hf, text) -> tuple[float, tuple[int, ...], dict | None]:
    """(rope_theta, mrope_section, scaling or None) from `rope_parameters` (transformers 5) or `rope_theta` /
    `rope_scaling` (older layouts; either on the text config or the top level)."""
    params = dict(_section(text, "rope_parameters") or {})
    scaling = dict(_section(text, "rope_scaling") or _section(hf, "rope_scaling") or {})
    theta = params.get("rope_theta", _get(text, "rope_theta", hf, default=None))
    if theta is None:
        theta = _TEXT_DEFAULTS["rope_theta"]
    section = params.get("mrope_section", scaling.get("mrope_section", DEFAULT_MROPE_SECTION))
    src = params if "rope_type" in params else scaling
    rope_type = src.get("rope_type", src.get("type", "default"))
    if rope_type in ("default", "mrope"):
        return float(theta), tuple(int(x) for x in section), None
    if rope_type not in ("linear", "yarn"):
        raise ValueError(f"rope_type={rope_type!r} is not supported; use default, linear or yarn")
    out = {k: v for k, v in src.items() if k not in ("mrope_section", "rope_theta", "type")}
    out["rope_type"] = rope_type  # legacy configs also carry type="mrope" beside rope_type
    return float(theta), tuple(int(x) for x in section), out
