"""The trainer's data source: this data-parallel rank's packed micro-batches (the batch contract), resumable."""

from __future__ import annotations

import os


def check_data_dir(path: str) -> None:
    """Fail before any compute when data.shards is not a built shard directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.shards={path!r} does not exist; build it with `mmpl data build` "
                                "(or `mmpl data synth` for synthetic documents)")
    if not os.path.isfile(os.path.join(path, "index.json")):
        raise FileNotFoundError(f"data.shards={path!r} has no index.json; is it the output dir of `mmpl data build`?")


def open_batches(cfg, hf, dp_rank: int, dp_size: int, state: dict | None = None):
    """An iterator of micro-batch dicts with state_dict()/load_state_dict(), restored from `state` if given."""
    from megatron_mmpl.training._standin_data import SyntheticPackedBatches

    distinct = int(os.environ.get("MMPL_STANDIN_DISTINCT", "0"))
    source = SyntheticPackedBatches(hf, seed=cfg.data.seed, dp_rank=dp_rank, distinct=distinct)
    if state is not None:
        source.load_state_dict(state)
    return source
