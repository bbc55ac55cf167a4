"""Test prerequisites: a missing extra skips a test on a developer's machine and fails it in CI (CI=true), where
tests/run.sh installs every extra the suite needs, so a broken install step cannot pass as a skip."""

from __future__ import annotations

import importlib
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip (the whole module when called at import time), or fail under CI=true."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: every prerequisite must be installed)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, reason: str):
    """The imported module, else skip (fail in CI) with `reason`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail(reason)
