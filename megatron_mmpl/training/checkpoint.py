"""Dist checkpoints (torch_dist): save, resume, or load model weights only (layout: storage/checkpoint_dir.py).

The model and optimizer go in megatron's fully_reshardable format (reshardable over TP/PP/DP on load).

A checkpoint is written into `iter_N.partial/`, renamed to `iter_N/` once every rank has finished, and only
then named by the tracker; a crash mid-save leaves at most a `.partial` dir, which is never loaded.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_mmpl.compat.optimizer import allocate_adam_state, skip_adam_step_on_param_state_load, unshare_adam_steps
from megatron_mmpl.errors import reading
from megatron_mmpl.storage.atomic import atomic_write, replace_directory
from megatron_mmpl.storage.checkpoint_dir import (  # noqa: F401 - the trainer reads the layout through this module
    HF_DIR,
    SIDE_FILES,
    STATE_DIR,
    TRACKER,
    classify_load_path,
    complete_steps,
    iter_dir,
    latest_step,
    resolve_checkpoint,
)

# Megatron's DistributedOptimizer format that reshards across TP/PP (and DP) on load.
OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    """Progress counters saved with every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    extra: dict = field(default_factory=dict)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout_tag() -> str:
    from megatron.core import parallel_state as ps

    return (f"tp{ps.get_tensor_model_parallel_world_size()}pp{ps.get_pipeline_model_parallel_world_size()}"
            f"cp{ps.get_context_parallel_world_size()}dp{ps.get_data_parallel_world_size()}")


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def write_hf_side_files(out: str, hf, load_path: str | None, tokenizer_name: str | None) -> None:
    """The model's HF config and its tokenizer/processor files, once per run (copied into every checkpoint):
    from the converted checkpoint the run started from when it has them, else generated for the data's tokenizer."""
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)
    source = os.path.join(load_path, HF_DIR) if load_path else None
    copied = [f for f in SIDE_FILES if source and os.path.isfile(os.path.join(source, f))]
    for f in copied:
        shutil.copy2(os.path.join(source, f), os.path.join(out, f))
    if not copied and tokenizer_name:

        from megatron_mmpl.data.processor_files import write_processor_files

        write_processor_files(Path(out), hf, tokenizer_name)


def save_checkpoint(root: str, model, optimizer, scheduler, state: TrainState, config_yaml: str,
                    data_state: dict | None, keep_last: int = 0, hf_side_dir: str | None = None) -> str:
    """Save a complete checkpoint of step `state.step` (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    final = iter_dir(root, state.step)
    partial = final + ".partial"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    model_sd = model.module.sharded_state_dict() if hasattr(model, "module") else model.sharded_state_dict()
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIM_SHARDING),
        "scheduler": scheduler.state_dict(),
        "train_state": {"step": state.step, "consumed_samples": state.consumed_samples,
                        "consumed_tokens": state.consumed_tokens, **state.extra},
    }
    dist_checkpointing.save(sharded, partial)
    if _rank() == 0:
        os.makedirs(os.path.join(partial, STATE_DIR), exist_ok=True)
    _barrier()
    # Per-rank pieces that dist_checkpointing's common dict cannot hold (it keeps rank 0's copy only).
    tag = _layout_tag()
    torch.save(rng_state(), os.path.join(partial, STATE_DIR, f"rng_{tag}_r{_rank()}.pt"))
    first_of_replica = (ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
                        and ps.get_context_parallel_rank() == 0)
    if data_state is not None and first_of_replica:
        torch.save(data_state, os.path.join(partial, STATE_DIR, f"data_dp{ps.get_data_parallel_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        with open(os.path.join(partial, STATE_DIR, "config.yaml"), "w") as f:
            f.write(config_yaml)
        if hf_side_dir and os.path.isdir(hf_side_dir):
            shutil.copytree(hf_side_dir, os.path.join(partial, HF_DIR))
        replace_directory(partial, final)
        atomic_write(os.path.join(root, TRACKER), str(state.step))
        if keep_last > 0:
            for old in complete_steps(root)[:-keep_last]:
                shutil.rmtree(iter_dir(root, old), ignore_errors=True)
    _barrier()
    return final


def resume(root: str, model, optimizer, scheduler) -> tuple[TrainState, dict | None]:
    """Restore model, optimizer, scheduler, counters and RNG from the latest complete checkpoint in `root`.

    Returns the train state and this data-parallel rank's data-loader state (None if none was saved).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    step = latest_step(root)
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {root!r}")
    path = iter_dir(root, step)
    module = model.module if hasattr(model, "module") else model
    model_sd = module.sharded_state_dict()
    allocate_adam_state(optimizer)
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_SHARDING),
    }
    with reading(path):  # megatron's errors do not always name the checkpoint
        loaded = dist_checkpointing.load(sharded, path)
    module.load_state_dict(loaded["model"], strict=True)
    skip_adam_step_on_param_state_load(optimizer)
    optimizer.load_state_dict(loaded["optimizer"])
    unshare_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    ts = dict(loaded["train_state"])
    state = TrainState(step=ts.pop("step"), consumed_samples=ts.pop("consumed_samples"),
                       consumed_tokens=ts.pop("consumed_tokens"), extra=ts)
    rng_file = os.path.join(path, STATE_DIR, f"rng_{_layout_tag()}_r{_rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    data_file = os.path.join(path, STATE_DIR, f"data_dp{ps.get_data_parallel_rank()}.pt")
    saved_dp = len([f for f in os.listdir(os.path.join(path, STATE_DIR)) if f.startswith("data_dp")])
    if saved_dp and saved_dp != ps.get_data_parallel_world_size():
        raise ValueError(
            f"checkpoint {path} was saved with data-parallel size {saved_dp}, this run has "
            f"{ps.get_data_parallel_world_size()}; the data-loader state is per data-parallel rank, so resume "
            f"with world size = {saved_dp}·tp·pp·cp"
        )
    data_state = torch.load(data_file, weights_only=False) if os.path.isfile(data_file) else None
    return state, data_state
