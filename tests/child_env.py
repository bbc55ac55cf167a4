"""The environment of a test's child process (`mmpl train`, `mmpl data …` in a subprocess).

- This checkout first on PYTHONPATH, ahead of what the parent's PYTHONPATH already holds: a machine whose
  dependencies sit in a PYTHONPATH folder rather than a venv (the GPU device's image) must keep them; replacing
  PYTHONPATH made every child exit 1 at `import megatron` there.
- No GPUs visible unless `gpus=True`: these children are CPU fp32 checks (the quickstart recipe, gloo ranks), so
  a GPU machine runs them as CI does, and two ranks on a one-GPU machine do not ask for a second device.
"""

from __future__ import annotations

import os
import re


def child_env(gpus: bool = False, **extra: str) -> dict[str, str]:
    paths = [os.getcwd(), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths)}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return {**env, **extra}


# torch's own log records (glog format, e.g. "W1205 14:48:34.136000 3101 torch/utils/cpp_extension.py:140] No CUDA
# runtime is found, ..."), which a child with no visible GPU prints on a GPU host at import time
_TORCH_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def stderr_lines(text: str) -> list[str]:
    """A child's non-empty stderr lines, less torch's own log records: what the project itself printed."""
    return [ln for ln in text.splitlines() if ln.strip() and not _TORCH_LOG.match(ln)]
