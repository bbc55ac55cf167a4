"""The on-disk layout of our checkpoints, shared by training (writes and resumes) and conversion (reads, writes).

A run's `checkpoint.save` directory:
    iter_0000100/               one complete checkpoint (megatron dist_checkpointing dir: metadata.json, ...)
        mmpl/config.yaml        the resolved run config
        mmpl/hf/                the model's HF config.json + tokenizer/processor files (export needs nothing else)
        mmpl/data_dp{r}.pt, mmpl/rng_{layout}_r{n}.pt   data-loader and RNG state
    latest_checkpointed_iteration.txt   tracker: the newest complete step, written last and atomically
A converted checkpoint (`mmpl convert hf-to-mcore`) is one such dist checkpoint dir on its own, with mmpl/hf/.
"""

from __future__ import annotations

import os
import re
import shutil

from megatron_mmpl.errors import UserError


class NoSpaceForCheckpoint(UserError):
    """The checkpoint directory's filesystem cannot hold the next checkpoint."""


TRACKER = "latest_checkpointed_iteration.txt"
STATE_DIR = "mmpl"
HF_DIR = "mmpl/hf"
# Files copied next to the converted weights so `AutoProcessor.from_pretrained` works on the output.
SIDE_FILES = (
    "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja",
)


def iter_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_step(root: str) -> int | None:
    """The step named by the tracker in `root`, if that checkpoint is complete; else the newest complete dir."""
    tracker = os.path.join(root, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if text.isdigit() and os.path.isfile(os.path.join(iter_dir(root, int(text)), "metadata.json")):
            return int(text)
    steps = complete_steps(root)
    return steps[-1] if steps else None


def complete_steps(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = re.fullmatch(r"iter_(\d{7})", name)
        if m and os.path.isfile(os.path.join(root, name, "metadata.json")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def classify_load_path(path: str) -> str:
    """'resume' for a run's checkpoint dir (tracker or iter_* inside), 'model' for a single dist checkpoint."""
    if latest_step(path) is not None:
        return "resume"
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return "model"
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint.load={path!r} does not exist")
    raise FileNotFoundError(
        f"checkpoint.load={path!r} holds no complete checkpoint (no {TRACKER}, no iter_*/metadata.json, "
        "no metadata.json); point it at `mmpl convert hf-to-mcore` output or a run's checkpoint dir"
    )


def resolve_checkpoint(path: str) -> str:
    """One dist checkpoint dir: `path` itself, or the latest complete `iter_*` of a training run dir."""
    if classify_load_path(path) == "resume":
        return iter_dir(path, latest_step(path))
    return path


def clean_stale(root: str) -> list[str]:
    """Remove what an interrupted save left in `root` (`iter_*.partial`, `.iter_*.old-PID`); never a complete
    checkpoint. Run once at start-up, under the run lock. Returns the removed names."""
    if not os.path.isdir(root):
        return []
    stale = [n for n in os.listdir(root) if re.fullmatch(r"iter_\d{7}\.partial|\.iter_\d{7}\.old-\d+", n)]
    for name in stale:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return sorted(stale)


def check_free_space(root: str, need_bytes: float) -> None:
    """Refuse, before any compute, a checkpoint directory that cannot hold one more checkpoint (or is not
    writable: the OSError names it)."""
    os.makedirs(root, exist_ok=True)
    probe = os.path.join(root, f".write-test-{os.getpid()}")
    with open(probe, "wb"):
        pass
    os.remove(probe)
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        raise NoSpaceForCheckpoint(
            f"checkpoint.save={root!r} has {_size(free)} free, one checkpoint of this model takes ~{_size(need_bytes)} "
            "(weights, fp32 master copy and Adam moments); free space there or point checkpoint.save at a larger "
            "filesystem")


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
