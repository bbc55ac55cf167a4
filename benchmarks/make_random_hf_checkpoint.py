"""Write a random-weight Qwen2.5-VL checkpoint in HF format, tensor by tensor (no full model in memory).

Used by the conversion benchmark (3B/7B shapes) and handy for GPU parity runs. The shapes come from a
transformers model built on the meta device from one of our presets, so they are exactly what HF expects.

    python benchmarks/make_random_hf_checkpoint.py --preset qwen25vl-3b --dtype bf16 --out /tmp/hf-3b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen25vl-3b", help="a name from megatron_mmpl.models.qwen25vl presets")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-gb", type=float, default=4.0, help="target size of one safetensors shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.models.qwen25vl import presets

    cfg = presets.hf_config_from_preset(args.preset)
    cfg.dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    with torch.device("meta"):
        meta = Qwen2_5_VLForConditionalGeneration(cfg)
    shapes = {n: t.shape for n, t in meta.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    dtype, limit = DTYPES[args.dtype], int(args.shard_gb * 2**30)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        if name.endswith("norm.weight") or ".ln_q." in name:
            t = torch.ones(shape, dtype=dtype)
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= limit:
            flush()
    flush()
    total = sum((out / f).stat().st_size for f in files)
    n = len(files)
    final = {f: f.replace(".safetensors", f"-of-{n:05d}.safetensors") for f in files}
    for f, g in final.items():
        (out / f).rename(out / g)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(out)
    print(f"wrote {len(shapes)} tensors, {total / 2**30:.2f} GiB in {n} shard(s) to {out}")


if __name__ == "__main__":
    main()
