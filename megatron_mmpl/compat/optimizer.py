"""megatron-core 0.16.1's DistributedOptimizer with torch's Adam (no TE/apex installed): its fused kernel on
CUDA, and checkpoint load.

`build_optimizer` (training/optimizer.py) calls use_fused_adam. `resume` (training/checkpoint.py) calls the rest
in order: allocate_adam_state before `DistributedOptimizer.sharded_state_dict(is_loading=True)`,
skip_adam_step_on_param_state_load before `load_state_dict`, unshare_adam_steps after it.
"""

from __future__ import annotations

import torch

# Devices whose parameters get the fused kernel. CPU keeps torch's default (the tests' fp32 reference path);
# tests/distributed/test_train_resume.py adds "cpu" to run the fused path through a save and resume.
FUSED_ADAM_DEVICES = ("cuda",)


def _torch_adams(optimizer):
    """The torch Adam(W) instances inside megatron's (chained) optimizer; none when TE/apex supplied Adam."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            yield inner


def use_fused_adam(optimizer) -> None:
    """Switch megatron's torch-Adam fallback to torch's fused kernel where every parameter is on CUDA
    (`FUSED_ADAM_DEVICES`).

    megatron-core 0.16.1 builds `torch.optim.AdamW(params, lr, weight_decay, betas, eps)` when neither TE nor apex
    is installed (megatron/core/optimizer/__init__.py), which on CUDA picks the foreach path: about ten passes over
    the fp32 master weights and moments. The fused kernel makes one (same update rule; torch's tests hold it to
    the foreach result within rounding). Its 'step' counters live on the device as float32, as torch keeps them
    for fused; existing counters (a resume) are moved there. Idempotent."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            params = group["params"]
            if not params or not all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params):
                continue
            group["fused"], group["foreach"] = True, False
            for p in params:
                step = inner.state.get(p, {}).get("step")
                if torch.is_tensor(step) and (step.device != p.device or step.dtype != torch.float32):
                    inner.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def allocate_adam_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam state (step 0) so that it can describe what it loads.

    megatron 0.16.1 `DistributedOptimizer.sharded_state_dict(is_loading=True)` first calls `state_dict()`, which
    with torch's Adam (no TE/apex installed) asserts one common 'step' over a state that does not exist yet.
    Every value allocated here is overwritten by the load. (With TE/apex, megatron allocates the state itself.)
    """
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if inner is None or len(inner.state):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def skip_adam_step_on_param_state_load(optimizer) -> None:
    """Let megatron 0.16.1 load fully_reshardable param state into torch's Adam.

    `DistributedOptimizer._set_main_param_and_optimizer_states` copies every key of the live Adam state, which
    for torch's Adam (no TE/apex) includes 'step', while the loaded tensors deliberately leave 'step' out (it is
    restored from the param groups): hide 'step' during that copy.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, original=original):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam 'step' tensor again, on the device where the fused kernel wants it.

    megatron 0.16.1 (torch Adam path) restores one shared 'step' tensor into all parameters' states; torch's
    Adam increments each state's step in place, so a shared tensor would advance once per parameter per step.
    The loaded param groups carry the checkpoint's `fused` flag, so `use_fused_adam` runs again after the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    use_fused_adam(optimizer)
