"""`mmpl convert hf-to-mcore | mcore-to-hf | verify` (also `tools/checkpoint_conversion/convert.py`)."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face ⇄ Megatron-Core checkpoints, exact and verified")
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    s = p.add_subparsers(dest="convert_command", required=True)
    a = s.add_parser("hf-to-mcore", help="HF safetensors → TP1/PP1 torch_dist dist checkpoint")
    a.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    a.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (default bf16)")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once conversion succeeds")
    a.set_defaults(func=_hf_to_mcore)
    b = s.add_parser("mcore-to-hf", help="a dist checkpoint (any TP/PP) → HF safetensors directory")
    b.add_argument("--ckpt", required=True, help="a run's checkpoint dir (latest is used) or one dist checkpoint")
    b.add_argument("--out", required=True)
    b.add_argument("--hf-config", default=None, help="preset name or config.json dir, if the checkpoint lacks one")
    b.add_argument("--tokenizer", default=None, help="qwen2 | tiny | <hf dir> | none, if the checkpoint carries none")
    b.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the config's torch_dtype)")
    b.add_argument("--naming", choices=("original", "hf"), default=None,
                   help="tensor names: original (model.*, visual.*) or hf (model.language_model.*); "
                        "default: as the converted source, else original")
    b.add_argument("--shard-gb", type=float, default=5.0, help="max size of one safetensors shard")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_mcore_to_hf)
    v = s.add_parser("verify", help="logits of the HF and the MCore checkpoint on a built-in multi-image prompt")
    v.add_argument("--hf", required=True)
    v.add_argument("--ckpt", required=True)
    v.add_argument("--tp", type=int, default=1)
    v.add_argument("--pp", type=int, default=1)
    v.add_argument("--tol", type=float, default=1e-4, help="max |Δlogit| allowed (fp32); exit 1 above it")
    v.set_defaults(func=_verify)


def _hf_to_mcore(args) -> int:
    from megatron_mmpl.conversion.import_hf import hf_to_mcore

    s = hf_to_mcore(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(f"wrote {s['tensors']} tensors ({s['dtype']}) to {args.out} in {s['seconds']} s")
    return 0


def _mcore_to_hf(args) -> int:
    from megatron_mmpl.conversion.export_hf import mcore_to_hf

    s = mcore_to_hf(args.ckpt, args.out, hf_config_path=args.hf_config, dtype=args.dtype, tokenizer=args.tokenizer,
                    naming=args.naming, shard_gb=args.shard_gb, overwrite=args.overwrite,
                    progress=sys.stderr.isatty())
    print(f"exported {s['tensors']} tensors ({s['bytes'] / 2**20:.1f} MiB, {s['shards']} shard(s)) from "
          f"{s['checkpoint']} to {s['out']}")
    return 0


def _verify(args) -> int:
    from megatron_mmpl.conversion.verify import verify

    r = verify(args.hf, args.ckpt, tp=args.tp, pp=args.pp)
    print(f"max_abs_logit_diff={r['max_abs_logit_diff']:.3e} cosine={r['cosine']:.8f} "
          f"argmax_agree={r['argmax_agree']:.4f}")
    return 0 if r["max_abs_logit_diff"] <= args.tol else 1


def main(argv=None) -> int:
    """Standalone entry (tools/checkpoint_conversion/convert.py)."""
    from megatron_mmpl.cli import run_handler  # lazy: cli imports this module (a cycle at module level)

    p = argparse.ArgumentParser(prog="convert", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_handler(p.parse_args(argv), "convert")
