"""HF → Megatron-Core: stream an HF Qwen2.5-VL checkpoint into a TP1/PP1 torch_dist dist checkpoint.

Memory: one copy of the weights (see conversion/dist_layout.py); no model is built.

Output layout (what `checkpoint.load=` and `mmpl convert mcore-to-hf|verify` read):
    <out>/metadata.json, common.pt, *.distcp   dist checkpoint of {"model": model.sharded_state_dict()}
    <out>/mmpl/hf/                             config.json + tokenizer/processor files (rebuilds model and processor)
    <out>/mmpl/conversion.json                 source, dtype, tensor count
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from megatron_mmpl.conversion import dist_layout
from megatron_mmpl.conversion.hf_checkpoint import HFCheckpoint
from megatron_mmpl.models.qwen25vl import hf_mapping as mapping
from megatron_mmpl.models.qwen25vl.spec import ModelSpec
from megatron_mmpl.storage.atomic import atomic_directory, check_target
from megatron_mmpl.storage.checkpoint_dir import HF_DIR, SIDE_FILES
from megatron_mmpl.storage.integrity import write_manifest

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_source_dtypes(ckpt: HFCheckpoint) -> str:
    """The checkpoint's one floating dtype (safetensors name); mixed or non-float weights are refused."""
    dtypes = ckpt.dtypes()
    if not dtypes <= {"BF16", "F16", "F32", "F64"} or len(dtypes) != 1:
        raise ValueError(
            f"--hf {ckpt.path}: weights have dtypes {sorted(map(str, dtypes))}; expected one floating dtype "
            "(bf16, fp16 or fp32) — quantised or mixed checkpoints are not supported, dequantise first"
        )
    return next(iter(dtypes))


def hf_to_mcore(hf_dir: str, out_dir: str, dtype: str = "bf16", overwrite: bool = False, progress: bool = True) -> dict:
    """Convert; returns a summary dict. Writes nothing at `out_dir` unless the whole conversion succeeds."""
    from megatron.core import dist_checkpointing
    from tqdm import tqdm


    t0 = time.time()
    target = parse_dtype(dtype)
    check_target(out_dir, overwrite)
    ckpt = HFCheckpoint(hf_dir)
    source_dtype = check_source_dtypes(ckpt)
    hf_config = ckpt.hf_config()
    spec = ModelSpec.from_hf(hf_config)
    stream = mapping.hf_to_mcore(ckpt, spec)  # checks coverage before reading any tensor
    sharded, params = dist_layout.meta_layout(spec, target)
    expected = set(mapping.mcore_names(spec))
    if set(params) != expected:
        raise ValueError(
            f"model/mapping mismatch: parameters without a rule {sorted(set(params) - expected)}, "
            f"rules without a parameter {sorted(expected - set(params))}"
        )
    filler = dist_layout.Filler(sharded, params)
    for name, tensor in tqdm(stream, total=len(expected), desc="hf→mcore", unit="tensor", disable=not progress):
        filler.fill(name, tensor)
        del tensor
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        dist_checkpointing.save({"model": filler.state_dict()}, str(tmp))
        hf_out = tmp / HF_DIR
        hf_out.mkdir(parents=True)
        hf_config.save_pretrained(hf_out)
        for f in SIDE_FILES:
            if (ckpt.path / f).is_file():
                shutil.copy2(ckpt.path / f, hf_out / f)
        summary = {
            "source": str(Path(hf_dir).resolve()), "source_dtype": str(source_dtype), "dtype": dtype,
            "naming": mapping.detect_naming(ckpt.names()),
            "tensors": len(filler.filled), "seconds": round(time.time() - t0, 1),
        }
        (tmp / "mmpl" / "conversion.json").write_text(json.dumps(summary, indent=2))
        write_manifest(str(tmp))  # checksums, checked by `mcore-to-hf`
    return summary
