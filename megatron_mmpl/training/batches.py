"""The trainer's data source: this data-parallel rank's packed micro-batches (the batch contract), resumable."""

from __future__ import annotations

import os

from megatron_mmpl.config.hf_config import check_tokens_match
from megatron_mmpl.config.load import ConfigError
from megatron_mmpl.data.shards import load_index
from megatron_mmpl.data.storage import is_url
from megatron_mmpl.data.tokenizer import load_tokenizer
from megatron_mmpl.training.signals import helper_process_init


def check_data_dir(path: str, spec=None, storage_options: dict | None = None, field: str = "data.shards") -> dict:
    """Fail before any compute when data.shards (a path or URL) is not a built shard dir, or its tokens are not
    the model's."""

    if not path or not (is_url(path) or os.path.isdir(path)):
        raise FileNotFoundError(f"{field}={path!r} does not exist; build it with `mmpl data build` "
                                "(or `mmpl data synth` for synthetic documents)")
    try:
        index = load_index(path, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{field}={path!r} has no index.json; is it the output dir of `mmpl data build`?"
                                ) from None
    if not index.get("tokenizer_name"):
        raise ConfigError(f"{field}={path!r}: index.json names no tokenizer (tokenizer_name)")
    if spec is not None and index.get("special_ids"):
        check_tokens_match(spec, index["special_ids"], f"{field}={path!r}")
    return index


def check_mixture(data_cfg, index: dict, spec=None) -> None:
    """The length recipe and task weights must select something in these shards, and every data.sources entry
    must be a shard directory of the same tokens (one-line error otherwise)."""
    from megatron_mmpl.data.mixture import PoolSet, pool_weights

    for src in data_cfg.sources:
        extra = check_data_dir(src, spec, data_cfg.storage_options, field="data.sources entry")
        if extra.get("tokenizer") != index.get("tokenizer"):
            raise ConfigError(f"data.sources entry {src!r} was built with tokenizer {extra.get('tokenizer_name')} "
                              f"({extra.get('tokenizer')}), data.shards with {index.get('tokenizer_name')} "
                              f"({index.get('tokenizer')}); build both with the same --tokenizer")

    try:
        pool_weights(PoolSet.from_index(data_cfg.shards, index, data_cfg.storage_options), data_cfg.recipe,
                     data_cfg.task_weights, data_cfg.min_len, data_cfg.max_len)
    except ValueError as e:
        raise ConfigError(f"data.recipe/min_len/max_len/task_weights: {' '.join(str(e).split())}") from None


class Batches:
    """`next()` gives this rank's next packed micro-batch; `state_dict()` resumes right after the last one given."""

    def __init__(self, loader):
        self.loader = loader
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()  # stops the DataLoader workers


def open_batches(cfg, hf, dp_rank: int, dp_size: int, state: dict | None = None, pad_multiple: int = 1) -> Batches:
    """The data pipeline's loader for this data-parallel rank, restored from `state` when resuming."""
    from megatron_mmpl.data.loader import build_train_loader

    index = check_data_dir(cfg.data.shards, storage_options=cfg.data.storage_options)
    loader = build_train_loader(cfg.data, load_tokenizer(index["tokenizer_name"]), dp_rank=dp_rank, dp_size=dp_size,
                                pad_multiple=pad_multiple, hf_config=hf, worker_init=helper_process_init)
    if state is not None:
        loader.load_state_dict(state)
    return Batches(loader)
