"""HF Qwen2.5-VL ⇄ Megatron-Core (TP=1, PP=1) weight names and layouts: one declarative registry.

Each `Rule` maps one MCore tensor to one or more HF tensors with a reversible transform. Both HF naming schemes
are read: transformers ≥ 4.52 (`model.language_model.*`, `model.visual.*`) and the original checkpoints
(`model.*`, `visual.*`); `lm_head.weight` in both. Conversion is planned first — every HF tensor used and
every MCore tensor filled, or one error naming them all — then streamed tensor by tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from megatron_mmpl.models.qwen25vl.spec import ModelSpec

# ---- transforms: HF tensors (list) → one MCore tensor, and back ----------------------------------------------


def _split_groups(t: torch.Tensor, groups: int, sizes: list[int]) -> list[torch.Tensor]:
    """Inverse of the per-group interleave: [(a_g; b_g; ...) for g] → [a, b, ...] (rows)."""
    per = t.view(groups, sum(sizes), *t.shape[1:])
    parts = torch.split(per, sizes, dim=1)
    return [p.reshape(groups * s, *t.shape[1:]) for p, s in zip(parts, sizes)]


def _interleave(ts: list[torch.Tensor], groups: int) -> torch.Tensor:
    """[a, b, ...] (rows) → [(a_g; b_g; ...) for g]: megatron's per-query-group QKV layout."""
    per = [t.view(groups, t.shape[0] // groups, *t.shape[1:]) for t in ts]
    return torch.cat(per, dim=1).reshape(-1, *ts[0].shape[1:])


@dataclass(frozen=True)
class Transform:
    """A named reversible transform; `to_mcore(hf_list, dims)` and `to_hf(mcore, dims)`."""

    name: str
    to_mcore: Callable
    to_hf: Callable


COPY = Transform("copy", lambda ts, d: ts[0], lambda t, d: [t])
# LM grouped QKV: HF q [heads·hd], k/v [groups·hd] → per group [q × heads/groups; k; v].
GQA_QKV = Transform(
    "gqa_qkv",
    lambda ts, d: _interleave(ts, d["groups"]),
    lambda t, d: _split_groups(t, d["groups"], [d["heads"] // d["groups"] * d["head_dim"]] + [d["head_dim"]] * 2),
)
# ViT fused qkv [q; k; v] over all heads → per head [q_h; k_h; v_h].
FUSED_QKV = Transform(
    "fused_qkv",
    lambda ts, d: _interleave(list(ts[0].chunk(3, dim=0)), d["vheads"]),
    lambda t, d: [torch.cat(_split_groups(t, d["vheads"], [d["vhead_dim"]] * 3), dim=0)],
)
# Gated MLP: gate and up → linear_fc1 [gate; up].
GATE_UP = Transform("gate_up", lambda ts, d: torch.cat(ts, dim=0), lambda t, d: list(t.chunk(2, dim=0)))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


# The ViT MLP as built: zero-padded to `vffn_padded` (models/qwen25vl/padding.py); export drops the padding.
VIT_GATE_UP = Transform(
    "vit_gate_up",
    lambda ts, d: torch.cat([_pad_rows(t, d["vffn_padded"]) for t in ts], dim=0),
    lambda t, d: [x[: d["vffn"]] for x in t.chunk(2, dim=0)],
)
VIT_DOWN = Transform(
    "vit_down",
    lambda ts, d: _pad_rows(ts[0].t(), d["vffn_padded"]).t().contiguous(),
    lambda t, d: [t[:, : d["vffn"]].contiguous()],
)


@dataclass(frozen=True)
class Rule:
    """MCore name pattern ⇄ HF name pattern(s); `{i}` is a layer/block index, `{lm}`/`{vis}` the HF prefixes.

    `{i}` runs over the LM layers for `language_model.*` names and over the ViT blocks for `vision_model.*`.
    """

    mcore: str
    hf: tuple[str, ...]
    transform: Transform = COPY


def _rule(mcore: str, hf, transform: Transform = COPY) -> Rule:
    return Rule(mcore, (hf,) if isinstance(hf, str) else tuple(hf), transform)


_L = "language_model.decoder.layers.{i}."
_HL = "{lm}layers.{i}."
_V = "vision_model.decoder.layers.{i}."
_HV = "{vis}blocks.{i}."

RULES: tuple[Rule, ...] = (
    _rule("language_model.embedding.word_embeddings.weight", "{lm}embed_tokens.weight"),
    _rule(_L + "input_layernorm.weight", _HL + "input_layernorm.weight"),
    _rule(_L + "self_attention.linear_qkv.weight", [_HL + f"self_attn.{p}_proj.weight" for p in "qkv"], GQA_QKV),
    _rule(_L + "self_attention.linear_qkv.bias", [_HL + f"self_attn.{p}_proj.bias" for p in "qkv"], GQA_QKV),
    _rule(_L + "self_attention.linear_proj.weight", _HL + "self_attn.o_proj.weight"),
    _rule(_L + "pre_mlp_layernorm.weight", _HL + "post_attention_layernorm.weight"),
    _rule(_L + "mlp.linear_fc1.weight", [_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"], GATE_UP),
    _rule(_L + "mlp.linear_fc2.weight", _HL + "mlp.down_proj.weight"),
    _rule("language_model.decoder.final_layernorm.weight", "{lm}norm.weight"),
    _rule("language_model.output_layer.weight", "lm_head.weight"),  # untied models only
    _rule("vision_model.patch_embed.weight", "{vis}patch_embed.proj.weight"),
    _rule(_V + "input_layernorm.weight", _HV + "norm1.weight"),
    _rule(_V + "self_attention.linear_qkv.weight", _HV + "attn.qkv.weight", FUSED_QKV),
    _rule(_V + "self_attention.linear_qkv.bias", _HV + "attn.qkv.bias", FUSED_QKV),
    _rule(_V + "self_attention.linear_proj.weight", _HV + "attn.proj.weight"),
    _rule(_V + "self_attention.linear_proj.bias", _HV + "attn.proj.bias"),
    _rule(_V + "pre_mlp_layernorm.weight", _HV + "norm2.weight"),
    _rule(_V + "mlp.linear_fc1.weight", [_HV + "mlp.gate_proj.weight", _HV + "mlp.up_proj.weight"], VIT_GATE_UP),
    _rule(_V + "mlp.linear_fc1.bias", [_HV + "mlp.gate_proj.bias", _HV + "mlp.up_proj.bias"], VIT_GATE_UP),
    _rule(_V + "mlp.linear_fc2.weight", _HV + "mlp.down_proj.weight", VIT_DOWN),
    _rule(_V + "mlp.linear_fc2.bias", _HV + "mlp.down_proj.bias"),
    _rule("vision_model.decoder.final_layernorm.weight", "{vis}merger.ln_q.weight"),
    _rule("vision_model.projection.encoder.linear_fc1.weight", "{vis}merger.mlp.0.weight"),
    _rule("vision_model.projection.encoder.linear_fc1.bias", "{vis}merger.mlp.0.bias"),
    _rule("vision_model.projection.encoder.linear_fc2.weight", "{vis}merger.mlp.2.weight"),
    _rule("vision_model.projection.encoder.linear_fc2.bias", "{vis}merger.mlp.2.bias"),
)

# HF naming schemes: (language-model prefix, vision prefix).
NAMING = {"hf": ("model.language_model.", "model.visual."), "original": ("model.", "visual.")}
# HF entries that carry no weights of their own (buffers some exporters write).
_IGNORED_HF = re.compile(r".*(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq)$")


# ---- planning --------------------------------------------------------------------------------------------------


def _dims(hf_config) -> dict:
    """What the transforms need, from the model's spec (or anything `ModelSpec.of` takes)."""
    m = ModelSpec.of(hf_config)
    return dict(layers=m.layers, heads=m.heads, groups=m.kv_groups, head_dim=m.head_dim, depth=m.vision.depth,
                vheads=m.vision.num_heads, vhead_dim=m.vision.head_dim, tied=m.tied,
                vffn=m.vision.intermediate_size, vffn_padded=m.vision.built_ffn)


@dataclass(frozen=True)
class Entry:
    """One planned tensor: its MCore name, its HF names (in rule order) and the transform."""

    mcore: str
    hf: tuple[str, ...]
    transform: Transform


def plan(hf_config, naming: str = "hf") -> list[Entry]:
    """Every MCore tensor of the full (TP=1, PP=1) model with the HF tensors it comes from."""
    if naming not in NAMING:
        raise ValueError(f"naming={naming!r}; choose one of {', '.join(NAMING)}")
    d = _dims(hf_config)
    lm, vis = NAMING[naming]
    out = []  # (tower, position, rule order) → layer-major: a layer's tensors are planned together
    for k, r in enumerate(RULES):
        if r.mcore == "language_model.output_layer.weight" and d["tied"]:
            continue  # tied: the output layer reuses the input embedding
        vision = r.mcore.startswith("vision_model.")
        count = d["depth"] if vision else d["layers"]
        if "{i}" in r.mcore:
            positions = range(count)
        else:  # before or after its tower's layers, as listed in RULES
            tower = r.mcore.split(".")[0]
            first_layered = min(j for j, q in enumerate(RULES) if q.mcore.startswith(tower) and "{i}" in q.mcore)
            positions = [-1 if k < first_layered else count]
        for i in positions:
            fmt = dict(i=i, lm=lm, vis=vis)
            entry = Entry(r.mcore.format(**fmt), tuple(h.format(**fmt) for h in r.hf), r.transform)
            out.append(((vision, i, k), entry))
    return [e for _, e in sorted(out, key=lambda x: x[0])]


def mcore_names(hf_config) -> list[str]:
    """Names of the full TP=1 MCore parameters (what `hf_to_mcore` fills)."""
    return [e.mcore for e in plan(hf_config)]


def detect_naming(hf_names: Iterable[str]) -> str:
    """'hf' (model.language_model.*) or 'original' (model.* / visual.*) from the checkpoint's tensor names."""
    names = list(hf_names)
    if any(n.startswith(("model.language_model.", "model.visual.")) for n in names):
        return "hf"
    if any(n.startswith(("visual.", "model.layers.", "model.embed_tokens.")) for n in names):
        return "original"
    raise ValueError(f"cannot tell the HF naming scheme from tensor names like {names[:5]}")


def _source(source, names: Iterable[str] | None) -> tuple[Callable[[str], torch.Tensor], list[str]]:
    """A getter and the list of available names from a mapping, a `.get`/`.names()` reader, or a callable."""
    if isinstance(source, Mapping):
        return source.__getitem__, list(source.keys()) if names is None else list(names)
    if hasattr(source, "get") and hasattr(source, "names"):
        return source.get, list(source.names()) if names is None else list(names)
    if callable(source):
        if names is None:
            raise ValueError("a getter function needs `names` (the tensor names it can provide)")
        return source, list(names)
    raise TypeError(f"unsupported tensor source {type(source).__name__}: pass a dict, a reader or a getter")


def _mismatch(kind_have: str, missing: list[str], unused: list[str]) -> str:
    lines = []
    if missing:
        lines.append(f"{len(missing)} tensor(s) needed but missing: {missing}")
    if unused:
        lines.append(f"{len(unused)} {kind_have} tensor(s) not used by any rule: {unused}")
    return "; ".join(lines)


# ---- conversion ------------------------------------------------------------------------------------------------


def hf_to_mcore(source, hf_config, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (mcore_name, tensor) for the full TP=1 MCore model from HF tensors, one at a time.

    `source`: a dict name → tensor, a reader with `.get(name)` and `.names()` (e.g. HFCheckpoint), or a getter
    plus `names`. Checks coverage before reading anything: raises ValueError listing every missing and every
    unused HF tensor. In a tied model an `lm_head.weight` present in the checkpoint is accepted and ignored.
    """
    get, have = _source(source, names)
    entries = plan(hf_config, detect_naming(have))
    need = [h for e in entries for h in e.hf]
    have_set, need_set = set(have), set(need)
    missing = [h for h in need if h not in have_set]
    unused = [h for h in have if h not in need_set and not _IGNORED_HF.match(h)]
    if _dims(hf_config)["tied"] and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")
    if missing or unused:
        raise ValueError("HF → MCore mapping does not cover the checkpoint: " + _mismatch("HF", missing, unused))
    return _stream(entries, get, _dims(hf_config))


def _stream(entries, get, dims) -> Iterator[tuple[str, torch.Tensor]]:
    for e in entries:
        yield e.mcore, e.transform.to_mcore([get(h) for h in e.hf], dims).contiguous()


def mcore_to_hf(
    source, hf_config, names: Iterable[str] | None = None, naming: str = "hf"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) from a full TP=1 MCore state (dict, reader or getter + names), one at a time.

    naming: 'hf' (transformers ≥ 4.52 names) or 'original' (the released checkpoints' names). Raises ValueError
    listing every missing and every unused MCore tensor before producing anything.
    """
    get, have = _source(source, names)
    entries = plan(hf_config, naming)
    need = [e.mcore for e in entries]
    have_set, need_set = set(have), set(need)
    missing = [n for n in need if n not in have_set]
    unused = [n for n in have if n not in need_set and not n.endswith("._extra_state")]
    if _dims(hf_config)["tied"] and "language_model.output_layer.weight" in unused:
        unused.remove("language_model.output_layer.weight")  # a PP copy of the tied embedding
    if missing or unused:
        raise ValueError("MCore → HF mapping does not cover the state: " + _mismatch("MCore", missing, unused))
    dims = _dims(hf_config)
    return _stream_back(entries, get, dims)


def _stream_back(entries, get, dims) -> Iterator[tuple[str, torch.Tensor]]:
    for e in entries:
        parts = e.transform.to_hf(get(e.mcore), dims)
        for name, t in zip(e.hf, parts):
            yield name, t.contiguous()


def hf_to_mcore_dict(state: Mapping[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Convenience: the whole converted dict."""
    return dict(hf_to_mcore(state, hf_config))


def mcore_to_hf_dict(state: Mapping[str, torch.Tensor], hf_config, naming: str = "hf") -> dict[str, torch.Tensor]:
    return dict(mcore_to_hf(state, hf_config, naming=naming))
