"""One console line per log interval, plus TensorBoard (always), W&B (if configured), metrics.jsonl, losses.tsv
(every step) and a tqdm bar on a terminal."""

from __future__ import annotations

import json
import os
import sys

from megatron_mmpl.storage.atomic import atomic_write

FORMATS = [
    ("loss", "loss {:.4f}"), ("lr", "lr {:.3e}"), ("grad_norm", "grad {:.3f}"), ("tokens_per_s", "tok/s {:,.0f}"),
    ("tflops_per_gpu", "TFLOP/s/GPU {:.3g}"), ("mfu", "MFU {:.1%}"),
    ("hfu", "HFU {:.1%}"),  # LM + ViT with the forward work recompute reruns (training/flops.py)
    ("max_mem_gib", "mem {:.2f} GiB"), ("data_wait", "data {:.1%}"), ("bad_steps", "non-finite steps {:d}"),
    ("skipped_long", "skipped {:,} over-long"), ("skipped_corrupt", "skipped {:,} undecodable"),
]
OPTIONAL = ("bad_steps", "skipped_long", "skipped_corrupt")  # printed only when not zero


def format_line(step: int, total: int, metrics: dict) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in FORMATS:
        if metrics.get(key) is not None and not (key in OPTIONAL and not metrics[key]):
            parts.append(fmt.format(metrics[key]))
            if key == "tflops_per_gpu" and metrics.get("vit_tflops_per_gpu") is not None:
                parts[-1] += f" + ViT {metrics['vit_tflops_per_gpu']:.3g}"
            if key == "mfu" and metrics.get("vit_mfu") is not None:
                parts[-1] += f" + ViT {metrics['vit_mfu']:.1%}"
    return " | ".join(parts)


def truncate_after(path: str, step: int, step_of) -> None:
    """Drop the lines of `path` logged after `step` (and unreadable ones: a line cut by a kill), atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if line.endswith("\n") and step_of(line) <= step:
                keep.append(line)
        except (ValueError, KeyError, IndexError):
            pass
    if len(keep) != len(lines):
        atomic_write(path, "".join(keep))


class RunLogger:
    """Writes only on the rank given `writer=True` (global rank 0); other ranks get a no-op logger."""

    def __init__(self, cfg, writer: bool, total_steps: int, start_step: int):
        self.writer, self.total = writer, total_steps
        self.tb = self.wandb = self.bar = None
        self.jsonl = None
        if not writer:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        jsonl, losses = os.path.join(cfg.run_dir, "metrics.jsonl"), os.path.join(cfg.run_dir, "losses.tsv")
        truncate_after(jsonl, start_step, lambda line: json.loads(line)["step"])  # a resume redoes later steps
        truncate_after(losses, start_step, lambda line: int(line.split("\t", 1)[0]))
        self.jsonl = open(jsonl, "a")
        self.losses = open(losses, "a")  # every step: step <tab> loss
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(cfg.tensorboard_dir)
        if cfg.logging.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project,
                                    name=cfg.logging.wandb_name or os.path.basename(os.path.abspath(cfg.run_dir)),
                                    dir=cfg.run_dir, resume="allow")
        if cfg.logging.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def log(self, step: int, metrics: dict) -> None:
        if not self.writer:
            return
        line = format_line(step, self.total, metrics)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        clean = {k: v for k, v in metrics.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        for k, v in clean.items():
            self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in clean.items()}, step=step)

    def advance(self, step: int, loss: float) -> None:
        if not self.writer:
            return
        self.losses.write(f"{step}\t{loss:.6f}\n")
        self.losses.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def print(self, msg: str) -> None:
        if self.writer:
            (self.bar.write if self.bar is not None else print)(msg)
            sys.stdout.flush()

    def close(self) -> None:
        if not self.writer:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.flush()
        self.tb.close()
        self.jsonl.close()
        self.losses.close()
        if self.wandb is not None:
            self.wandb.finish()
