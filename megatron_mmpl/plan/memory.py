"""Memory and throughput plan of a run config on N nodes × G GPUs: per-GPU bytes by stage, tokens per step, steps.

Estimates what this trainer builds: megatron-core with bf16 weights, fp32 main grads and the distributed
optimizer (fp32 master + Adam moments sharded over dp·cp); megatron's local layers with our CoreAttention (per
packed segment, never an s×s matrix; under CP it all-gathers K/V), whose saved activations are counted tensor
by tensor (`layer_activation_bytes`, checked against a real layer); megatron recompute (`model.recompute`,
applied to the LM and the ViT); the ViT + merger on pipeline stage 0 with the micro-batch's images split over
the CP ranks (parallel/context_parallel.py); a 1F1B pipeline schedule; on the last stage the training loss's
logits, which exist for one chunk of `LanguageModel.loss_chunk_tokens` positions at a time
(models/qwen25vl/language_model.py). Pure Python."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from megatron_mmpl.config.hf_config import resolve_hf_dict
from megatron_mmpl.config.load import ConfigError
from megatron_mmpl.config.schema import Config
from megatron_mmpl.config.validate import train_steps, validate_config, validate_layout, warmup_steps
from megatron_mmpl.models.qwen25vl.spec import ModelSpec
from megatron_mmpl.training.flops import FlopModel, Training

# Positions per chunk of the training loss (models/qwen25vl/language_model.py: LanguageModel.loss_chunk_tokens);
# a literal here keeps the planner free of torch/megatron imports. tests/unit/plan checks they agree.
LOSS_CHUNK_TOKENS = 4096
GiB = 1024**3
# Held back from the card's memory: CUDA context, NCCL and cuBLAS/cuDNN workspaces (GiB) ...
RESERVED_GIB = 4.0
# ... and a share of the rest for the caching allocator's fragmentation.
FRAGMENTATION = 0.10
# Fraction of a packed row that is image tokens. Long-document VQA rows are page images plus a short
# question/answer (~1,240 tokens per page, a few dozen text tokens), so plan for the worst case: all image.
IMAGE_TOKEN_FRACTION = 1.0
# The ViT encodes only this CP rank's share of the micro-batch's images (parallel/context_parallel.py
# partition_images_for_cp, then an all-gather of the merged embeddings); False: every CP rank encodes all.
VIT_IMAGES_SPLIT_OVER_CP = True


class PlanError(ValueError):
    """A layout that cannot run at all (the message names the value and the fix)."""


@dataclass(frozen=True)
class Hardware:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def budget_bytes(self) -> float:
        return (self.gpu_mem_gib - RESERVED_GIB) * (1 - FRAGMENTATION) * GiB


# ------------------------------------------------------------------------------------------- parameters


def lm_layer_params(m: ModelSpec) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of one LM layer: QKV with bias, out proj, gated MLP; two RMSNorms."""
    q, kv = m.heads * m.head_dim, 2 * m.kv_groups * m.head_dim
    sharded = m.hidden * (q + kv) + (q + kv) + q * m.hidden + 3 * m.hidden * m.ffn
    return sharded, 2 * m.hidden


def vit_block_params(m: ModelSpec, as_built: bool = True) -> tuple[int, int]:
    """(TP-sharded, replicated) parameters of one ViT block: QKV + bias, proj, gated MLP with biases, 2 norms;
    the MLP as built (zero-padded) or, `as_built=False`, as in the checkpoint."""
    h, f = m.vision.hidden_size, m.vision.built_ffn if as_built else m.vision.intermediate_size
    sharded = 3 * h * h + 3 * h + h * h + 2 * h * f + 2 * f + f * h
    return sharded, h + h + 2 * h  # row-parallel biases (proj, fc2) and the two norms


def vit_extra_params(m: ModelSpec) -> tuple[int, int, int]:
    """(patch embedding [replicated], merger sharded, merger replicated): conv without bias; norm + 2-layer MLP."""
    v, wide = m.vision, m.vision.merged_hidden
    return v.patch_dim * v.hidden_size, wide * wide + wide + wide * m.hidden, v.hidden_size + m.hidden


def total_params(m: ModelSpec) -> int:
    """Whole-model parameter count (tp=1): equals the Hugging Face model's."""
    layer = sum(lm_layer_params(m))
    lm = m.layers * layer + m.vocab * m.hidden * (1 if m.tied else 2) + m.hidden
    patch, merger_s, merger_r = vit_extra_params(m)
    return lm + m.vision.depth * sum(vit_block_params(m, as_built=False)) + patch + merger_s + merger_r


def checkpoint_bytes(m: ModelSpec, dtype: str) -> int:
    """Bytes of one training checkpoint on disk: the weights in the model's dtype plus what megatron's
    fully_reshardable optimizer format saves per parameter in every dtype (fp32 master copy, two fp32 Adam
    moments); metadata and tokenizer files aside (a few MB)."""
    return total_params(m) * ((4 if dtype == "fp32" else 2) + 12)


# ------------------------------------------------------------------------------------------- activations


def layer_activation_bytes(h: int, heads: int, kv: int, ffn: int, head_dim: int, tp: int, sp: bool,
                           recompute: str, elem: int = 2, cp_gathered: bool = False, cuda: bool = True,
                           modules: tuple[str, ...] = ("core_attn",), fused_qkv: bool = False) -> float:
    """Bytes one transformer layer (LM or ViT block, as this trainer builds them) keeps for backward per token of
    the rank's sequence (the whole row, or its CP share; sequence parallel shards only the norm regions),
    K/V of the CP all-gather excluded (see `gathered_kv_bytes`). q = heads·head_dim; kv = groups·head_dim.

    Counted from the tensors autograd saves in megatron's local layer with our CoreAttention (the unit test
    tests/unit/plan/test_activation_memory.py checks this against real layers to the byte on CPU, and on a GPU),
    in elements of the activation dtype per token; `sp` divides the norm regions by tp, else replicated:
      norms: RMSNorm input and the linear input after it, before attention and before the MLP: 4h/sp;
      attention: SDPA's q, k, v inputs — `fused_qkv` (the ViT on CUDA): the one QKV-bias-RoPE kernel's three
        tensors (q + 2kv); else RoPE'd q (q) and k (kv) and the QKV output buffer (q + 2kv, alive because v is a
        view of it);
        SDPA's output q and the out-proj input q;
      MLP: fc1 output [gate; up] 2F/tp and the fc2 input F/tp (`cuda`: megatron's fused SwiGLU keeps only
        those), or unfused 2F + 3F (a copy of gate, silu(gate), silu(gate)·up);
      fp32: log-sum-exp heads/tp, RMSNorm rstd 2/sp; unfused RoPE (CPU) its cos/sin for q and k
        4·head_dim; CPU's composite RMSNorm its x·rstd 2h/sp. On CUDA the RoPE kernel keeps only the shared
        position table (counted once per model, not here).
      selective: megatron's `modules` of the layer are rebuilt in the backward —
        core_attn: − SDPA output q − log-sum-exp;
        mlp: − the MLP's own tensors (its checkpoint keeps only its input, the norm output counted above);
      full = elem·h/sp per recompute chunk (only the chunk's input is kept)
    Under CP (`cp_gathered`) K/V are all-gathered and the gathered copies are kept instead of the local QKV
    buffer and RoPE'd k (derived, not measured). Assumes no dropout (Qwen2.5-VL has none).
    """
    sp_div = tp if sp else 1
    q = heads * head_dim
    if recompute == "full":
        return elem * h / sp_div
    mods = set(modules) if recompute == "selective" else set()
    qkv = q if cp_gathered else (q + 2 * kv if fused_qkv else q + kv + (q + 2 * kv))
    mlp = 0 if "mlp" in mods else (3 if cuda else 5) * ffn
    elems = (4 if cuda else 6) * h / sp_div + (qkv + 2 * q + mlp) / tp
    extra = 4 * (heads / tp + 2 / sp_div) + (0 if cuda else 4 * 4 * head_dim)
    if "core_attn" in mods:
        elems -= q / tp
        extra -= 4 * heads / tp
    return elem * elems + extra


def lm_layer_activation_bytes(m: ModelSpec, tp: int, sp: bool, recompute: str, elem: int = 2, cp: int = 1,
                              cuda: bool = True, modules: tuple[str, ...] = ("core_attn",)) -> float:
    """`layer_activation_bytes` at the LM's shape, per local token."""
    return layer_activation_bytes(m.hidden, m.heads, m.kv_groups * m.head_dim, m.ffn, m.head_dim, tp, sp, recompute,
                                  elem, cp > 1, cuda, modules=modules)


def gathered_kv_bytes(m: ModelSpec, tp: int, elem: int = 2) -> float:
    """K and V one LM layer keeps per token of the whole row when CP all-gathers them (cp > 1 only)."""
    return elem * 2 * m.kv_groups * m.head_dim / tp


def vit_block_activation_bytes(m: ModelSpec, tp: int, recompute: str, elem: int = 2, cuda: bool = True,
                               windowed: bool | None = None) -> float:
    """`layer_activation_bytes` at the ViT's shape (multi-head: K/V as wide as q; no sequence parallel), per
    patch. Window blocks attend in views of equal windows (the tower keeps windows of one size back to back; a
    page row has several sizes, so the outputs are concatenated for the out-proj as counted there). A
    full-attention block keeps its input gathered into frames (+h: the regrouping scatters the frames of a
    multi-page row), and its frames, pages of one size, attend in one batched call whose output is itself the
    out-proj input (−q, when core attention is not rebuilt). `windowed` picks one kind; None averages over the
    ViT's blocks (`fullatt_block_indexes` full)."""
    v = m.vision

    def one(windowed: bool) -> float:
        view = v.hidden_size / tp if recompute == "none" else 0  # selective rebuilds that output anyway
        frames = 0 if windowed or recompute == "full" else elem * (v.hidden_size - view)
        return frames + layer_activation_bytes(v.hidden_size, v.num_heads, v.hidden_size, v.built_ffn, v.head_dim,
                                               tp, False, recompute, elem, False, cuda, fused_qkv=cuda)

    if windowed is not None:
        return one(windowed)
    full = min(len(v.fullatt_block_indexes), v.depth)
    return (full * one(False) + (v.depth - full) * one(True)) / v.depth


def merger_activation_bytes(m: ModelSpec, tp: int, elem: int = 2) -> float:
    """Bytes the patch merger keeps per patch: norm input and output (replicated), fc1 output and GELU output
    (TP-sharded); the merger is an MLP, not a transformer block, so recompute does not touch it."""
    return elem * (2 * m.vision.hidden_size + 2 * m.vision.hidden_size / tp)


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class StageMemory:
    stage: int
    lm_layers: int
    in_flight: int
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())


@dataclass
class Plan:
    name: str
    hardware: Hardware
    tp: int
    pp: int
    cp: int
    dp: int
    recompute: str
    vit_recompute: str
    seq_len: int
    micro_batch: int
    global_batch: int
    micro_batches_per_step: int
    params: int
    stages: list[StageMemory]
    tokens_per_step: int
    train_steps: int
    warmup_steps: int
    train_tokens: int | None
    refusal: str | None = None
    notes: list[str] = field(default_factory=list)
    model_settings: dict = field(default_factory=dict)  # the recompute fields planned (auto resolved)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.refusal is None


def check_layout(cfg: Config, hw: Hardware, m: ModelSpec) -> int:
    """Refuse layouts that cannot start (PlanError naming the value); return the data-parallel size."""
    p = cfg.parallel
    try:
        validate_config(cfg)
        dp = validate_layout(cfg, hw.world_size, m)
    except ConfigError as e:
        raise PlanError(str(e).removeprefix("config error: ")) from None
    if p.tp > hw.gpus_per_node:
        raise PlanError(f"parallel.tp={p.tp} spans nodes ({hw.gpus_per_node} GPUs per node); tensor parallelism "
                        f"needs NVLink: keep tp <= {hw.gpus_per_node} and raise cp or pp instead")
    s, unit = cfg.data.max_seq_len, p.pad_multiple  # what the loader pads every sample to
    if s % unit:
        raise PlanError(f"data.max_seq_len={s} must be a multiple of {unit} (2·cp, times tp with sequence parallel) "
                        f"so every row is whole padded samples; use {math.ceil(s / unit) * unit}")
    return dp


def resolved_recompute(cfg: Config) -> str:
    if cfg.model.recompute == "auto":
        raise PlanError("model.recompute=auto must be resolved first (plan_config does it: choose_recompute)")
    return cfg.model.recompute


SELECTIVE_MLP = ("mlp",)  # the selective policy auto tries: attention and norms kept, the MLP rebuilt


def stage_layers(cfg: Config, m: ModelSpec) -> int:
    """LM layers on the fullest pipeline stage."""
    p = cfg.parallel
    most = p.first_stage_layers if (p.pp > 1 and p.first_stage_layers) else -(-m.layers // p.pp)
    if p.pp > 1:
        most = max(most, (m.layers - (p.first_stage_layers or m.layers // p.pp)) // (p.pp - 1))
    return most


def recompute_candidates(cfg: Config, m: ModelSpec) -> list[dict]:
    """LM recompute settings: none; full on the first k layers of each stage (block); selective MLP on every
    layer; full on every layer (uniform). `recompute_settings` orders them by what they rebuild."""
    most = stage_layers(cfg, m)
    out = [dict(recompute="none")]
    out += [dict(recompute="full", recompute_method="block", recompute_num_layers=k) for k in range(1, most)]
    out += [dict(recompute="selective", recompute_modules=list(SELECTIVE_MLP))]
    return out + [dict(recompute="full", recompute_method="uniform", recompute_num_layers=1)]


def rebuilt_flops(setting: dict, m: ModelSpec, seq: int, layers: int) -> float:
    """Forward FLOPs per token that an LM recompute setting reruns in the backward on a stage of `layers` layers
    (one causal sample filling the row; training/flops.py's count, which the trainer logs as HFU)."""
    k = layers
    if setting["recompute"] == "full" and setting.get("recompute_method") == "block":
        k = min(setting["recompute_num_layers"], layers)
    training = Training(lm_layers_rebuilt=k if setting["recompute"] == "full" else 0,
                        lm_modules_rebuilt=tuple(setting.get("recompute_modules", ["core_attn"]))
                        if setting["recompute"] == "selective" else ())
    return FlopModel(replace(m, layers=layers), training).rebuilt_flops([seq]) / seq


# The chunked ViT (whole tower rerun per chunk) against megatron's per-block recompute, both rebuilding the forward
# once: measured 2.153 vs 1.964 s forward + backward for the 3B's ViT over 128,960 patches on an H200
# (benchmarks/bench_vit_tower.py, docs/PERFORMANCE.md), i.e. ~0.3 of a ViT forward more; auto counts it so.
VIT_CHUNKED_EXTRA = 0.3


def vit_forward_flops_per_token(m: ModelSpec) -> float:
    """The ViT's forward matmul FLOPs per LM token of a row that is all image (attention left out)."""
    v = m.vision
    per_patch = v.depth * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size)
    return 2 * per_patch * IMAGE_TOKEN_FRACTION * v.spatial_merge_size**2


def vit_candidates(cfg: Config, m: ModelSpec) -> list[dict]:
    """ViT recompute settings auto weighs: the configured one; when that is full with vit_recompute_blocks left
    null, also every count of recomputed blocks (0 = none) and the chunked ViT."""
    mc = cfg.model
    if mc.vit_recompute != "full":
        return [dict(vit_recompute=mc.vit_recompute, vit_recompute_blocks=None)]
    chunked = dict(vit_recompute="chunked", vit_recompute_blocks=None)
    if mc.vit_recompute_blocks is not None:
        return [dict(vit_recompute="full", vit_recompute_blocks=mc.vit_recompute_blocks), chunked]
    depth = m.vision.depth
    return ([dict(vit_recompute="none", vit_recompute_blocks=None)]
            + [dict(vit_recompute="full", vit_recompute_blocks=k) for k in range(1, depth)]
            + [dict(vit_recompute="full", vit_recompute_blocks=None), chunked])


def vit_rebuilt_flops(setting: dict, m: ModelSpec) -> float:
    """ViT forward FLOPs per LM token that a ViT recompute setting reruns in the backward: the recomputed blocks'
    share of one forward; the chunked ViT one forward and VIT_CHUNKED_EXTRA more."""
    forward = vit_forward_flops_per_token(m)
    if setting["vit_recompute"] == "chunked":
        return (1 + VIT_CHUNKED_EXTRA) * forward
    if setting["vit_recompute"] == "none":
        return 0.0
    return forward * vit_recomputed_blocks(setting.get("vit_recompute_blocks"), m) / m.vision.depth


def vit_recomputed_blocks(blocks: int | None, m: ModelSpec) -> int:
    """ViT blocks megatron recomputes under vit_recompute=full (null: every block)."""
    return m.vision.depth if blocks is None else min(blocks, m.vision.depth)


def recompute_settings(cfg: Config, m: ModelSpec) -> list[dict]:
    """(LM recompute, ViT recompute) settings for model.recompute=auto, cheapest first by the forward FLOPs each
    rebuilds per token of a row of data.max_seq_len (`rebuilt_flops` + `vit_rebuilt_flops`; stable for equal
    costs): every pair of the LM candidates (`recompute_candidates`) and the ViT candidates (`vit_candidates`)."""
    layers = stage_layers(cfg, m)
    pairs = [(vit, c) for vit in vit_candidates(cfg, m) for c in recompute_candidates(cfg, m)]
    out = [(rebuilt_flops(c, m, cfg.data.max_seq_len, layers) + vit_rebuilt_flops(vit, m), i, {**c, **vit})
           for i, (vit, c) in enumerate(pairs)]
    return [c for _, _, c in sorted(out, key=lambda t: t[:2])]


def choose_recompute(cfg: Config, hw: Hardware, m: ModelSpec) -> tuple[Config, str]:
    """For model.recompute=auto: the config with the cheapest recompute setting (`recompute_settings`, same costs
    and tie order) whose plan fits (else the leanest), and a line saying what was chosen.

    Not every pair is planned. With the ViT's recomputed blocks left to auto, memory falls as blocks are added:
    from one on each replaces a block's activations by its input, and none keeps more than every block
    recomputed does. So for each LM setting: if recomputing every block does not fit, no count does; else the
    fewest that fit is found by bisection (the cheapest of them), and none is planned on its own."""
    def trial(setting: dict) -> Config:
        return replace(cfg, model=replace(cfg.model, **setting))

    def fits(setting: dict) -> bool:
        return plan_config(trial(setting), hw, shape=m).fits

    lm_settings, vit_settings = recompute_candidates(cfg, m), vit_candidates(cfg, m)
    layers, depth = stage_layers(cfg, m), m.vision.depth
    auto_blocks = cfg.model.vit_recompute == "full" and cfg.model.vit_recompute_blocks is None
    best = None
    for ci, lm in enumerate(lm_settings):
        fitting = []
        if auto_blocks:  # vit_settings[k]: k ViT blocks recomputed (0 = none, depth = every block), then chunked
            if fits({**lm, **vit_settings[depth]}):
                lo, hi = 1, depth
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if fits({**lm, **vit_settings[mid]}) else (mid + 1, hi)
                fitting.append(lo)
                if fits({**lm, **vit_settings[0]}):
                    fitting.append(0)
            fitting += [len(vit_settings) - 1] if fits({**lm, **vit_settings[-1]}) else []
        else:
            fitting = [vi for vi, vit in enumerate(vit_settings) if fits({**lm, **vit})]
        for vi in fitting:
            setting = {**lm, **vit_settings[vi]}
            key = (rebuilt_flops(lm, m, cfg.data.max_seq_len, layers) + vit_rebuilt_flops(setting, m),
                   vi * len(lm_settings) + ci)
            if best is None or key < best[0]:
                best = (key, setting)
    if best is not None:
        chosen = trial(best[1])
        return chosen, f"model.recompute=auto chose {recompute_label(chosen)}, ViT {vit_recompute_label(chosen, m)}"
    chosen = trial(recompute_settings(cfg, m)[-1])
    return chosen, (f"model.recompute=auto: nothing fits; planned the leanest, {recompute_label(chosen)}, "
                    f"ViT {vit_recompute_label(chosen, m)}")


def recompute_label(cfg: Config) -> str:
    mc = cfg.model
    if mc.recompute == "selective":
        return f"selective ({', '.join(mc.recompute_modules)})"
    if mc.recompute != "full":
        return mc.recompute
    if mc.recompute_method == "block":
        return f"full (block: {mc.recompute_num_layers} layer(s) per stage)"
    return f"full (uniform, {mc.recompute_num_layers} layer(s) per chunk)"


def vit_recompute_label(cfg: Config, m: ModelSpec) -> str:
    mc = cfg.model
    if mc.vit_recompute != "full":
        return mc.vit_recompute
    k = vit_recomputed_blocks(mc.vit_recompute_blocks, m)
    return "full" if k == m.vision.depth else f"full on {k} of {m.vision.depth} blocks"


def plan_config(cfg: Config, hw: Hardware, name: str = "", shape: ModelSpec | None = None) -> Plan:
    """Per-GPU memory by pipeline stage, tokens per step and steps; `refusal` says why it will not fit.

    Per stage: weights (bf16; fp32 runs 4 bytes), fp32 main grads of trainable weights, optimizer state
    (fp32 master + Adam m, v: 12 bytes, 8 in fp32 runs) sharded over dp·cp; stored activations × in-flight
    micro-batches (1F1B: stage i holds min(pp − i, micro-batches) forwards); on stage 0 the ViT, merger and the
    full micro-batch's pixel rows (fp32); a transient working set (backward of one recompute chunk plus one
    layer of gradient temporaries); on the last stage one loss chunk's logits (activation + fp32 copy kept by cross
    entropy; the loss runs the output layer LOSS_CHUNK_TOKENS positions at a time).
    Raises PlanError for a layout that cannot start.
    """
    m = shape or ModelSpec.from_hf(resolve_hf_dict(cfg.model))
    dp = check_layout(cfg, hw, m)
    if cfg.model.recompute == "auto":
        cfg, line = choose_recompute(cfg, hw, m)
        plan = plan_config(cfg, hw, name, m)
        plan.notes.append(line)
        return plan
    p, d, mc = cfg.parallel, cfg.data, cfg.model
    tp, pp, cp, sp = p.tp, p.pp, p.cp, p.sequence_parallel
    fp32 = mc.dtype == "fp32"
    elem = 4 if fp32 else 2
    weight_b, grad_b, optim_b = (4, 4, 8) if fp32 else (2, 4, 12)
    shard = dp * cp
    micro_batches = d.global_batch_size // (d.micro_batch_size * dp)
    rows = d.micro_batch_size
    tokens = d.max_seq_len * rows  # per micro-batch, whole row(s)
    local = tokens / cp  # per CP rank
    patches = tokens * IMAGE_TOKEN_FRACTION * m.vision.spatial_merge_size**2  # whole micro-batch
    patches_local = patches / cp if VIT_IMAGES_SPLIT_OVER_CP else patches
    recompute = resolved_recompute(cfg)

    first = p.first_stage_layers if (pp > 1 and p.first_stage_layers) else m.layers // pp
    rest = (m.layers - first) // (pp - 1) if pp > 1 else 0
    layer_s, layer_r = lm_layer_params(m)
    block_s, block_r = vit_block_params(m)
    patch_w, merger_s, merger_r = vit_extra_params(m)
    a_none = lm_layer_activation_bytes(m, tp, sp, "none", elem, cp)
    kv_full = gathered_kv_bytes(m, tp, elem) * tokens if cp > 1 else 0.0  # per layer, under CP
    v_none = vit_block_activation_bytes(m, tp, "none", elem)

    stages = []
    for i in range(pp):
        n_layers = first if i == 0 else rest
        last = i == pp - 1
        in_flight = min(pp - i, micro_batches)
        lm = n_layers * (layer_s / tp + layer_r) + (m.vocab * m.hidden / tp if i == 0 else 0)
        if last:
            lm += m.hidden + (m.vocab * m.hidden / tp if (pp > 1 or not m.tied) else 0)
        vit = merger = 0.0
        if i == 0:
            vit = m.vision.depth * (block_s / tp + block_r) + patch_w
            merger = merger_s / tp + merger_r
        trainable = ((0 if mc.freeze_llm else lm) + (0 if mc.freeze_vision else vit)
                     + (0 if mc.freeze_merger else merger))
        st = StageMemory(stage=i, lm_layers=n_layers, in_flight=in_flight)
        st.terms["weights"] = weight_b * (lm + vit + merger)
        st.terms["grads"] = grad_b * trainable
        st.terms["optimizer"] = optim_b * trainable / shard
        # LM activations kept for backward, per micro-batch in flight.
        full_b = lm_layer_activation_bytes(m, tp, sp, "full", elem) * local
        if recompute == "full" and mc.recompute_method == "block":
            k = min(mc.recompute_num_layers, n_layers)
            kept = k * full_b + (n_layers - k) * (a_none * local + kv_full)
            rebuilt = 1 if k else 0
        elif recompute == "full":
            kept = math.ceil(n_layers / mc.recompute_num_layers) * full_b
            rebuilt = min(mc.recompute_num_layers, n_layers)
        else:
            modules = tuple(mc.recompute_modules)
            kept = n_layers * (lm_layer_activation_bytes(m, tp, sp, recompute, elem, cp, modules=modules) * local
                               + kv_full)
            rebuilt = 0
        st.terms["activations"] = kept * in_flight
        # Working set of the LM backward: the layers being rebuilt plus one layer's gradient temporaries; on the
        # last stage also one loss chunk's logits (+ the fp32 copy cross entropy keeps), recomputed in the backward.
        lm_work = (rebuilt + 1) * (a_none * local + kv_full)
        logits = (elem + 4) * m.vocab / tp * min(local, LOSS_CHUNK_TOKENS) if last else 0.0
        transient = lm_work
        if i == 0:
            vit_trains = not mc.freeze_vision
            if vit_trains and mc.vit_recompute == "chunked":
                # whole images in chunks, each rebuilt in its own backward: nothing kept, one chunk's blocks live
                vit_kept = 0.0
                vit_work = min(mc.vit_chunk_patches, patches_local) * (m.vision.depth * v_none
                                                                      + merger_activation_bytes(m, tp, elem))
            elif vit_trains and mc.vit_recompute == "full":
                # megatron's per-block recompute: the first k blocks keep their inputs, the others everything
                k = vit_recomputed_blocks(mc.vit_recompute_blocks, m)
                kept_full_att = sum(k <= i < m.vision.depth for i in set(m.vision.fullatt_block_indexes))
                vit_kept = patches_local * (
                    k * vit_block_activation_bytes(m, tp, "full", elem)
                    + kept_full_att * vit_block_activation_bytes(m, tp, "none", elem, windowed=False)
                    + (m.vision.depth - k - kept_full_att) * vit_block_activation_bytes(m, tp, "none", elem,
                                                                                         windowed=True))
                vit_work = (2 if k else 1) * v_none * patches_local  # a block rebuilt + its gradient temporaries
            elif vit_trains:
                vit_kept = m.vision.depth * v_none * patches_local
                vit_work = v_none * patches_local
            else:
                vit_kept, vit_work = 0.0, 0.0  # frozen: no graph through the blocks
            if not mc.freeze_merger and not (vit_trains and mc.vit_recompute == "chunked"):
                vit_kept += merger_activation_bytes(m, tp, elem) * patches_local
            st.terms["vit_activations"] = vit_kept * in_flight
            st.terms["pixels"] = 4 * m.vision.patch_dim * patches * (in_flight if vit_trains else 1)
            # The ViT's backward runs after the LM's has freed this micro-batch's LM activations and logits.
            transient = max(lm_work, vit_work - kept - logits)
        st.terms["transient"] = transient
        if last:
            st.terms["logits"] = logits
        stages.append(st)

    steps = train_steps(cfg)
    plan = Plan(
        name=name, hardware=hw, tp=tp, pp=pp, cp=cp, dp=dp, recompute=recompute_label(cfg),
        vit_recompute=vit_recompute_label(cfg, m), seq_len=d.max_seq_len,
        micro_batch=rows, global_batch=d.global_batch_size, micro_batches_per_step=micro_batches,
        params=total_params(m), stages=stages, tokens_per_step=d.global_batch_size * d.max_seq_len,
        train_steps=steps, warmup_steps=warmup_steps(cfg), train_tokens=cfg.schedule.train_tokens,
    )
    plan.model_settings = {k: getattr(mc, k) for k in ("recompute", "recompute_method", "recompute_num_layers",
                                                       "recompute_modules", "vit_recompute",
                                                       "vit_recompute_blocks")}
    if pp > 1 and micro_batches < pp:
        plan.notes.append(f"{micro_batches} micro-batches per step for {pp} pipeline stages: most of each step is "
                          f"pipeline bubble; raise data.global_batch_size to >= {pp * rows * dp}")
    peak = plan.peak
    if peak.total > hw.budget_bytes:
        big = max(peak.terms, key=peak.terms.get)
        plan.refusal = (
            f"does not fit: stage {peak.stage} needs {peak.total / GiB:.1f} GiB per GPU, over the "
            f"{hw.budget_bytes / GiB:.1f} GiB usable of a {hw.gpu_mem_gib:g} GiB GPU (largest: {big} "
            f"{peak.terms[big] / GiB:.1f} GiB); {_hint(cfg, hw, big)}"
        )
    return plan


def _hint(cfg: Config, hw: Hardware, term: str) -> str:
    mc = cfg.model
    if term in ("activations", "transient") and mc.recompute != "full":
        return "set model.recompute=full, or raise parallel.cp"
    if term == "vit_activations" and not mc.freeze_vision:
        return "raise parallel.cp (images are split over CP ranks), or set model.freeze_vision=true"
    if term in ("weights", "grads", "optimizer"):
        return "raise parallel.tp/pp (weights, grads) or use more nodes (optimizer shards over dp·cp)"
    return "raise parallel.cp or parallel.tp (fewer tokens or a thinner slice per GPU), or use more nodes"


def format_plan(plan: Plan) -> str:
    """A short human-readable report."""
    hw = plan.hardware
    lines = [
        f"plan {plan.name}: {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) of {hw.gpu_mem_gib:g} GiB "
        f"(usable {hw.budget_bytes / GiB:.1f} GiB)",
        f"  model {_count(plan.params)} params; layout tp={plan.tp} pp={plan.pp} cp={plan.cp} dp={plan.dp}, "
        f"recompute={plan.recompute}, ViT recompute={plan.vit_recompute}",
        f"  batch: {plan.global_batch} rows x {plan.seq_len} tokens = {plan.tokens_per_step:,} tokens/step; "
        f"micro-batch {plan.micro_batch} row(s), {plan.micro_batches_per_step} micro-batches per step per DP rank",
    ]
    budget = f"{plan.train_tokens:,} tokens -> " if plan.train_tokens else ""
    lines.append(f"  schedule: {budget}{plan.train_steps} steps ({plan.warmup_steps} warmup)")
    for st in plan.stages:
        terms = ", ".join(f"{k} {v / GiB:.1f}" for k, v in st.terms.items() if v)
        mark = " <- peak" if st is plan.peak and len(plan.stages) > 1 else ""
        lines.append(f"  stage {st.stage} ({st.lm_layers} LM layers{', ViT' if st.stage == 0 else ''}, "
                     f"{st.in_flight} in flight): {st.total / GiB:.1f} GiB = {terms}{mark}")
    lines += [f"  note: {n}" for n in plan.notes]
    lines.append(f"  fits: {plan.peak.total / GiB:.1f} of {hw.budget_bytes / GiB:.1f} GiB" if plan.fits
                 else f"  REFUSED: {plan.refusal}")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
