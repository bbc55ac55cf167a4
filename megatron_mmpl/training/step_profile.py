"""Where a training step's GPU time goes: CUDA-event phase times (ViT forward, LM forward, LM backward, ViT
backward, optimizer) and an optional torch.profiler trace of chosen steps (`logging.profile_steps`)."""

from __future__ import annotations

import os
import re

import torch
from torch.profiler import ProfilerActivity, profile

PHASES = ("vit_fwd", "lm_fwd", "lm_bwd", "vit_bwd", "optimizer")


class PhaseTimer:
    """CUDA events at phase boundaries, from module hooks: ViT forward start/end (= LM forward start), LM forward
    end, the gradient reaching the ViT output (LM backward done) and the patch embedding output (ViT backward
    done); the trainer marks the optimizer step. Summed over the step's micro-batches; read once per step."""

    def __init__(self, module):
        self.marks: dict[str, list] = {}
        self.handles = []
        vit = getattr(module, "vision_model", None)
        if vit is not None:
            self.handles.append(vit.register_forward_pre_hook(lambda m, a: self.mark("vit_f0")))
            self.handles.append(vit.register_forward_hook(self._vit_out))
            self.handles.append(vit.patch_embed.register_forward_hook(self._patch_out))
        self.handles.append(module.language_model.register_forward_pre_hook(lambda m, a, k: self.mark("lm_f0"),
                                                                            with_kwargs=True))
        self.handles.append(module.language_model.register_forward_hook(lambda m, a, o: self.mark("lm_f1")))

    def mark(self, name: str) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.marks.setdefault(name, []).append(ev)

    def _vit_out(self, module, args, out):
        self.mark("vit_f1")
        if out.requires_grad:
            out.register_hook(lambda g: self.mark("vit_b0"))

    def _patch_out(self, module, args, out):
        if out.requires_grad and torch.is_grad_enabled():
            out.register_hook(lambda g: self.mark("vit_b1"))

    def reset(self) -> None:
        self.marks = {}

    def seconds(self) -> dict[str, float]:
        """Phase times of the step just finished (synchronises)."""
        torch.cuda.synchronize()
        m = self.marks

        def span(a: str, b: str, last: bool = False) -> float:
            if a not in m or b not in m:
                return 0.0
            ends = m[b] if not last else [m[b][-1]]
            return sum(x.elapsed_time(y) for x, y in zip(m[a], ends)) / 1e3

        out = {"vit_fwd": span("vit_f0", "vit_f1"), "lm_fwd": span("lm_f0", "lm_f1")}
        # backward: LM from the end of its forward to the gradient at the ViT output, then the ViT's rest
        out["lm_bwd"] = span("lm_f1", "vit_b0") if "vit_b0" in m else 0.0
        out["vit_bwd"] = span("vit_b0", "vit_b1", last=True) if "vit_b1" in m else 0.0
        out["optimizer"] = span("opt0", "opt1")
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def start_profiler(run_dir: str):
    """A torch.profiler session (CPU + CUDA activity, shapes) that `stop_profiler` writes out."""

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=acts, record_shapes=False, with_stack=False)
    prof.__enter__()
    return prof


# Kernel classes by name, first match wins (cuBLAS/CUTLASS GEMMs, cuDNN/flash attention, Triton from
# torch.compile, the optimizer's multi-tensor kernels, data movement, the rest of ATen's elementwise work).
KERNEL_CLASSES = (
    # attention/qkv_rope_backward.py, attention/window_attention.py, compat/swiglu.py
    ("ours (Triton)", r"^(qkv_rope_grad_kernel|window_attention_kernel|swiglu_(fwd|bwd)_kernel)$"),
    ("attention", r"fmha|flash|sdpa|attention|_attn"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|matmul|wgmma"),
    ("optimizer", r"multi_tensor|adam"),
    ("triton (compiled)", r"^triton_"),
    ("norm", r"norm"),
    ("copy / cat / gather", r"memcpy|memset|copy|cat|gather|scatter|index|transpose|permute"),
    ("reduction", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
)


def kernel_class(name: str) -> str:
    """The class of one GPU kernel or memory operation, by its name."""
    low = name.lower()
    return next((cls for cls, pattern in KERNEL_CLASSES if re.search(pattern, low)), "other")


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time the GPU ran at least one kernel."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize_kernels(kernels: list[tuple[str, float, float]], steps: int) -> str:
    """kernels: (name, start µs, end µs) of every GPU kernel in the profiled steps → a table of kernel classes
    (share of kernel time, ms per step) and the GPU's busy share of the profiled span (the rest: host work,
    syncs and launch gaps)."""
    if not kernels:
        return "no GPU kernels recorded\n"
    per: dict[str, float] = {}
    for name, a, b in kernels:
        cls = kernel_class(name)
        per[cls] = per.get(cls, 0.0) + (b - a)
    total = sum(per.values())
    span = max(b for _, _, b in kernels) - min(a for _, a, _ in kernels)
    busy = busy_time([(a, b) for _, a, b in kernels])
    lines = ["| kernel class | share of kernel time | ms per step |", "|---|---:|---:|"]
    lines += [f"| {c} | {t / total:.1%} | {t / 1e3 / steps:.1f} |" for c, t in sorted(per.items(), key=lambda x: -x[1])]
    lines.append(f"\nGPU busy {busy / 1e3 / steps:.1f} ms of {span / 1e3 / steps:.1f} ms per step "
                 f"({busy / span:.1%}); idle (host work, syncs, launch gaps) {1 - busy / span:.1%}")
    return "\n".join(lines) + "\n"


def idle_gaps(kernels: list[tuple[str, float, float]], host: list[tuple[str, float, float]] = (),
              count: int = 10) -> list[tuple[float, str, str, str]]:
    """The `count` longest stretches where no GPU kernel ran, longest first: (µs, the kernel that ended it before,
    the kernel that started after, the host call that overlapped it most, e.g. a cudaStreamSynchronize or a
    launch; "" if none). kernels and host: (name, start µs, end µs)."""
    gaps, end, last = [], float("-inf"), ""
    for name, a, b in sorted(kernels, key=lambda k: k[1]):
        if a > end and last:
            gaps.append((a - end, end, a, last, name))
        if b > end:
            end, last = b, name
    gaps = sorted(gaps, key=lambda g: -g[0])[:count]

    def overlap(g0, g1):
        best = max(((min(b, g1) - max(a, g0), n) for n, a, b in host), default=(0.0, ""))
        return best[1] if best[0] > 0 else ""

    return [(gap, before, after, overlap(g0, g1)) for gap, g0, g1, before, after in gaps]


def summarize_gaps(kernels: list[tuple[str, float, float]], host: list[tuple[str, float, float]],
                   count: int = 12) -> str:
    """`idle_gaps` as a markdown table."""
    lines = ["| GPU idle µs | after kernel | before kernel | host call overlapping most |", "|---:|---|---|---|"]
    lines += [f"| {gap:,.0f} | {before[:60]} | {after[:60]} | {call[:40]} |"
              for gap, before, after, call in idle_gaps(kernels, host, count)]
    return "\n".join(lines) + "\n"


def stop_profiler(prof, run_dir: str, steps: int) -> str:
    """Writes <run_dir>/profile/trace.json (chrome://tracing, Perfetto) and kernels.txt (kernel classes and the
    GPU's busy share per step, its longest idle stretches, then the top ops by device time); returns its path."""
    prof.__exit__(None, None, None)
    out = os.path.join(run_dir, "profile")
    os.makedirs(out, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out, "trace.json"))
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90)
    events = [(e.name, e.time_range.start, e.time_range.end, e.device_type) for e in prof.events()]
    cpu = torch.autograd.DeviceType.CPU
    device = [(n, a, b) for n, a, b, t in events if t != cpu]
    host = [(n, a, b) for n, a, b, t in events if t == cpu and n.startswith(("cuda", "cu"))]  # runtime calls
    classes, gaps = summarize_kernels(device, steps), summarize_gaps(device, host) if device else ""
    path = os.path.join(out, "kernels.txt")
    with open(path, "w") as f:
        f.write(f"# torch.profiler over {steps} step(s)\n\n{classes}\n# longest GPU idle stretches\n{gaps}\n"
                f"# ops sorted by {key}\n{table}\n")
    return path
