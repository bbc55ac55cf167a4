"""megatron-core 0.16.1's DistributedOptimizer checkpoint load with torch's Adam (no TE/apex installed).

`resume` (training/checkpoint.py) calls them in order: allocate_adam_state before
`DistributedOptimizer.sharded_state_dict(is_loading=True)`, skip_adam_step_on_param_state_load before
`load_state_dict`, unshare_adam_steps after it.
"""

from __future__ import annotations

import torch


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
    """Give every parameter its own Adam 'step' tensor again.

    megatron 0.16.1 (torch Adam path) restores one shared 'step' tensor into all parameters' states; torch's
    Adam increments each state's step in place, so a shared tensor would advance once per parameter per step.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
