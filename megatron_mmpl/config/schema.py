"""The run configuration: one typed dataclass per section; the string under each field documents it.

Sections: model, parallel, data, optim, schedule, checkpoint, logging. Values come from a YAML recipe plus
`section.field=value` overrides (see `load.py`); checks that need no process group live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Which model, in which precision, with what frozen and recomputed."""

    hf_config: str = "tiny"
    """A model preset (`tiny`, `qwen25vl-3b`, `qwen25vl-7b`, ...: models/qwen25vl/presets.py) or a path to a
    Hugging Face `config.json` or to the directory holding it."""
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    """config.json fields to replace, e.g. {vocab_size: 512, image_token_id: 492}; `text_config.x` /
    `vision_config.x` reach the sub-configs (a bare LM field goes to text_config when the preset nests it)."""
    dtype: str = "bf16"
    """Parameter/compute dtype: bf16 | fp16 | fp32. With bf16/fp16 the optimizer keeps fp32 master weights.
    On CPU (no CUDA) use fp32."""
    freeze_vision: bool = False
    """Freeze the ViT blocks and patch embedding (not the merger)."""
    freeze_merger: bool = False
    """Freeze the patch merger (the ViT → LM projector)."""
    freeze_llm: bool = False
    """Freeze the language model (embedding, decoder, output layer)."""
    recompute: str = "auto"
    """LM activation recompute: auto | none | selective (the `recompute_modules` of every layer) | full (whole
    layers). auto: on a GPU the cheapest policy the memory planner says fits this GPU — none, then by the
    forward FLOPs each rebuilds: full on the first k layers (`recompute_method=block`), selective MLP + norms,
    full on every layer — on CPU none. The trainer logs the choice."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """With recompute=selective, megatron's recompute_modules: any of core_attn (SDPA: saves little memory, costly
    at long context) | mlp (fc1, SwiGLU, fc2: about two thirds of an LM layer's activations for under half of its
    forward FLOPs at 32K)."""
    recompute_method: str = "uniform"
    """With recompute=full, megatron's method: uniform (every layer, in chunks of recompute_num_layers) | block
    (only the first recompute_num_layers layers of each pipeline stage; the rest keep their activations)."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recompute chunk (uniform) or recomputed layers per stage (block)."""
    vit_recompute: str = "full"
    """ViT activation recompute: full (megatron's per-block recompute over all the micro-batch's images: each block
    keeps its input; the faster one, docs/PERFORMANCE.md) | chunked (the whole ViT rerun in the backward,
    `vit_chunk_patches` patches of whole images at a time: nothing kept between forward and backward, which leaves
    the memory to the LM) | none. With model.recompute=auto and vit_recompute=full, the planner also weighs
    chunked and fewer recomputed blocks (`vit_recompute_blocks`; plan/memory.py `recompute_settings`) and takes
    the cheapest setting that fits."""
    vit_recompute_blocks: int | None = None
    """With vit_recompute=full: how many ViT blocks are recomputed — the first k (megatron's block method); the
    others keep their activations, so their forward is not rerun. null: every block. With model.recompute=auto
    and this left null, the planner picks the fewest that fit."""
    vit_chunk_patches: int = 32768
    """With vit_recompute=chunked: patches of whole images per chunk (an image larger than this is a chunk of its
    own)."""
    fused_kernels: bool = True
    """On CUDA: megatron's fused SwiGLU (LM and ViT MLPs) and a compiled RoPE kernel in megatron's fused-RoPE
    slot (TE is not needed). No effect on CPU."""
    attention_backend: str = "auto"
    """Core attention: auto | sdpa | flex | te (auto: sdpa per packed segment, flex for many short segments)."""
    rope_theta: float | None = None
    """Override the LM's RoPE base (null: keep the checkpoint's, 1e6 for Qwen2.5-VL)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE length extension for the LM, in Hugging Face keys, written into the model's HF config (so exports and
    transformers agree): {rope_type: yarn, factor: 4, original_max_position_embeddings: 32768} (YaRN: low
    frequencies interpolated, high kept, attention scaled by 0.1·ln(factor)+1) or {rope_type: linear, factor: f}
    (positions ÷ f). null: the checkpoint's own (plain M-RoPE for Qwen2.5-VL)."""


@dataclass
class ParallelConfig:
    """Degrees of parallelism; data parallel is world size / (tp·pp·cp)."""

    tp: int = 1
    """Tensor-parallel size (divides LM heads, KV groups, FFN, and the ViT's heads and FFN)."""
    pp: int = 1
    """Pipeline-parallel size (the ViT lives on the first stage)."""
    cp: int = 1
    """Context-parallel size (packed rows are zigzag-split into 2·cp chunks per sample)."""
    first_stage_layers: int | None = None
    """LM layers on pipeline stage 0, which also runs the ViT (null: an even split); needs pp > 1."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for norms/dropout regions; needs tp > 1."""
    ignore_memory_plan: bool = False
    """Start on a GPU even when the memory planner refuses this layout (it will likely run out of memory)."""
    timeout_s: float = 600.0
    """A collective that waits longer than this on another rank (hung, stopped, dead) stops the run with one line
    (gloo raises; NCCL's watchdog aborts the process). Leave room for the slowest checkpoint save."""

    @property
    def pad_multiple(self) -> int:
        """Every packed sample is padded to a multiple of this many tokens (the loader pads, the planner and the
        config checks require data.max_seq_len to be one): 2·cp, so the zigzag CP split deals whole chunks,
        times tp under sequence parallelism; 1 without CP or SP."""
        if self.cp == 1 and not self.sequence_parallel:
            return 1
        return 2 * self.cp * (self.tp if self.sequence_parallel else 1)


@dataclass
class DataConfig:
    """Where samples come from and how they are packed into micro-batches."""

    shards: str = ""
    """Shard directory written by `mmpl data build` (index.json and <bucket>/*.tar): a path or an s3://, gs://,
    http(s):// URL (read by byte range through fsspec)."""
    recipe: str = "balanced"
    """Length mixture: balanced (even over length buckets) | pool_native (as the pool is) | target:N (near N)."""
    min_len: int = 32768
    """Shortest sample length (tokens) drawn."""
    max_len: int = 131072
    """Longest sample length (tokens) drawn."""
    task_weights: dict[str, float] = field(default_factory=lambda: {"extraction": 0.8, "reasoning": 0.2})
    """Relative weight per task family; missing families get weight 0."""
    sources: dict[str, float] = field(default_factory=dict)
    """More shard directories (paths or URLs) mixed in at a token share each, e.g. {data/short-docvqa: 0.1} for
    the paper's "VQA + short data" arm; their samples are drawn as their pools hold them (no length recipe, no task
    weights), and data.shards gets the rest of the tokens."""
    max_seq_len: int = 131072
    """Packed row length (tokens per micro-batch row); samples are packed up to it."""
    micro_batch_size: int = 1
    """Packed rows per micro-batch, per data-parallel rank (1: a micro-batch is one packed row)."""
    global_batch_size: int = 8
    """Packed rows per optimizer step over all data-parallel ranks (= micro · dp · micro-batches per step)."""
    num_workers: int = 2
    """Loader worker processes per rank (0: load in the training process)."""
    seed: int = 1234
    """Seed of the sample mixture/shuffle (independent of model init)."""
    pack_buffer: int = 16
    """Samples held (per loader worker) for first-fit-decreasing packing; more packs tighter, costs memory."""
    pad_to_max_len: bool = False
    """Fill every packed row to max_seq_len with a padding segment (static shapes, e.g. for CUDA graphs)."""
    skip_long: bool = True
    """A sample longer than max_seq_len is skipped and counted (false: stop with an error)."""
    max_consecutive_failures: int = 8
    """Abort after this many undecodable samples in a row (corrupt shards); single failures are skipped."""
    prefetch_factor: int = 2
    """Batches prefetched per loader worker."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options when `shards` is a URL (s3://, gs://, https://), e.g. {anon: true} or {endpoint_url: ...}."""


@dataclass
class OptimConfig:
    """AdamW with warmup and cosine decay to a floor (ProLong/MMProLong defaults)."""

    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 1e-6
    """Floor reached at the end of decay (MMProLong: 10% of lr)."""
    warmup: float = 0.1
    """Warmup length: a fraction of the train steps if < 1, else a step count."""
    decay_style: str = "cosine"
    """cosine | linear | constant."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms and biases."""
    beta1: float = 0.9
    """Adam β1."""
    beta2: float = 0.95
    """Adam β2."""
    eps: float = 1e-8
    """Adam ε."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    max_bad_steps: int = 5
    """A step with a non-finite loss or gradient is skipped (no optimizer update) and counted; this many in a row
    stop the run with one line, without saving."""


@dataclass
class ScheduleConfig:
    """How long to train; give steps or tokens."""

    train_steps: int | None = None
    """Optimizer steps to run (wins over train_tokens when both are given)."""
    train_tokens: int | None = None
    """Token budget; steps = ceil(tokens / (global_batch_size · max_seq_len))."""


@dataclass
class CheckpointConfig:
    """Dist checkpoints (torch_dist): model, optimizer, scheduler, data state, RNG."""

    save: str | None = None
    """Checkpoint directory (null: <run_dir>/checkpoints). A complete checkpoint found here is resumed."""
    interval: int = 1000
    """Save every N steps (and always at the end)."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints (0: keep all)."""
    load: str | None = None
    """Start from here when `save` holds nothing: a converted HF checkpoint (model weights only) or another
    run's checkpoint directory (full resume)."""
    on_corrupt: str = "fallback"
    """A corrupt or incomplete latest checkpoint (checksum manifest or load fails): fallback = one warning line,
    then resume from the newest older checkpoint that verifies; fail = stop with one error line."""
    strict_resume: bool = False
    """Refuse to resume, naming the file, when a checkpoint lacks this run's RNG or data-loader state (the
    resume would not be exact); false: warn and resume."""


@dataclass
class LoggingConfig:
    """Console, TensorBoard and W&B."""

    interval: int = 10
    """Log one line every N steps."""
    tensorboard_dir: str | None = None
    """TensorBoard directory (null: <run_dir>/tensorboard)."""
    wandb_project: str | None = None
    """W&B project; null disables W&B."""
    wandb_name: str | None = None
    """W&B run name (null: the run dir's name)."""
    progress_bar: bool = True
    """Show a tqdm bar when stdout is a terminal."""
    phase_times: bool = False
    """On CUDA: log per-step GPU time of ViT forward, LM forward, LM backward, ViT backward and the optimizer
    (CUDA events from module hooks; one device sync per step)."""
    profile_steps: list[int] | None = None
    """[first, last] step to record with torch.profiler into <run_dir>/profile (trace.json, kernels.txt)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s per device for MFU (null: known GPUs by name, e.g. H100 989; none on CPU)."""


@dataclass
class Config:
    """A whole training run."""

    run_dir: str = "runs/default"
    """Run directory: resolved config, logs, TensorBoard, default checkpoint dir."""
    seed: int = 1234
    """Model init / dropout seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.save or f"{self.run_dir}/checkpoints"

    @property
    def tensorboard_dir(self) -> str:
        return self.logging.tensorboard_dir or f"{self.run_dir}/tensorboard"
