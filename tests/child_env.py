"""The environment of a test's child process (`mmpl train`, `mmpl data …` in a subprocess): this checkout first on
PYTHONPATH, ahead of what the parent's PYTHONPATH already holds (a machine whose dependencies sit in a PYTHONPATH
folder rather than a venv, like the GPU device's image, must keep them: replacing PYTHONPATH made every child exit
1 at `import megatron` there)."""

from __future__ import annotations

import os


def child_env(**extra: str) -> dict[str, str]:
    paths = [os.getcwd(), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths),
            **extra}
