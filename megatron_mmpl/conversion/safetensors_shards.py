"""Write (name, tensor) pairs as Hugging Face sharded safetensors: model-0000i-of-0000N.safetensors + index."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch


def write_sharded_safetensors(items: Iterable[tuple[str, torch.Tensor]], out: Path, shard_bytes: int) -> dict:
    """Stream tensors into shards of about `shard_bytes` (one shard in memory at a time); returns
    {"tensors", "bytes", "shards"}. Writes model.safetensors.index.json last."""
    from safetensors.torch import save_file

    out = Path(out)
    shard, size, files, weight_map, total, count = {}, 0, [], {}, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, t in items:
        t = t.contiguous()
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        count += 1
        if size >= shard_bytes:
            flush()
    flush()
    final = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for f, g in final.items():
        (out / f).rename(out / g)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"tensors": count, "bytes": total, "shards": len(files)}
