"""initialize_parallel's GPU check: more ranks on a node than visible GPUs is one line naming both counts and the
fixes, raised on every rank before any rendezvous."""

import pytest
import torch

from megatron_mmpl.errors import user_message
from megatron_mmpl.parallel.process_groups import check_gpus_per_node

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("local_world, local_rank, gpus, bad", [
    ("2", "1", 1, True),   # torchrun --nproc_per_node=2 on a 1-GPU machine: rank 1 has no device
    ("2", "0", 1, True),   # rank 0 stops too (same line on every rank; rank 0 prints it)
    ("8", "7", 8, False),
    ("1", "0", 1, False),
])
def test_more_ranks_than_gpus_is_one_line(monkeypatch, local_world, local_rank, gpus, bad):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if not bad:
        check_gpus_per_node()
        return
    with pytest.raises(Exception) as e:
        check_gpus_per_node()
    line = user_message(e.value)
    assert line == (f"{local_world} ranks on this node but {gpus} visible GPU(s): start at most {gpus} per node "
                    f"(torchrun --nproc_per_node={gpus}, or the launcher's MMPL_GPUS_PER_NODE), or hide the GPUs "
                    "(CUDA_VISIBLE_DEVICES=) to run the ranks on CPU")
