"""TEMPORARY stand-in for the data pipeline's loader (megatron_mmpl/data), removed once it lands.

Deterministic packed rows in the batch contract: each sample is text + one image + text, supervised on its last
tokens; `distinct` > 0 cycles over that many rows (a small fixed set).
"""

from __future__ import annotations

import torch

from megatron_mmpl.models.qwen25vl.testing import mm_prompt


class SyntheticPackedBatches:
    def __init__(self, hf, samples_per_row: int = 2, seed: int = 0, dp_rank: int = 0, distinct: int = 0):
        self.hf, self.samples_per_row, self.seed, self.dp_rank, self.distinct = hf, samples_per_row, seed, dp_rank, \
            distinct
        self.index = 0

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        i = self.index % self.distinct if self.distinct else self.index
        self.index += 1
        base = (self.seed * 1_000_003 + self.dp_rank * 10_007 + i) * self.samples_per_row
        rows = [mm_prompt(self.hf, [6, ("image", 1, 4, 4), 6], seed=base + j) for j in range(self.samples_per_row)]
        ids = torch.cat([r["input_ids"] for r in rows], dim=1)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros(ids.shape, dtype=torch.float32)
        cu, start = [0], 0
        for r in rows:
            n = r["input_ids"].shape[1]
            # answer = the last 4 tokens; labels[t] = token t+1 within the sample
            labels[0, start + n - 5: start + n - 1] = ids[0, start + n - 4: start + n]
            mask[0, start + n - 5: start + n - 1] = 1.0
            start += n
            cu.append(start)
        return {
            "input_ids": ids, "labels": labels, "loss_mask": mask,
            "position_ids": torch.cat([r["position_ids"] for r in rows], dim=2),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
            "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows]),
        }
