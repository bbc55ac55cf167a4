"""The sample mixture over (length bucket × task) pools, and the global draw sequence every DP rank shares.

A recipe fixes each pool's TOKEN share: bucket shares (`balanced`: equal per bucket in [min_len, max_len];
`pool_native`: as the pool's tokens are; `target:<len>`: the bucket holding len) times task shares (task families,
default extraction : reasoning = 8 : 2, renormalised within each bucket over the tasks it has). Pools are drawn
with probability ∝ share / mean sample length, so realised token shares converge to the recipe. Draw g's pool is a
function of (seed, g) only: all DP ranks draw the same pool at the same step and take disjoint items of it.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np

from megatron_mmpl.data.schema import TASK_FAMILIES
from megatron_mmpl.data.shards import bucket_name, load_all_shard_samples, parse_length
from megatron_mmpl.data.storage import join

log = logging.getLogger(__name__)
BLOCK = 4096  # draws per RNG block


@dataclass
class Pool:
    """All samples of one (bucket, task): where each lives and how long it is."""

    bucket: str
    task: str
    shard: np.ndarray  # [n] int32 index into PoolSet.shard_paths
    offset: np.ndarray  # [n] int64 byte offset in the tar
    nbytes: np.ndarray  # [n] int64
    n_tokens: np.ndarray  # [n] int64
    keys: list[str]

    @property
    def name(self) -> str:
        return f"{self.bucket}/{self.task}"

    def __len__(self) -> int:
        return len(self.n_tokens)


class PoolSet:
    """The pools of a shard directory (or built from lengths alone, for tests)."""

    def __init__(self, pools: list[Pool], shard_paths: list[str], edges: list[int]):
        self.pools = sorted(pools, key=lambda p: (edges_key(p.bucket, edges), p.task))
        self.shard_paths = shard_paths
        self.edges = edges

    @classmethod
    def from_index(cls, root: str, index: dict, storage_options: dict | None = None) -> PoolSet:
        """The pools of a shard directory (path or URL); shard_paths are full locations."""

        by: dict[tuple[str, str], list] = {}
        paths = []
        rows_of = load_all_shard_samples(root, index["shards"], storage_options)
        for i, (sh, rows) in enumerate(zip(index["shards"], rows_of)):
            paths.append(join(root, sh["path"]))
            for key, off, nb, nt in rows:
                by.setdefault((sh["bucket"], sh["task"]), []).append((i, off, nb, nt, key))
        pools = []
        for (b, t), rows in by.items():
            pools.append(Pool(b, t, np.array([r[0] for r in rows], np.int32), np.array([r[1] for r in rows], np.int64),
                              np.array([r[2] for r in rows], np.int64), np.array([r[3] for r in rows], np.int64),
                              [r[4] for r in rows]))
        return cls(pools, paths, list(index["bucket_edges"]))

    @classmethod
    def from_lengths(cls, lengths: dict[tuple[str, str], list[int]], edges: list[int]) -> PoolSet:
        pools = []
        for (b, t), ls in lengths.items():
            n = len(ls)
            pools.append(Pool(b, t, np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64),
                              np.asarray(ls, np.int64), [f"{b}-{t}-{i}" for i in range(n)]))
        return cls(pools, [], edges)


def edges_key(bucket: str, edges) -> int:

    names = [bucket_name(e) for e in edges]
    return names.index(bucket) if bucket in names else len(names)


def bucket_shares(ps: PoolSet, recipe: str, min_len: int, max_len: int) -> dict[str, float]:

    lo_hi = {bucket_name(e): (ps.edges[i - 1] + 1 if i else 1, e) for i, e in enumerate(ps.edges)}
    present = sorted({p.bucket for p in ps.pools}, key=lambda b: edges_key(b, ps.edges))
    tokens = {b: sum(int(p.n_tokens.sum()) for p in ps.pools if p.bucket == b) for b in present}
    if recipe.startswith("target:"):
        want = parse_length(recipe.split(":", 1)[1])
        chosen = [b for b in present if lo_hi[b][0] <= want <= lo_hi[b][1]]
        if not chosen:
            raise ValueError(f"recipe {recipe}: no samples in the bucket holding {want} tokens; buckets present: "
                             f"{present}")
        return {chosen[0]: 1.0}
    inside = [b for b in present if min_len <= lo_hi[b][1] <= max_len]
    if not inside:
        raise ValueError(f"no length bucket with its upper edge in [min_len={min_len}, max_len={max_len}]; "
                         f"buckets present: {present} (edges {ps.edges}); widen data.min_len/max_len")
    if recipe == "balanced":
        return {b: 1.0 / len(inside) for b in inside}
    if recipe == "pool_native":
        total = sum(tokens[b] for b in inside)
        return {b: tokens[b] / total for b in inside}
    raise ValueError(f"recipe {recipe!r}: use balanced, pool_native or target:<len>")


def task_shares(tasks: list[str], task_weights: dict[str, float]) -> dict[str, float]:
    """Weights per task family (or per task name) → per-task shares over the tasks present."""
    w: dict[str, float] = {}
    for name, weight in task_weights.items():
        members = TASK_FAMILIES.get(name, (name,))
        here = [t for t in members if t in tasks]
        for t in here:
            w[t] = w.get(t, 0.0) + float(weight) / len(here)
    w = {t: v for t, v in w.items() if v > 0}
    if not w:
        raise ValueError(f"task_weights {task_weights} select none of the tasks present {tasks}; families: "
                         f"{ {k: list(v) for k, v in TASK_FAMILIES.items()} }")
    total = sum(w.values())
    return {t: v / total for t, v in w.items()}


def with_sources(ps: PoolSet, weights: np.ndarray, sources: list[tuple[PoolSet, float]]) -> tuple[PoolSet, np.ndarray]:
    """The main pools at weight (1 - Σ shares) plus each extra source's pools at its token share, split over its
    pools by their tokens (as the source holds them); pool order: the main's, then each source's."""
    pools, paths, out = list(ps.pools), list(ps.shard_paths), [np.asarray(weights) * (1 - sum(s for _, s in sources))]
    for extra, share in sources:
        base = len(paths)
        for p in extra.pools:
            pools.append(Pool(p.bucket, p.task, p.shard + base, p.offset, p.nbytes, p.n_tokens, p.keys))
        paths += extra.shard_paths
        tokens = np.array([float(p.n_tokens.sum()) for p in extra.pools])
        out.append(share * tokens / tokens.sum())
    merged = PoolSet.__new__(PoolSet)
    merged.pools, merged.shard_paths, merged.edges = pools, paths, ps.edges
    return merged, np.concatenate(out)


def pool_weights(ps: PoolSet, recipe: str, task_weights: dict[str, float], min_len: int, max_len: int):
    """Token share per pool (index into ps.pools), summing to 1."""
    bshare = bucket_shares(ps, recipe, min_len, max_len)
    out = np.zeros(len(ps.pools))
    for b, s in bshare.items():
        idx = [i for i, p in enumerate(ps.pools) if p.bucket == b]
        tshare = task_shares([ps.pools[i].task for i in idx], task_weights)
        for i in idx:
            out[i] = s * tshare.get(ps.pools[i].task, 0.0)
    unused = sorted({p.task for i, p in enumerate(ps.pools) if out[i] == 0 and p.bucket in bshare})
    if unused:
        log.info("mixture: tasks %s have weight 0 under task_weights %s", unused, task_weights)
    return out / out.sum()


class DrawSequence:
    """Pool of global draw g = f(seed, g): cumulative probabilities, sampled in blocks of BLOCK draws."""

    def __init__(self, ps: PoolSet, token_shares: np.ndarray, seed: int):
        mean = np.array([p.n_tokens.mean() if len(p) else 1.0 for p in ps.pools])
        prob = token_shares / mean
        self.prob = prob / prob.sum()
        self.cum = np.cumsum(self.prob)
        self.cum[-1] = 1.0
        self.seed = seed
        self._block = (-1, None)

    def pool_of(self, g: int) -> int:
        b = g // BLOCK
        if self._block[0] != b:
            u = np.random.Generator(np.random.PCG64([self.seed, 0x6D6978, b])).random(BLOCK)
            self._block = (b, np.searchsorted(self.cum, u, side="right"))
        return int(self._block[1][g % BLOCK])


class PoolStream:
    """Item of a pool at stream position s: epoch s // n reshuffled from (seed, pool, epoch)."""

    def __init__(self, ps: PoolSet, seed: int):
        self.ps, self.seed = ps, seed
        self._perm: dict[int, tuple[int, np.ndarray]] = {}

    def item(self, pool: int, s: int) -> int:
        n = len(self.ps.pools[pool])
        epoch, i = divmod(s, n)
        cached = self._perm.get(pool)
        if cached is None or cached[0] != epoch:
            tag = zlib.crc32(self.ps.pools[pool].name.encode())
            perm = np.random.Generator(np.random.PCG64([self.seed, tag, epoch])).permutation(n)
            cached = (epoch, perm)
            self._perm[pool] = cached
        return int(cached[1][i])
