"""Shared pytest setup: gpu tests skip without CUDA; spawned ranks run on CPU/gloo unless a test asks for CUDA
(the distributed tests are CPU fp32 checks, so a GPU machine runs them as CI does); quiet megatron's
optional-dependency warnings."""

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
os.environ.setdefault("MMPL_RANK_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
