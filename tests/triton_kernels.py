"""Where the project's Triton kernels are tested: on CUDA when present, else in Triton's interpreter (CPU). Triton is
in the dev extra, so CI runs them; without it a developer's machine skips them and CI (CI=true) fails."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from tests.requires import skip_or_fail


def require_triton() -> None:
    if importlib.util.find_spec("triton") is None:
        skip_or_fail("needs Triton (the dev extra installs it; it ships with CUDA torch)")


@contextlib.contextmanager
def triton_device(monkeypatch: pytest.MonkeyPatch, module):
    """The device to run `module`'s lazily defined kernel (its `_KERNEL` global) on: "cuda", or "cpu" with
    TRITON_INTERPRET=1 and the kernel defined again under the interpreter, and dropped afterwards so a later CUDA
    call does not get the interpreted one."""
    require_triton()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(module, "_KERNEL", None)
    try:
        yield dev
    finally:
        if dev == "cpu":
            module._KERNEL = None
