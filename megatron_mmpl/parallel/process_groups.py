"""Process groups: torch.distributed + megatron parallel_state, with the CPU runtime (compat/cpu_runtime.py) on
CUDA-less machines for as long as the groups exist."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_mmpl.compat.cpu_runtime import apply_cpu_runtime, remove_cpu_runtime
from megatron_mmpl.compat.parallel_state import release_leftover_groups
from megatron_mmpl.errors import UserError
from megatron_mmpl.parallel.ports import free_port


@dataclass(frozen=True)
class Layout:
    """Degrees of parallelism; data parallel is what is left of the world."""

    tp: int = 1
    pp: int = 1
    cp: int = 1

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def validate(self, world_size: int) -> None:
        """Plain-Python check before any process group exists."""
        for name in ("tp", "pp", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name}={v!r} must be a positive integer")
        mp = self.tp * self.pp * self.cp
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {mp}; "
                f"launch a multiple of {mp} ranks or change parallel.tp/pp/cp"
            )


def check_gpus_per_node() -> None:
    """One GPU per rank: more ranks on this node (LOCAL_WORLD_SIZE, set by torchrun and srun tasks) than visible
    GPUs stops every rank with the same line, before any rendezvous (a rank past the last GPU would fail alone
    with CUDA's "invalid device ordinal" while the others wait for it)."""
    ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")) + 1)
    gpus = torch.cuda.device_count()
    if ranks > gpus:
        raise UserError(
            f"{ranks} ranks on this node but {gpus} visible GPU(s): start at most {gpus} per node "
            f"(torchrun --nproc_per_node={gpus}, or the launcher's MMPL_GPUS_PER_NODE), or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to run the ranks on CPU")


def initialize_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, backend: str | None = None,
                        timeout_s: float | None = None) -> Layout:
    """Initialise torch.distributed from the env (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and megatron's groups;
    `timeout_s` bounds every collective's wait on another rank (None: torch's and megatron's defaults)."""
    from megatron.core import parallel_state, tensor_parallel

    layout = Layout(tp, pp, cp)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout.validate(world_size)
    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_runtime()
    else:
        check_gpus_per_node()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # One process without a launcher: a private rendezvous, not MASTER_* left in os.environ for the children
        # this process starts later (a later trainer would try the same port).
        local = "MASTER_PORT" not in os.environ
        dist.init_process_group(
            backend=backend or ("nccl" if cuda else "gloo"),
            **({"init_method": f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{free_port()}"} if local else {}),
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        **({"distributed_timeout_minutes": timeout_s / 60} if timeout_s else {}),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


@dataclass(frozen=True)
class RankPosition:
    """Where this rank sits once the groups exist: its coordinate along each parallel dimension and the sizes.
    Built once (`rank_position`) and passed to what needs it, so nothing downstream reads megatron's globals."""

    layout: Layout
    dp: int
    tp_rank: int = 0
    pp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0

    @property
    def tag(self) -> str:
        """e.g. 'tp2pp1cp1dp4': names per-rank files that only a run of the same layout may read back."""
        return f"tp{self.layout.tp}pp{self.layout.pp}cp{self.layout.cp}dp{self.dp}"

    @property
    def first_of_replica(self) -> bool:
        """Rank 0 of its model replica (TP, PP and CP rank 0): the one that writes the replica's data state."""
        return self.tp_rank == 0 and self.pp_rank == 0 and self.cp_rank == 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


def rank_position() -> RankPosition:
    """This rank's RankPosition, from megatron's parallel_state (after `initialize_parallel`)."""
    from megatron.core import parallel_state as ps

    layout = Layout(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                    ps.get_context_parallel_world_size())
    return RankPosition(layout, ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                        ps.get_pipeline_model_parallel_rank(), ps.get_context_parallel_rank(),
                        ps.get_data_parallel_rank())


def destroy_parallel() -> None:
    """Undo `initialize_parallel`: megatron's groups (all of them: compat/parallel_state.py), its model-parallel RNG
    tracker (seeded there; a later model in this process must not draw from it), the process group, the CPU
    runtime."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    release_leftover_groups()
    tensor_parallel.get_cuda_rng_tracker().reset()
    if dist.is_initialized():
        dist.destroy_process_group()
    remove_cpu_runtime()
