"""Write a random-weight Qwen2.5-VL checkpoint in HF format, tensor by tensor (no full model in memory).

Used by the conversion benchmark (3B/7B shapes) and handy for GPU parity runs. The shapes come from a
transformers model built on the meta device from one of our presets, so they are exactly what HF expects.

    python benchmarks/make_random_hf_checkpoint.py --preset qwen25vl-3b --dtype bf16 --out /tmp/hf-3b
"""

from __future__ import annotations

import argparse
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

    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.conversion.safetensors_shards import write_sharded_safetensors
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
    dtype = DTYPES[args.dtype]

    def tensors():
        for name, shape in shapes.items():
            if name.endswith("norm.weight") or ".ln_q." in name:
                yield name, torch.ones(shape, dtype=dtype)
            else:
                yield name, (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    written = write_sharded_safetensors(tensors(), out, int(args.shard_gb * 2**30))
    cfg.save_pretrained(out)
    print(f"wrote {written['tensors']} tensors, {written['bytes'] / 2**30:.2f} GiB in {written['shards']} shard(s) "
          f"to {out}")


if __name__ == "__main__":
    main()
