"""`mmpl convert` on a node whose GPU is visible (as on a cluster's login or compute node): HF → MCore → HF is
bit-exact, and a bf16 conversion too. The distributed conversion tests run with the GPUs hidden; this one does not,
so CUDA's paths (megatron allocating layers on the GPU, the model moved to it) meet the meta-device layout.

Run on the GPU machine:  python -m pytest tests/gpu/test_conversion_gpu.py -m gpu -q   (~30 s, < 1 GB)
"""

import subprocess
import sys

import pytest
import torch

from tests.child_env import child_env
from tests.distributed.test_conversion import _save_tiny, _tensors

pytestmark = pytest.mark.gpu


def _convert(*args):
    r = subprocess.run([sys.executable, "-m", "megatron_mmpl.cli", "convert", *args], capture_output=True,
                       text=True, env=child_env(gpus=True), timeout=300)
    assert r.returncode == 0, (args, r.stderr[-3000:])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_roundtrip_with_the_gpu_visible_is_bit_exact(tmp_path, dtype):
    hf, mc, back = (str(tmp_path / k) for k in ("hf", "mc", "back"))
    _save_tiny(hf, "tiny", seed=0)
    _convert("hf-to-mcore", "--hf", hf, "--out", mc, "--dtype", dtype)
    _convert("mcore-to-hf", "--ckpt", mc, "--out", back, "--tokenizer", "none", "--dtype", dtype)
    want = {k: v.to(torch.bfloat16 if dtype == "bf16" else torch.float32) for k, v in _tensors(hf).items()}
    got = _tensors(back)
    assert set(got) == set(want), set(got) ^ set(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
