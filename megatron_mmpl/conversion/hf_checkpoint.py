"""Read a Hugging Face Qwen2.5-VL checkpoint directory lazily, tensor by tensor (safetensors, single or sharded)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_mmpl.errors import reading

SUPPORTED_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


class HFCheckpoint:
    """An HF checkpoint directory: its config and a lazy name → tensor view over its safetensors shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"--hf {self.path}: not a directory; pass a Hugging Face checkpoint directory")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"--hf {self.path}: no config.json; is this a Hugging Face model directory?")
        self.config_dict = json.loads(cfg_file.read_text())
        archs = self.config_dict.get("architectures") or []
        mtype = self.config_dict.get("model_type")
        if mtype not in SUPPORTED_MODEL_TYPES and not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise ValueError(
                f"--hf {self.path}: unsupported architecture {archs or mtype!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in files.values() if not (self.path / f).is_file()})
            if missing:
                raise FileNotFoundError(
                    f"--hf {self.path}: shard(s) listed in model.safetensors.index.json are missing: {missing}; "
                    "re-download the checkpoint"
                )
            return {name: self.path / f for name, f in files.items()}
        single = self.path / "model.safetensors"
        if single.is_file():
            from safetensors import safe_open

            with reading(single), safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        if list(self.path.glob("*.bin")):
            raise ValueError(
                f"--hf {self.path}: only PyTorch .bin weights found; re-save with safetensors "
                "(model.save_pretrained(dir, safe_serialization=True))"
            )
        raise FileNotFoundError(f"--hf {self.path}: no model.safetensors or model.safetensors.index.json")

    def hf_config(self):
        """The transformers config object."""
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig.from_pretrained(self.path)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard without loading the others."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise KeyError(f"{name!r} is not in {self.path}")
        with reading(self.weight_map[name]), safe_open(self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors, shard by shard (each shard opened once)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with reading(file), safe_open(file, framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)

    def dtypes(self) -> set[str]:
        """The safetensors dtype names of the weights (e.g. {"BF16"}), read from headers only."""
        from safetensors import safe_open

        out = set()
        for file in set(self.weight_map.values()):
            with reading(file), safe_open(file, framework="pt") as f:
                for name in f.keys():
                    out.add(f.get_slice(name).get_dtype())
        return out
