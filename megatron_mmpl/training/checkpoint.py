"""Dist checkpoints (torch_dist): save, resume, or load model weights only (layout: storage/checkpoint_dir.py).

The model and optimizer go in megatron's fully_reshardable format (reshardable over TP/PP/DP on load).

A checkpoint is written into `iter_N.partial/`, renamed to `iter_N/` once every rank has finished, and only
then named by the tracker; a crash mid-save leaves at most a `.partial` dir, which is never loaded. Its checksum
manifest (storage/integrity.py) is written before the rename; `resume` loads the newest checkpoint that verifies
and loads (checkpoint.on_corrupt) and warns, or refuses (checkpoint.strict_resume), when RNG or loader state is absent.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

from megatron_mmpl.compat.checkpoint_writer import install_results_queue
from megatron_mmpl.compat.optimizer import allocate_adam_state, skip_adam_step_on_param_state_load, unshare_adam_steps
from megatron_mmpl.errors import UserError, find_os_error, os_error_line
from megatron_mmpl.parallel.process_groups import RankPosition
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
from megatron_mmpl.storage.integrity import (
    CheckpointCorrupt,
    files_problem,
    first_reason,
    hash_shared,
    verify_checkpoint,
    write_manifest,
)
from megatron_mmpl.training.signals import helper_process_init

log = logging.getLogger(__name__)
# Files of every torch_dist checkpoint, checked by name before a checkpoint without manifest is loaded.
DIST_FILES = ("metadata.json", ".metadata", "common.pt")

# Megatron's DistributedOptimizer format that reshards across TP/PP (and DP) on load.
OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointSaveFailed(UserError):
    """A checkpoint could not be written (its `.partial` is gone, the previous checkpoint stays)."""


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
    bad = files_problem(load_path, [os.path.join(HF_DIR, f) for f in copied]) if copied else None
    if bad:  # damaged files must not travel into new checkpoints; resume reports this checkpoint and falls back
        copied = []
    for f in copied:
        shutil.copy2(os.path.join(source, f), os.path.join(out, f))
    if not copied and tokenizer_name:

        from megatron_mmpl.data.processor_files import write_processor_files

        write_processor_files(Path(out), hf, tokenizer_name)


def start_writer_helper() -> None:
    """Start megatron's checkpoint-writer helper process with the trainer's signal policy (idempotent)."""
    install_results_queue(helper_process_init)


def save_checkpoint(root: str, model, optimizer, scheduler, state: TrainState, config_yaml: str,
                    data_state: dict | None, pos: RankPosition, keep_last: int = 0,
                    hf_side_dir: str | None = None) -> str:
    """Save a complete checkpoint of step `state.step` (collective: every rank calls it; `pos` is this rank's
    place, parallel/process_groups.rank_position). A failed write (disk full, read-only) removes the `.partial`,
    keeps the previous checkpoint and raises CheckpointSaveFailed."""
    start_writer_helper()
    final = iter_dir(root, state.step)
    partial = final + ".partial"
    try:
        _write_checkpoint(root, final, partial, model, optimizer, scheduler, state, config_yaml, data_state,
                          pos, keep_last, hf_side_dir)
    except (Exception, CheckpointException) as e:  # any failed write (torch DCP's error is a BaseException)
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        prev = latest_step(root)
        os_error = find_os_error(e)
        raise CheckpointSaveFailed(
            f"saving step {state.step} failed: {os_error_line(os_error) if os_error else _one_line(e)}"
            f"{_full_disk(root)}; removed {partial}, the newest complete checkpoint stays: "
            f"{iter_dir(root, prev) if prev is not None else 'none yet'}") from e
    return final


def _full_disk(root: str) -> str:
    """'; the filesystem is full' when it (nearly) is: the likely cause of a failed write."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    return f" (the filesystem of {root} is full: {free / 2**20:.1f} MiB free)" if free < 32 * 2**20 else ""


def _write_checkpoint(root, final, partial, model, optimizer, scheduler, state, config_yaml, data_state,
                      pos, keep_last, hf_side_dir) -> None:
    from megatron.core import dist_checkpointing

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
    torch.save(rng_state(), os.path.join(partial, STATE_DIR, f"rng_{pos.tag}_r{_rank()}.pt"))
    if data_state is not None and pos.first_of_replica:
        torch.save(data_state, os.path.join(partial, STATE_DIR, f"data_dp{pos.dp_rank}.pt"))
    _barrier()
    digests = hash_shared(partial)  # collective: each rank hashes its share of the files, rank 0 gets all
    if _rank() == 0:
        with open(os.path.join(partial, STATE_DIR, "config.yaml"), "w") as f:
            f.write(config_yaml)
        if hf_side_dir and os.path.isdir(hf_side_dir):
            shutil.copytree(hf_side_dir, os.path.join(partial, HF_DIR))
        write_manifest(partial, digests)  # hashes the config and HF files written just now
        replace_directory(partial, final)
        atomic_write(os.path.join(root, TRACKER), str(state.step))
        if keep_last > 0:
            for old in complete_steps(root)[:-keep_last]:
                shutil.rmtree(iter_dir(root, old), ignore_errors=True)
    _barrier()


def resume(root: str, model, optimizer, scheduler, pos: RankPosition, on_corrupt: str = "fallback",
           strict: bool = False) -> tuple[TrainState, dict | None]:
    """Restore model, optimizer, scheduler, counters and RNG from the newest checkpoint in `root` that verifies
    and loads on every rank (older ones are tried after one warning line each; on_corrupt="fail" raises instead).
    Returns the train state and this data-parallel rank's data-loader state (None if none was saved)."""
    latest = latest_step(root)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint in {root!r}")
    allocate_adam_state(optimizer)
    candidates = [latest, *sorted((s for s in complete_steps(root) if s < latest), reverse=True)]
    for i, step in enumerate(candidates):
        path = iter_dir(root, step)
        try:
            loaded = _read_checkpoint(path, model, optimizer, pos)
        except CheckpointCorrupt as e:
            if on_corrupt == "fail":
                raise CheckpointCorrupt(f"{e}; set checkpoint.on_corrupt=fallback to resume from an older "
                                        f"checkpoint, or delete {path}") from None
            older = f"trying {iter_dir(root, candidates[i + 1])}" if i + 1 < len(candidates) else "no older one"
            if _rank() == 0:
                log.warning("%s; skipping it, %s", e, older)
            continue
        return _apply(loaded, path, model, optimizer, scheduler, pos, strict)
    raise CheckpointCorrupt(f"no usable checkpoint in {root} (all {len(candidates)} are corrupt, see the warnings "
                            "above); restore one, or move them away to start from checkpoint.load")


def _read_checkpoint(path: str, model, optimizer, pos: RankPosition) -> dict:
    """Verify and read everything this rank needs from checkpoint `path` (nothing is applied yet); any rank's
    failure raises CheckpointCorrupt on all ranks. (A checkpoint without manifest that fails inside megatron's
    collective load on some ranks only can still hang the others: manifests catch such damage before loading.)"""
    from megatron.core import dist_checkpointing

    verify_checkpoint(path)
    reason, out = None, {}
    module = model.module if hasattr(model, "module") else model
    model_sd = module.sharded_state_dict()
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_SHARDING),
    }
    absent = [f for f in DIST_FILES if not os.path.isfile(os.path.join(path, f))]  # megatron's errors name none
    if absent:
        reason = f"corrupt checkpoint: {os.path.join(path, absent[0])} is missing"
    else:
        try:
            out["dist"] = dist_checkpointing.load(sharded, path)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure to read it makes it unusable
            reason = f"corrupt checkpoint: {path} does not load ({_one_line(e)})"
    state_dir = os.path.join(path, STATE_DIR)
    files = {"rng": os.path.join(state_dir, f"rng_{pos.tag}_r{_rank()}.pt"),
             "data": os.path.join(state_dir, f"data_dp{pos.dp_rank}.pt")}
    for key, file in files.items():
        if reason is None and os.path.isfile(file):
            try:
                out[key] = torch.load(file, weights_only=False)
            except Exception as e:  # noqa: BLE001 - as above
                reason = f"corrupt checkpoint: {file} does not load ({_one_line(e)})"
        out[key + "_file"] = file
    reason = first_reason(reason)
    if reason:
        raise CheckpointCorrupt(reason)
    return out


def _one_line(e: BaseException) -> str:
    """`Type: first line` of an error; for torch DCP's CheckpointException, of the first rank's own error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _apply(loaded: dict, path: str, model, optimizer, scheduler, pos: RankPosition,
           strict: bool) -> tuple[TrainState, dict | None]:
    """Put what `_read_checkpoint` read into the model, optimizer, scheduler and RNG; check the loader state."""
    module = model.module if hasattr(model, "module") else model
    state_dir = os.path.join(path, STATE_DIR)
    saved_dp = len([f for f in os.listdir(state_dir) if f.startswith("data_dp")])
    if saved_dp and saved_dp != pos.dp:
        raise ValueError(
            f"checkpoint {path} was saved with data-parallel size {saved_dp}, this run has "
            f"{pos.dp}; the data-loader state is per data-parallel rank, so resume "
            f"with world size = {saved_dp}·tp·pp·cp"
        )
    absent = [loaded[f"{k}_file"] for k in ("rng", "data") if k not in loaded]
    missing = first_reason(f"{', '.join(absent)} absent" if absent else None)
    if missing and strict:
        raise CheckpointCorrupt(f"checkpoint.strict_resume=true refuses {path}: {missing}, so the resume would not "
                                "be exact; set checkpoint.strict_resume=false to resume anyway")
    if missing and _rank() == 0:
        log.warning("resume from %s is not exact: %s (RNG state is per layout %s; loader state per data-parallel "
                    "rank)", path, missing, pos.tag)
    loaded_dist = loaded["dist"]
    module.load_state_dict(loaded_dist["model"], strict=True)
    skip_adam_step_on_param_state_load(optimizer)
    optimizer.load_state_dict(loaded_dist["optimizer"])
    unshare_adam_steps(optimizer)
    scheduler.load_state_dict(loaded_dist["scheduler"])
    ts = dict(loaded_dist["train_state"])
    state = TrainState(step=ts.pop("step"), consumed_samples=ts.pop("consumed_samples"),
                       consumed_tokens=ts.pop("consumed_tokens"), extra=ts)
    if "rng" in loaded:
        set_rng_state(loaded["rng"])
    return state, loaded.get("data")
