"""The environment of a test's child process (`mmpl train`, `mmpl data …` in a subprocess).

- This checkout first on PYTHONPATH, ahead of what the parent's PYTHONPATH already holds: a machine whose
  dependencies sit in a PYTHONPATH folder rather than a venv (the GPU device's image) must keep them; replacing
  PYTHONPATH made every child exit 1 at `import megatron` there.
- No GPUs visible unless `gpus=True`: these children are CPU fp32 checks (the quickstart recipe, gloo ranks), so
  a GPU machine runs them as CI does, and two ranks on a one-GPU machine do not ask for a second device.
"""

from __future__ import annotations

import os


def child_env(gpus: bool = False, **extra: str) -> dict[str, str]:
    paths = [os.getcwd(), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths)}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return {**env, **extra}
