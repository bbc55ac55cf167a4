"""Kernel classes of a torch.profiler chrome trace (a `logging.profile_steps` trace.json, or any other): share of
GPU kernel time per class and the GPU's busy share of the traced span, as `mmpl train` writes into kernels.txt.

    python benchmarks/profile_classes.py runs/x/profile/trace.json[.gz] --steps 2
"""

from __future__ import annotations

import argparse
import gzip
import json

from megatron_mmpl.training.step_profile import summarize_kernels

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def trace_kernels(path: str) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every GPU event in a chrome trace."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
            if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=1, help="steps the trace covers (for per-step figures)")
    args = p.parse_args(argv)
    print(summarize_kernels(trace_kernels(args.trace), args.steps))


if __name__ == "__main__":
    main()
