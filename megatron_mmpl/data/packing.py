"""Packing: first-fit-decreasing bins of samples into max_seq_len rows, and the packed micro-batch they become.

Batch contract (b = 1): input_ids [1, s] int64, labels [1, s] int64 (labels[t] = target of position t, -100 where not
supervised), loss_mask [1, s] float32, position_ids [3, 1, s] int64 (3D M-RoPE, per sample from 0),
cu_seqlens [n+1] int32 (sample boundaries, padded lengths), pixel_values [n_patches, C·T·P·P] float32,
image_grid_thw [n_img, 3] int64 (images in order of appearance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


def padded_len(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class PackingBuffer:
    """Holds up to `size` items (length, payload). pop_bin() runs first-fit-decreasing over the buffer and emits the
    fullest bin (the others wait for better partners); a bin holding an item older than `max_wait` pops goes
    first, so no item starves."""

    def __init__(self, max_seq_len: int, size: int = 16, pad_multiple: int = 1, max_wait: int | None = None):
        self.max_seq_len, self.size, self.pad_multiple = max_seq_len, size, pad_multiple
        self.max_wait = max_wait if max_wait is not None else 4 * size
        self.items: list[tuple[int, int, object]] = []  # (padded length, arrival, payload)
        self._arrival = 0
        self._pops = 0
        self._born: dict[int, int] = {}  # arrival -> pop count when it arrived

    def full(self) -> bool:
        return len(self.items) >= self.size

    def add(self, length: int, payload) -> None:
        n = padded_len(length, self.pad_multiple)
        if n > self.max_seq_len:
            raise ValueError(f"item of {length} tokens (padded {n}) exceeds max_seq_len={self.max_seq_len}")
        self.items.append((n, self._arrival, payload))
        self._born[self._arrival] = self._pops
        self._arrival += 1

    def _ffd(self) -> list[list[int]]:
        bins: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(self.items)), key=lambda i: (-self.items[i][0], self.items[i][1])):
            n = self.items[i][0]
            for b in range(len(bins)):
                if n <= room[b]:
                    bins[b].append(i)
                    room[b] -= n
                    break
            else:
                bins.append([i])
                room.append(self.max_seq_len - n)
        return bins

    def pop_bin(self) -> list:
        bins = self._ffd()
        oldest = min(range(len(self.items)), key=lambda i: self.items[i][1])
        if self._pops - self._born[self.items[oldest][1]] >= self.max_wait:
            take = next(b for b in bins if oldest in b)
        else:  # fullest bin; among equals the one with the oldest item
            take = max(bins, key=lambda b: (sum(self.items[i][0] for i in b), -min(self.items[i][1] for i in b)))
        self._pops += 1
        out = [self.items[i][2] for i in sorted(take, key=lambda i: self.items[i][1])]
        keep = set(take)
        for i in take:
            self._born.pop(self.items[i][1])
        self.items = [it for i, it in enumerate(self.items) if i not in keep]
        return out

    def state(self) -> dict:
        return dict(items=[[n, a, p] for n, a, p in self.items], arrival=self._arrival, pops=self._pops,
                    born=[[a, b] for a, b in self._born.items()])

    def load(self, st: dict) -> None:
        self.items = [(int(n), int(a), p) for n, a, p in st["items"]]
        self._arrival, self._pops = int(st["arrival"]), int(st["pops"])
        self._born = {int(a): int(b) for a, b in st["born"]}


@dataclass
class ProcessedSample:
    """One sample ready to pack: ids/answer mask/positions [3, L], its images' patches and grids."""

    input_ids: np.ndarray  # [L] int64
    answer_mask: np.ndarray  # [L] bool: token t is part of an assistant answer (incl. its <|im_end|>)
    position_ids: torch.Tensor  # [3, L] int64
    pixel_values: np.ndarray  # [n_patches, D] float32
    image_grid_thw: np.ndarray  # [n_img, 3] int64
    key: str = ""
    task: str = ""


def collate_packed(samples: list[ProcessedSample], pad_id: int, pad_multiple: int = 1,
                   pad_to: int | None = None, patch_dim: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate samples into one packed row. Each sample is padded to a multiple of `pad_multiple`
    (2·CP·TP for context/sequence parallel); with `pad_to`, a final padding segment fills the row to that length."""
    ids, labels, pos, lens = [], [], [], []
    for s in samples:
        n = len(s.input_ids)
        pn = padded_len(n, pad_multiple)
        x = np.full(pn, pad_id, np.int64)
        x[:n] = s.input_ids
        y = np.full(pn, IGNORE, np.int64)
        sup = s.answer_mask[1:]  # position t predicts token t+1; never across the sample end
        y[: n - 1] = np.where(sup, s.input_ids[1:], IGNORE)
        p = torch.empty(3, pn, dtype=torch.long)
        p[:, :n] = s.position_ids
        if pn > n:  # pad tokens continue the text positions
            p[:, n:] = s.position_ids[:, -1:].max() + 1 + torch.arange(pn - n)
        ids.append(x), labels.append(y), pos.append(p), lens.append(pn)
    total = sum(lens)
    if pad_to is not None and total < pad_to:
        k = pad_to - total
        ids.append(np.full(k, pad_id, np.int64)), labels.append(np.full(k, IGNORE, np.int64))
        pos.append(torch.arange(k).expand(3, k).clone()), lens.append(k)
    input_ids = torch.from_numpy(np.concatenate(ids))[None]
    lab = torch.from_numpy(np.concatenate(labels))[None]
    pvs = [s.pixel_values for s in samples if len(s.pixel_values)]
    grids = [s.image_grid_thw for s in samples if len(s.image_grid_thw)]
    dim = patch_dim if patch_dim is not None else (pvs[0].shape[1] if pvs else 0)
    return dict(
        input_ids=input_ids,
        labels=lab,
        loss_mask=(lab != IGNORE).float(),
        position_ids=torch.cat(pos, dim=1)[:, None, :],
        cu_seqlens=torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32),
        pixel_values=torch.from_numpy(np.concatenate(pvs)) if pvs else torch.zeros(0, dim),
        image_grid_thw=torch.from_numpy(np.concatenate(grids).astype(np.int64)) if grids
        else torch.zeros(0, 3, dtype=torch.long),
    )
