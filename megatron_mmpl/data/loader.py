"""Training loader: mixture draws → this DP rank's items → FFD packing → decoded, packed micro-batches; resumable.

Work split: global draw g (same pool on every DP rank) gives DP rank r the pool's stream item c·dp_size + r (c = how
often the pool was drawn before g), so DP ranks read disjoint samples and TP/CP/PP peers (same DP rank) identical
ones; draw g belongs to loader worker g mod W. Each worker packs its own items. Its state (next draw, per-pool
counts, packing buffer, counters) rides along with every batch, so `state_dict()` after k batches restores exactly
the (k+1)-th batch onwards, with workers > 0. The stream is infinite: every DP rank yields as many batches as asked.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from megatron_mmpl.config.schema import DataConfig
from megatron_mmpl.data.chat_template import render
from megatron_mmpl.data.images import ImageProcessor, ImageProcessorConfig
from megatron_mmpl.data.mixture import DrawSequence, PoolSet, PoolStream, pool_weights, with_sources
from megatron_mmpl.data.packing import PackingBuffer, ProcessedSample, collate_packed, padded_len
from megatron_mmpl.data.schema import Sample
from megatron_mmpl.data.shards import load_index, parse_members
from megatron_mmpl.data.storage import RangeReader
from megatron_mmpl.data.tokenizer import special_ids, tokenizer_fingerprint
from megatron_mmpl.models.qwen25vl.rope_index import rope_index, rope_index_kwargs

log = logging.getLogger(__name__)
STATE_VERSION = 1


class DecodeAbort(RuntimeError):
    """data.max_consecutive_failures samples in a row failed to decode: the shards, not one sample, are bad."""


@dataclass
class LoaderOptions(DataConfig):
    """Everything the loader reads: the run's data section (documented in config/schema.py) and the padding
    multiple of the parallel layout; `from_config` takes a DataConfig (or any object with some of these fields)."""

    pad_multiple: int = 1
    """Pad each sample to a multiple of this (ParallelConfig.pad_multiple: 2·CP, times TP with SP)."""

    @classmethod
    def from_config(cls, cfg, **overrides) -> LoaderOptions:
        names = cls.__dataclass_fields__
        kw = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        if getattr(cfg, "micro_batch_size", 1) != 1:
            raise ValueError(f"data.micro_batch_size={cfg.micro_batch_size}: packed rows are b=1; raise max_seq_len "
                             f"or the number of micro-batches per step instead")
        return cls(**kw).checked()

    def checked(self) -> LoaderOptions:
        """These options, if a row of max_seq_len can be built from samples padded to pad_multiple."""
        if not self.shards:
            raise ValueError("data.shards is empty: point it at a directory written by `mmpl data build` / `synth`")
        if self.pad_to_max_len and self.max_seq_len % self.pad_multiple:
            raise ValueError(f"max_seq_len={self.max_seq_len} is not a multiple of pad_multiple={self.pad_multiple}")
        return self


class SampleDecoder:
    """Reads one sample by (pool, item) and turns it into ids, answer mask, 3D positions and patches."""

    def __init__(self, root: str, ps: PoolSet, tokenizer, improc: ImageProcessor, rope_kwargs: dict,
                 storage_options: dict | None = None):
        self.root, self.ps, self.tok, self.improc, self.rope_kwargs = root, ps, tokenizer, improc, rope_kwargs
        self.ids = special_ids(tokenizer)
        self.reader = RangeReader(storage_options)  # local files or URL byte ranges (fsspec)

    def __call__(self, pool: int, item: int) -> ProcessedSample:

        p = self.ps.pools[pool]
        off = int(p.offset[item])
        key, members = parse_members(self.reader.read(self.ps.shard_paths[int(p.shard[item])], off,
                                                      int(p.nbytes[item])), off)
        s = Sample.from_members(key, members)
        pvs, grids = [], []
        for page in s.pages:
            pv, g = self.improc(page)
            pvs.append(pv), grids.append(g)
        m2 = self.improc.cfg.merge_size ** 2
        ids, mask = render(s.messages, [t * h * w // m2 for t, h, w in grids], self.tok, self.ids)
        if len(ids) != int(p.n_tokens[item]):
            raise ValueError(f"sample {key}: {len(ids)} tokens now but {int(p.n_tokens[item])} at build time "
                             f"(different tokenizer or image processor than the shards were built with)")
        grid = np.asarray(grids, np.int64).reshape(-1, 3)
        pos, _ = rope_index(torch.from_numpy(ids), image_grid_thw=torch.from_numpy(grid), **self.rope_kwargs)
        return ProcessedSample(ids, mask, pos, np.concatenate(pvs) if pvs else np.zeros((0, 0), np.float32), grid,
                               key=key, task=s.task)


class NoUsableSamples(ValueError):
    """The mixture can draw no sample that fits a packed row: the loader would spin forever."""


def check_some_fit(ps: PoolSet, weights, opts) -> None:
    """Refuse at start-up a mixture whose every drawable sample is longer than max_seq_len (skip_long would skip
    them all, forever)."""
    drawable = [p for p, w in zip(ps.pools, weights) if w > 0 and len(p)]
    if not opts.skip_long or not drawable:
        return
    lengths = [padded_len(np.asarray(p.n_tokens, np.int64), opts.pad_multiple) for p in drawable]
    fits = sum(int((n <= opts.max_seq_len).sum()) for n in lengths)
    if fits == 0:
        shortest = min(int(np.min(p.n_tokens)) for p in drawable)
        raise NoUsableSamples(
            f"every sample the mixture draws ({sum(len(p) for p in drawable)} in {len(drawable)} pools) is longer "
            f"than data.max_seq_len={opts.max_seq_len} (the shortest has {shortest} tokens), so all would be "
            f"skipped; raise data.max_seq_len to at least {shortest}, or lower data.max_len")


class WorkerStream:
    """The packed-batch stream of one logical loader worker of one DP rank."""

    def __init__(self, ds: LongDocDataset, worker: int, state: dict | None):
        self.ds, self.worker = ds, worker
        o = ds.opts
        self.buffer = PackingBuffer(o.max_seq_len, o.pack_buffer, o.pad_multiple)
        self.g = 0
        self.cursors = np.zeros(len(ds.ps.pools), np.int64)
        self.counters = dict(batches=0, samples=0, skipped_long=0, corrupt=0, consecutive_failures=0)
        if state is not None:
            self.g = int(state["g"])
            self.cursors = np.asarray(state["cursors"], np.int64)
            self.buffer.load(state["buffer"])
            self.counters = dict(state["counters"])

    def state(self) -> dict:
        return dict(g=self.g, cursors=self.cursors.tolist(), buffer=copy.deepcopy(self.buffer.state()),
                    counters=dict(self.counters))

    def draw(self) -> tuple[int, int, int, int]:
        """(pool, item, n_tokens, stream position) of this worker's next sample; over-long ones are skipped."""
        ds, W = self.ds, self.ds.n_workers
        limit = 4 * sum(len(p) for p in ds.ps.pools) * W  # draws without progress before we call it a dead loop
        for _ in range(limit):
            g = self.g
            self.g += 1
            pool = ds.draws.pool_of(g)
            c = int(self.cursors[pool])
            self.cursors[pool] += 1
            if g % W != self.worker:
                continue
            pos = c * ds.dp_size + ds.dp_rank
            item = ds.streams.item(pool, pos)
            n = int(ds.ps.pools[pool].n_tokens[item])
            if padded_len(n, ds.opts.pad_multiple) > ds.opts.max_seq_len:
                if not ds.opts.skip_long:
                    raise ValueError(f"sample {ds.ps.pools[pool].keys[item]} has {n} tokens > max_seq_len="
                                     f"{ds.opts.max_seq_len}; raise max_seq_len or set skip_long")
                self.counters["skipped_long"] += 1
                continue
            return pool, item, n, pos
        raise NoUsableSamples(f"the loader drew {limit} samples in a row without one that fits data.max_seq_len="
                              f"{ds.opts.max_seq_len} (skipped so far: {self.counters['skipped_long']} over-long); "
                              "raise data.max_seq_len or lower data.max_len")

    def next_bin(self) -> list:
        while not self.buffer.full():
            pool, item, n, pos = self.draw()
            self.buffer.add(n, [pool, item, pos])
        return self.buffer.pop_bin()

    def __iter__(self):
        ds = self.ds
        while True:
            samples, epochs = [], []
            for pool, item, pos in self.next_bin():
                try:
                    samples.append(ds.decoder(pool, item))
                    epochs.append(pos // len(ds.ps.pools[pool]))
                    self.counters["consecutive_failures"] = 0
                except Exception as e:  # noqa: BLE001 - a corrupt sample must not kill the run
                    self.counters["corrupt"] += 1
                    self.counters["consecutive_failures"] += 1
                    p = ds.ps.pools[pool]
                    log.warning("skipping undecodable sample %s (%s @%d): %s: %s", p.keys[item],
                                ds.ps.shard_paths[int(p.shard[item])] if ds.ps.shard_paths else "-",
                                int(p.offset[item]), type(e).__name__, e)
                    if self.counters["consecutive_failures"] >= ds.opts.max_consecutive_failures:
                        raise DecodeAbort(
                            f"{self.counters['consecutive_failures']} consecutive samples failed to decode (last: "
                            f"{p.keys[item]} in {ds.ps.shard_paths[int(p.shard[item])] if ds.ps.shard_paths else '-'}"
                            f": {type(e).__name__}: {e}); the shards under {ds.root} look corrupt or were built with "
                            f"another tokenizer/image processor: rebuild them (`mmpl data build`), or raise "
                            f"data.max_consecutive_failures to skip more") from e
            if not samples:
                continue
            self.counters["batches"] += 1
            self.counters["samples"] += len(samples)
            batch = collate_packed(samples, ds.pad_id, ds.opts.pad_multiple,
                                   ds.opts.max_seq_len if ds.opts.pad_to_max_len else None, ds.patch_dim)
            info = dict(keys=[s.key for s in samples], tasks=[s.task for s in samples],
                        lengths=[len(s.input_ids) for s in samples], epochs=epochs)
            yield batch, info, self.state()


class LongDocDataset(torch.utils.data.IterableDataset):
    """Infinite packed micro-batches for one DP rank; worker w of W runs logical stream (w + rotation) mod W."""

    def __init__(self, opts: LoaderOptions, tokenizer, dp_rank: int, dp_size: int,
                 image_processor: ImageProcessor | None = None, rope_kwargs: dict | None = None,
                 pools: PoolSet | None = None):
        self.opts, self.dp_rank, self.dp_size = opts, dp_rank, dp_size
        self.n_workers = max(1, opts.num_workers)
        self.root = opts.shards
        if pools is None:
            index = load_index(opts.shards, opts.storage_options)
            _check_build(index, tokenizer, image_processor)
            if image_processor is None:
                image_processor = ImageProcessor(ImageProcessorConfig.from_dict(index["image_processor"]))
            pools = PoolSet.from_index(opts.shards, index, opts.storage_options)
        self.ps = pools
        self.improc = image_processor or ImageProcessor()
        c = self.improc.cfg
        self.patch_dim = 3 * c.temporal_patch_size * c.patch_size ** 2
        self.weights = pool_weights(self.ps, opts.recipe, opts.task_weights, opts.min_len, opts.max_len)
        if opts.sources:
            self.ps, self.weights = with_sources(self.ps, self.weights, [
                (_source_pools(src, opts.storage_options, tokenizer, self.improc), share)
                for src, share in opts.sources.items()])
        check_some_fit(self.ps, self.weights, opts)
        self.draws = DrawSequence(self.ps, self.weights, opts.seed)
        self.streams = PoolStream(self.ps, opts.seed)
        if tokenizer is not None:
            sid = special_ids(tokenizer)
            self.pad_id = sid.endoftext
            rope_kwargs = rope_kwargs or dict(
                spatial_merge_size=c.merge_size, tokens_per_second=2, image_token_id=sid.image_pad,
                video_token_id=sid.video_pad, vision_start_token_id=sid.vision_start)
            self.decoder = SampleDecoder(self.root, self.ps, tokenizer, self.improc, rope_kwargs, opts.storage_options)
        self.start_states: dict[int, dict] = {}
        self.rotation = 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        phys = info.id if info is not None else 0
        if info is not None and info.num_workers != self.n_workers:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers, dataset expects {self.n_workers}")
        logical = (phys + self.rotation) % self.n_workers
        stream = WorkerStream(self, logical, self.start_states.get(logical))
        for batch, meta, st in stream:
            batch["_meta"] = dict(worker=logical, state=st, info=meta)
            yield batch


class LongDocLoader:
    """Iterable of packed micro-batches (dicts of the contract's tensors) with exact-resume state."""

    def __init__(self, dataset: LongDocDataset, worker_init=None):
        self.dataset = dataset
        self.worker_init = worker_init  # the trainer's policy for its helper processes (training/signals.py)
        self.workers: dict[int, dict] = dict(dataset.start_states)
        self.consumed = 0
        self.last_info: dict = {}

    def __iter__(self):
        """Continues from where the last iteration stopped (or from a loaded state)."""
        self.load_state_dict(self.state_dict())
        ds = self.dataset
        o = ds.opts
        dl = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=o.num_workers,
            prefetch_factor=o.prefetch_factor if o.num_workers > 0 else None,
            multiprocessing_context="fork" if o.num_workers > 0 else None, worker_init_fn=self.worker_init,
            pin_memory=torch.cuda.is_available(),  # page-locked batches: the trainer's copies run asynchronously
        )
        batches = iter(dl)
        try:
            for batch in batches:
                meta = batch.pop("_meta")
                self.workers[int(meta["worker"])] = meta["state"]
                self.consumed += 1
                self.last_info = meta["info"]
                yield batch
        finally:
            stop_workers(batches)


    def state_dict(self) -> dict:
        ds = self.dataset
        return dict(version=STATE_VERSION, seed=ds.opts.seed, dp_rank=ds.dp_rank, dp_size=ds.dp_size,
                    num_workers=ds.n_workers, next_worker=(ds.rotation + self.consumed) % ds.n_workers,
                    workers={str(k): copy.deepcopy(v) for k, v in self.workers.items()})

    def load_state_dict(self, state: dict) -> None:
        ds = self.dataset
        want = dict(version=STATE_VERSION, seed=ds.opts.seed, dp_rank=ds.dp_rank, dp_size=ds.dp_size,
                    num_workers=ds.n_workers)
        bad = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
        if bad:
            raise ValueError(f"loader state does not fit this loader (saved, now): {bad}; resume with the same "
                             f"seed, data-parallel size and data.num_workers")
        ds.start_states = {int(k): copy.deepcopy(v) for k, v in state["workers"].items()}
        ds.rotation = int(state["next_worker"])
        self.workers = dict(ds.start_states)
        self.consumed = 0

    def stats(self) -> dict:
        """Counters summed over this rank's workers (as of the last batch each delivered)."""
        out: dict[str, int] = {}
        for st in self.workers.values():
            for k, v in st["counters"].items():
                if k != "consecutive_failures":
                    out[k] = out.get(k, 0) + int(v)
        return out


def stop_workers(batches) -> None:
    """Shut a DataLoader iterator's workers down, and SIGKILL any still alive: a worker_init that ignores SIGTERM
    (the trainer's signal policy) would make torch's terminate() fallback, and multiprocessing's exit-time
    terminate-and-join of daemon processes, wait forever."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return
    shutdown()
    for w in getattr(batches, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(timeout=10)


def _source_pools(root: str, storage_options: dict | None, tokenizer, improc: ImageProcessor) -> PoolSet:
    """The pools of one data.sources directory, which must be built like data.shards (tokenizer, pages)."""
    index = load_index(root, storage_options)
    _check_build(index, tokenizer, improc)
    return PoolSet.from_index(root, index, storage_options)


def _check_build(index: dict, tokenizer, improc: ImageProcessor | None) -> None:
    if tokenizer is not None and index.get("tokenizer") and index["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"shards were built with tokenizer {index['tokenizer']} ({index.get('tokenizer_name')}) but "
                         f"this tokenizer is {tokenizer_fingerprint(tokenizer)}: token lengths would not match; "
                         f"rebuild the shards with this tokenizer or load the one they were built with")
    if improc is not None and index.get("image_processor"):
        built = ImageProcessorConfig.from_dict(index["image_processor"])
        if built != improc.cfg:
            raise ValueError(f"shards were built with image processor {built} but the loader uses {improc.cfg}")


def dp_rank_and_size() -> tuple[int, int]:
    """Data-parallel rank/size from megatron's parallel_state (TP/CP/PP peers share them); (0, 1) without it."""
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    except ImportError:
        pass
    return 0, 1


def build_train_loader(data_cfg, tokenizer, *, dp_rank: int | None = None, dp_size: int | None = None,
                       pad_multiple: int | None = None, hf_config=None,
                       image_processor: ImageProcessor | None = None, worker_init=None,
                       **overrides) -> LongDocLoader:
    """The training loader for this DP rank. data_cfg: a DataConfig (shards, recipe, min_len, max_len, task_weights,
    max_seq_len, num_workers, seed; optional LoaderOptions fields); dp rank/size default to parallel_state's;
    pad_multiple: 2·CP·TP when sequence/context parallel needs it; hf_config: Qwen2_5_VLConfig for rope ids;
    worker_init: run first in each worker process (the trainer's signal policy)."""
    opts = LoaderOptions.from_config(data_cfg, pad_multiple=pad_multiple, **overrides)
    if dp_rank is None or dp_size is None:
        dp_rank, dp_size = dp_rank_and_size()
    rope_kwargs = None
    if hf_config is not None:

        rope_kwargs = rope_index_kwargs(hf_config)
    ds = LongDocDataset(opts, tokenizer, dp_rank, dp_size, image_processor, rope_kwargs)
    return LongDocLoader(ds, worker_init)
