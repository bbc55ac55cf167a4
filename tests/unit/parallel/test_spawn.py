"""The spawn harness puts ranks where they can run: one GPU each when there are enough, else CPU/gloo ranks that
see no CUDA device (so a 1-GPU machine runs every 2-rank test), and refuses a CUDA run without enough GPUs."""

import os

import pytest
import torch

from megatron_mmpl.parallel.ports import free_ports
from megatron_mmpl.parallel.spawn import rank_device, run_distributed

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("gpus, world, want", [(0, 2, "cpu"), (1, 2, "cpu"), (2, 2, "cuda"), (8, 4, "cuda")])
def test_auto_picks_cuda_only_with_a_gpu_per_rank(monkeypatch, gpus, world, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert rank_device(world) == want
    assert rank_device(world, "cpu") == "cpu"


def test_cuda_with_too_few_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="2 ranks need 2 GPUs, this machine has 1"):
        rank_device(2, "cuda")
    with pytest.raises(ValueError, match="device='gpu'"):
        rank_device(1, "gpu")


def _where_am_i():
    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()


def test_cpu_ranks_see_no_cuda_device():
    assert run_distributed(_where_am_i, 1, device="cpu") == [("", False)]


def test_free_ports_are_distinct():
    ports = free_ports(4)
    assert len(set(ports)) == 4 and all(1024 <= p < 65536 for p in ports)
