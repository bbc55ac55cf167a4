"""Every patch or override of megatron-core behaviour, in one place, written against one pinned release.

Importing this package checks the installed megatron-core against MEGATRON_CORE_VERSION and fails loudly on
another version: these modules replace or reach into megatron internals that change between releases. Each
override names the megatron call it serves.

Modules, and the megatron-core 0.16.1 calls they serve:
- cpu_runtime.py: the CUDA entry points megatron calls on a CPU-only process (torch.cuda.current_device,
  synchronize, the RNG tracker, device="cuda" factories in schedules, p2p and DDP buffers); applied at
  process-group init, undone when the groups are destroyed.
- optimizer.py: DistributedOptimizer.sharded_state_dict(is_loading=True) and load_state_dict with torch's Adam.
- specs.py: get_gpt_layer_local_spec with our CoreAttention, and a torch RMSNorm that finalize_model_grads
  reduces under sequence parallelism.
- rope.py: MultimodalRotaryEmbedding's inv_freq for linear/YaRN scaling, YaRN's factor through softmax_scale,
  no CP re-slicing of per-token positions.
- schedules.py: the TransformerConfig fields the pipeline schedules need for packed rows of varying length.
- checkpoint_writer.py: dist_checkpointing's writer results queue (filesystem_async._get_write_results_queue)
  from a Manager started with the trainer's helper-process initializer (signals, death with the trainer).
- parallel_state.py: the group globals destroy_model_parallel does not reset (their store and gloo sockets would
  outlive destroy_parallel).
- cuda_rope.py: a compiled RoPE kernel in rope_utils' fused-RoPE slot (`fused_apply_rotary_pos_emb`, TE's when
  installed) for config.apply_rope_fusion on CUDA.
- swiglu.py: Triton forward and backward kernels in mlp's fused (bias-)SwiGLU slot (`bias_swiglu_impl`) for
  config.bias_activation_fusion on CUDA (MMPL_SWIGLU=compiled keeps megatron's compiled ones).

Subclasses that override megatron methods live with the model they shape (the hot path): LanguageModel._postprocess
(GPTModel._postprocess, models/qwen25vl/language_model.py), VisionTransformerLayer.forward (TransformerLayer,
models/qwen25vl/specs.py) and CoreAttention (DotProductAttention's interface, attention/core_attention.py); the
model imports this package, so they too are guarded by the version check.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MEGATRON_CORE_VERSION = "0.16.1"


def check_megatron_version(installed: str | None = None) -> None:
    """Raise unless megatron-core MEGATRON_CORE_VERSION is installed (`installed` overrides the lookup)."""
    if installed is None:
        try:
            installed = version("megatron-core")
        except PackageNotFoundError:
            installed = "not installed"
    if installed != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"megatron-core {installed} is installed, but megatron_mmpl/compat overrides megatron-core "
            f"{MEGATRON_CORE_VERSION} internals; pip install megatron-core=={MEGATRON_CORE_VERSION} (or port "
            "every module of megatron_mmpl/compat to the new release and raise MEGATRON_CORE_VERSION)"
        )


check_megatron_version()
