"""Shared pytest setup: gpu tests skip without CUDA; quiet megatron's optional-dependency warnings."""

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
