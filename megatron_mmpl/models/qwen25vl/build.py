"""Build a Qwen25VLModel for this rank's TP/PP/CP position, and move full (TP=1, PP=1) weights in and out."""

from __future__ import annotations

import re
from functools import partial

import torch

from megatron_mmpl.errors import reading
from megatron_mmpl.models.qwen25vl.configs import megatron_configs
from megatron_mmpl.models.qwen25vl.model import Qwen25VLModel
from megatron_mmpl.parallel.process_groups import Layout
from megatron_mmpl.parallel.tensor_shards import gather_full_state_dict, load_full_state_dict

_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")
_TIED_OUT = "language_model.output_layer.weight"
_EMBED = "language_model.embedding.word_embeddings.weight"


def build_model(
    hf_config,
    layout: Layout,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    *,
    first_stage_layers: int | None = None,
    sequence_parallel: bool = False,
    dtype: torch.dtype = torch.float32,
    attention_backend: str | None = None,
    overrides: dict | None = None,
    language_overrides: dict | None = None,
    vision_overrides: dict | None = None,
    fused_kernels: bool = True,
    vp_stage: int | None = None,
) -> Qwen25VLModel:
    """The model part this rank holds under `layout` (what `initialize_parallel` returned: the process groups
    megatron's layers communicate over must be that layout's; checked).

    `hf_config`: the model's spec, or what `ModelSpec.of` takes. pre_process/post_process default to "first/last
    pipeline stage". `first_stage_layers`: LM layers on stage 0 (it also runs the ViT). Other arguments: see
    `configs.megatron_configs`.
    """
    from megatron.core import parallel_state as ps  # lazy: megatron's import costs seconds

    groups = Layout(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                    ps.get_context_parallel_world_size())
    if groups != layout:
        raise ValueError(f"build_model(layout={layout}) but the process groups are {groups}; pass the layout "
                         "that initialize_parallel returned")
    cfgs = megatron_configs(
        hf_config, tp=layout.tp, pp=layout.pp, cp=layout.cp, sequence_parallel=sequence_parallel,
        first_stage_layers=first_stage_layers, dtype=dtype, overrides=overrides,
        language_overrides=language_overrides, vision_overrides=vision_overrides,
        fused_kernels=fused_kernels,
    )
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    cp_group = ps.get_context_parallel_group() if layout.cp > 1 else None
    model = Qwen25VLModel(cfgs, pre_process, post_process, attention_backend=attention_backend, vp_stage=vp_stage,
                          cp_group=cp_group)
    # megatron layers are born on the GPU; the conv and norms are torch modules. Not under a `meta` device context
    # (conversion's layout, conversion/dist_layout.py): a meta tensor cannot be copied to the GPU.
    if torch.cuda.is_available() and torch.get_default_device().type != "meta":
        model.cuda(torch.cuda.current_device())
    return model


def full_name(model: Qwen25VLModel, local_name: str) -> str:
    """The full-model (TP=1, PP=1) name of a local parameter: LM layers renumbered globally; on a later
    pipeline stage of a tied model the output layer is the embedding."""
    m = _LAYER.match(local_name)
    if m:
        layer = model.language_model.decoder.layers[int(m.group(1))]
        return f"language_model.decoder.layers.{layer.layer_number - 1}." + local_name[m.end():]
    if local_name == _TIED_OUT and model.cfgs.spec.tied:
        return _EMBED
    return local_name


def load_full_weights(model: Qwen25VLModel, full: dict[str, torch.Tensor]) -> None:
    """Copy a full (TP=1, PP=1) MCore state dict into this rank's part, in place."""

    load_full_state_dict(model, full, rename=partial(full_name, model))


def gather_full_weights(model: Qwen25VLModel, grads: bool = False) -> dict[str, torch.Tensor]:
    """This stage's parameters (or gradients) as full TP=1 tensors under full-model names (every TP rank)."""

    return gather_full_state_dict(model, grads=grads, rename=partial(full_name, model))


def load_model_weights(path: str, model) -> None:
    """Load only the model from a dist checkpoint (e.g. a converted HF checkpoint), at any TP/PP."""
    from megatron.core import dist_checkpointing  # lazy: only checkpoint loading needs it

    module = model.module if hasattr(model, "module") else model
    model_sd = module.sharded_state_dict()
    with reading(path):  # megatron's errors do not always name the checkpoint
        loaded = dist_checkpointing.load({"model": model_sd}, path, strict="raise_unexpected")
    module.load_state_dict(loaded["model"], strict=True)
