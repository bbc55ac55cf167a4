"""Small shard sets for loader tests: visual-needle samples (fast to make) in three length buckets and two tasks."""

from pathlib import Path

from megatron_mmpl.data.images import ImageProcessor
from megatron_mmpl.data.needle import needle_sample
from megatron_mmpl.data.shards import ShardWriter
from megatron_mmpl.data.tokenizer import build_tiny_tokenizer, special_ids, tokenizer_fingerprint

EDGES = [256, 512, 1024]


def make_needle_shards(out: Path, per_pool: int = 6, targets=(256, 512, 1024), seed: int = 0) -> Path:
    """`per_pool` samples per (bucket, task) for tasks extract_single and reason (relabelled needles)."""
    tok, improc = build_tiny_tokenizer(), ImageProcessor()
    info = dict(tokenizer=tokenizer_fingerprint(tok), tokenizer_name="tiny", special_ids=special_ids(tok).to_dict(),
                image_processor=improc.cfg.to_dict())
    w = ShardWriter(out, bucket_edges=EDGES, info=info, shard_bytes=40_000)  # small shards: several per pool
    for t in targets:
        for task in ("extract_single", "reason"):
            for i in range(per_pool):
                s = needle_sample(f"n-{task}-{t}-{i}", t, tok, improc, seed)
                s.task = task
                w.add(s)
    w.close()
    return out
