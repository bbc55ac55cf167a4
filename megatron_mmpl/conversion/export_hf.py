"""Megatron-Core → HF: any dist checkpoint written by training (any TP/PP) or by `hf-to-mcore` → a directory that
`Qwen2_5_VLForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load.

One process reads the checkpoint a layer at a time into the TP1/PP1 layout (conversion/dist_layout.py);
torch DCP reassembles each chunk from whatever layout was saved. Memory: one layer plus one output shard (--shard-gb).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_mmpl.conversion import dist_layout
from megatron_mmpl.conversion.import_hf import parse_dtype
from megatron_mmpl.conversion.safetensors_shards import write_sharded_safetensors
from megatron_mmpl.models.qwen25vl import hf_mapping as mapping
from megatron_mmpl.models.qwen25vl.presets import load_hf_dict
from megatron_mmpl.models.qwen25vl.spec import ModelSpec
from megatron_mmpl.storage.atomic import atomic_directory, check_target
from megatron_mmpl.storage.checkpoint_dir import HF_DIR, SIDE_FILES, resolve_checkpoint
from megatron_mmpl.storage.integrity import CheckpointCorrupt, verify_checkpoint


def model_source(ckpt: Path, override: str | None = None):
    """(HF config, dir with tokenizer/processor files or None, run config dict or {}) of a checkpoint: from
    --hf-config, else the converter's copy (mmpl/hf/), else the training run's resolved config (mmpl/config.yaml)."""
    from transformers import Qwen2_5_VLConfig


    run = {}
    if (ckpt / "mmpl" / "config.yaml").is_file():
        import yaml

        run = yaml.safe_load((ckpt / "mmpl" / "config.yaml").read_text()) or {}
    spec = override or (str(ckpt / HF_DIR) if (ckpt / HF_DIR / "config.json").is_file() else None)
    spec = spec or run.get("model", {}).get("hf_config")
    if not spec:
        raise FileNotFoundError(
            f"{ckpt}: cannot tell which model it holds (no {HF_DIR}/config.json, no mmpl/config.yaml); "
            "pass --hf-config <preset name or config.json dir>"
        )
    return Qwen2_5_VLConfig(**load_hf_dict(spec)), _dir_of(spec), run


def _dir_of(spec: str) -> Path | None:
    p = Path(spec)
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    return None


def mcore_to_hf(ckpt_dir: str, out_dir: str, hf_config_path: str | None = None, dtype: str | None = None,
                tokenizer: str | None = None, naming: str | None = None, shard_gb: float = 5.0,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Export; returns a summary. Nothing appears at `out_dir` unless the whole export succeeds.

    naming: tensor names to write — 'original' (`model.*`/`visual.*`, what the released checkpoints and
    transformers' save_pretrained use) or 'hf' (`model.language_model.*`); default: the converted source's.
    """
    from tqdm import tqdm


    check_target(out_dir, overwrite)
    ckpt = Path(resolve_checkpoint(ckpt_dir))
    try:
        verify_checkpoint(str(ckpt))  # a checkpoint without manifest (older) is exported with a warning
    except CheckpointCorrupt as e:
        raise CheckpointCorrupt(f"{e}; refusing to export it: pass --ckpt of an intact one (an older "
                                "<run>/checkpoints/iter_N, or a fresh `mmpl convert hf-to-mcore`)") from None
    hf_config, side_dir, run = model_source(ckpt, hf_config_path)
    tokenizer = tokenizer or run.get("data", {}).get("tokenizer")
    target = parse_dtype(dtype) if dtype else _dtype_of(hf_config)
    spec = ModelSpec.from_hf(hf_config)
    sharded, params = dist_layout.meta_layout(spec, target)
    reader = dist_layout.GroupReader(ckpt, sharded, params)
    conv = ckpt / "mmpl" / "conversion.json"
    naming = naming or (json.loads(conv.read_text()).get("naming") if conv.is_file() else None) or "original"
    stream = mapping.mcore_to_hf(reader.get, spec, names=reader.names, naming=naming)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        n_hf = sum(len(e.hf) for e in mapping.plan(spec, naming))
        tensors = ((name, t.to(target)) for name, t in stream)
        written = write_sharded_safetensors(
            tqdm(tensors, total=n_hf, desc="mcore→hf", unit="tensor", disable=not progress), tmp,
            int(shard_gb * 2**30))
        hf_config.dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(target, "float32")
        hf_config.save_pretrained(tmp)
        _write_side_files(tmp, side_dir, hf_config, tokenizer)
    return {"checkpoint": str(ckpt), **written, "out": str(out_dir)}


def _dtype_of(hf_config) -> torch.dtype:
    name = str(getattr(hf_config, "dtype", None) or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name.replace("torch.", ""), torch.float32)


def _write_side_files(out: Path, side_dir: Path | None, hf_config, tokenizer: str | None) -> None:
    """Tokenizer/processor/generation files: copied from the source when it has them, else generated."""
    copied = set()
    if side_dir is not None:
        for f in SIDE_FILES:
            if (side_dir / f).is_file():
                shutil.copy2(side_dir / f, out / f)
                copied.add(f)
    if "generation_config.json" not in copied:
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=getattr(hf_config, "bos_token_id", None),
                         eos_token_id=getattr(hf_config, "eos_token_id", None)).save_pretrained(out)
    if not ({"tokenizer.json", "vocab.json"} & copied) and tokenizer != "none":
        if not tokenizer:
            raise ValueError(
                "the checkpoint carries no tokenizer files and its run config names no data.tokenizer; pass "
                "--tokenizer qwen2 | tiny | <hf dir> | none (the first three make the export load with AutoProcessor; "
                "none writes weights and config only)"
            )
        from megatron_mmpl.data.processor_files import write_processor_files

        write_processor_files(out, hf_config, tokenizer)
