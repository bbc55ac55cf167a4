"""Shared pytest setup: gpu tests skip without CUDA; everything else runs on CPU (spawned ranks on gloo, the test
process with CUDA reported absent) unless a test asks for CUDA (they are CPU fp32 checks, so a GPU machine runs
them as CI does); quiet megatron's optional-dependency warnings."""

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
os.environ.setdefault("MMPL_RANK_DEVICE", "cpu")

# Under pytest-xdist (`-n N`) each worker takes its share of the cores, and so do the ranks and subprocesses it
# starts (parallel/spawn.py splits the worker's torch threads between its ranks). Without this, N workers at one
# thread per core each, plus their ranks, oversubscribe the cores: `-n 14` on the 16-core GPU host reached 5 % of
# the suite in 190 s (2026-12-03), likely for that reason.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _share = max(1, (os.cpu_count() or 1) // _workers)
    torch.set_num_threads(_share)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """Outside `gpu` tests the test process itself sees no CUDA either (its spawned ranks and children already
    don't): the trainer, builder and planner called in-process take the CPU fp32 path these tests check, as in
    CI, instead of building on the GPU host's device."""
    if "gpu" not in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def pytest_runtest_logreport(report):
    """With MMPL_TEST_FAILLOG=FILE, each failure's node id and traceback tail are appended to FILE as it happens
    (by the controller under xdist), so a run stopped at a time limit still says what failed and why."""
    path = os.environ.get("MMPL_TEST_FAILLOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as f:
        f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
