"""The megatron overrides are tied to the pinned megatron-core: another version fails loudly with the fix; the CPU
runtime is installed only while process groups exist (and only without CUDA) and is fully undone at destroy."""

import pytest
import torch

from megatron_mmpl.compat import MEGATRON_CORE_VERSION, check_megatron_version
from megatron_mmpl.parallel.spawn import run_distributed

pytestmark = pytest.mark.unit


def test_other_megatron_versions_are_refused():
    check_megatron_version()  # the installed one is the pinned one
    check_megatron_version(MEGATRON_CORE_VERSION)
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.17\.0 is installed.*pip install megatron-core==0\.16\.1"):
        check_megatron_version("0.17.0")


def _runtime_lifecycle():
    import torch

    from megatron_mmpl.compat.cpu_runtime import cpu_runtime_active
    from megatron_mmpl.parallel.process_groups import destroy_parallel, initialize_parallel

    original = torch.cuda.current_device
    before = cpu_runtime_active()
    initialize_parallel()
    during = (cpu_runtime_active(), torch.cuda.current_device(), torch.zeros(1, device="cuda").device.type)
    destroy_parallel()
    after = cpu_runtime_active(), torch.cuda.current_device is original
    try:
        torch.zeros(1, device="cuda")
        cuda_factory_after = "cpu"
    except (RuntimeError, AssertionError):  # torch without CUDA refuses a CUDA tensor again
        cuda_factory_after = "refused"
    initialize_parallel()  # and can be set up again
    again = cpu_runtime_active()
    return before, during, after, cuda_factory_after, again


def test_cpu_runtime_lives_as_long_as_the_process_groups():
    (result,) = run_distributed(_runtime_lifecycle, 1, device="cpu")
    assert result == (False, (True, "cpu", "cpu"), (False, True), "refused", True)


def _tcp_sockets_around_the_groups():
    import psutil

    from megatron_mmpl.parallel.process_groups import destroy_parallel, initialize_parallel

    def tcp():
        return sorted((c.laddr.port, c.status) for c in psutil.Process().net_connections(kind="tcp"))

    before = tcp()
    initialize_parallel()
    during = tcp()
    destroy_parallel()
    return before, during, tcp()


def test_destroy_parallel_closes_every_socket_the_groups_opened():
    """megatron-core 0.16.1 keeps two groups after destroy_model_parallel (compat/parallel_state.py); with them
    the TCP store and gloo listeners outlived destroy_parallel in the process."""
    (result,) = run_distributed(_tcp_sockets_around_the_groups, 1, device="cpu")
    before, during, after = result
    assert len(during) > len(before)  # the store and the groups' listeners
    assert after == before


def test_compiled_rope_formula_is_megatrons():
    """The RoPE formula compat/cuda_rope.py compiles on CUDA (attention/qkv_rope.py's `rope_bshd`, also inside the
    fused QKV kernel) equals megatron's unfused bshd RoPE (eager, CPU fp32)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_mmpl.attention.qkv_rope import rope_bshd as _rope

    g = torch.Generator().manual_seed(0)
    t, freqs = torch.randn(7, 1, 3, 16, generator=g), torch.randn(7, 1, 1, 16, generator=g)
    assert torch.equal(_rope(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs))
    part = torch.randn(7, 1, 1, 8, generator=g)  # rotary dim below the head dim: the rest passes through
    assert torch.equal(_rope(t, part), _apply_rotary_pos_emb_bshd(t, part))
