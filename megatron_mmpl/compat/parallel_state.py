"""What megatron-core 0.16.1's `parallel_state.destroy_model_parallel` leaves behind.

It resets every group global but `_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP` and its gloo twin, so the last
groups' process groups stay referenced after `torch.distributed.destroy_process_group`: their TCP store and gloo
listeners stay open in the process (measured: 3 LISTEN sockets after a `train()` in one process) until the next
`initialize_model_parallel` replaces them. `release_leftover_groups` drops every ProcessGroup megatron's module
still holds after its destroy.
"""

from __future__ import annotations

import torch.distributed as dist


def release_leftover_groups() -> list[str]:
    """Set to None each module global of megatron's parallel_state that still holds a ProcessGroup (call after
    destroy_model_parallel); returns their names."""
    from megatron.core import parallel_state

    left = [k for k, v in vars(parallel_state).items() if isinstance(v, dist.ProcessGroup)]
    for k in left:
        setattr(parallel_state, k, None)
    return left
