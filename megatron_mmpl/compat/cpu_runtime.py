"""Make megatron-core 0.16.1 run on CPU with gloo when CUDA is absent.

Megatron assumes CUDA in a few places. Each patch below names the megatron call it serves. The patches are
applied by `apply_cpu_runtime()`, which our process-group initialisation calls explicitly (never on import),
and which does nothing when CUDA is available; `remove_cpu_runtime()` (called when the process groups are
destroyed) restores every patched function and leaves the torch-function mode.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode

_ACTIVE: dict = {}  # while applied: the original functions and the entered mode


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device means cuda:<n> in torch factory functions; on a CUDA-less machine it can only mean that.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Maps a CUDA device argument to CPU.

    Serves megatron.core.pipeline_parallel.schedules (`torch.zeros(..., device="cuda")` for token counts),
    p2p_communication (`device=torch.cuda.current_device()` for shape exchange), and
    distributed.param_and_grad_buffer (grad buffers allocated with `device=torch.cuda.current_device()`),
    plus the odd `.cuda()` / `.to("cuda")` in megatron utilities.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.type:
            # optimizer.distrib_optimizer / optimizer.optimizer (Float16OptimizerWithFloat16Params) and
            # optimizer.clip_grads accept only params whose `.type()` is 'torch.cuda.{Float,BFloat16,Half}Tensor':
            # report CPU tensors under their CUDA names, and map a CUDA type name given as a target back to CPU.
            if len(args) == 1 and not kwargs:
                return func(*args).replace("torch.", "torch.cuda.", 1)
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], args[1].replace("torch.cuda.", "torch.", 1), *args[2:])
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def apply_cpu_runtime() -> bool:
    """Patch megatron/torch CUDA entry points for a CPU-only process. Returns True when patches are active."""
    if torch.cuda.is_available():
        return False
    if _ACTIVE:
        return True
    import megatron.core.tensor_parallel.random as mrandom

    originals = {
        (torch.cuda, name): getattr(torch.cuda, name)
        for name in ("current_device", "synchronize", "get_rng_state", "set_rng_state", "manual_seed")
    }
    originals.update({(mrandom, n): getattr(mrandom, n) for n in ("_get_cuda_rng_state", "_set_cuda_rng_state")})
    # torch.cuda.current_device(): megatron passes it as `device=` (schedules, p2p, DDP buffers, and the
    # sequence-parallel all-gather buffers in tensor_parallel.layers' backward, where CudaToCpuMode is not
    # active): answering "cpu" makes those allocations land on CPU without the mode.
    torch.cuda.current_device = lambda: "cpu"
    # torch.cuda.synchronize(): timers and the distributed optimizer call it; nothing to wait for on CPU.
    torch.cuda.synchronize = lambda device=None: None
    # CudaRNGStatesTracker.add()/fork() (tensor_parallel.random) save, seed and restore the "device" RNG:
    # on CPU the device generator is the CPU generator, so fork/restore stays exact.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # Factory calls with device="cuda" / current_device() inside megatron (see CudaToCpuMode).
    mode = CudaToCpuMode()
    mode.__enter__()
    _ACTIVE.update(originals=originals, mode=mode)
    return True


def remove_cpu_runtime() -> None:
    """Undo `apply_cpu_runtime` (no-op when it is not active)."""
    if not _ACTIVE:
        return

    if _get_current_function_mode() is not _ACTIVE["mode"]:
        raise RuntimeError("cannot undo the CPU runtime: another torch function mode (e.g. a `with torch.device(...)`"
                           " block) was entered after it and is still active; leave it before destroy_parallel()")
    for (owner, name), fn in _ACTIVE["originals"].items():
        setattr(owner, name, fn)
    _ACTIVE["mode"].__exit__(None, None, None)
    _ACTIVE.clear()


def cpu_runtime_active() -> bool:
    return bool(_ACTIVE)
