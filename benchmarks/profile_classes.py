"""Kernel classes of a torch.profiler chrome trace (a `logging.profile_steps` trace.json, or any other): share of
GPU kernel time per class and the GPU's busy share of the traced span, as `mmpl train` writes into kernels.txt;
with --gaps N, the N longest stretches where the GPU ran nothing, with the kernels around each and the host call
that overlapped it most (where a sync or a slow launch shows).

    python benchmarks/profile_classes.py runs/x/profile/trace.json[.gz] --steps 2 [--gaps 15]
"""

from __future__ import annotations

import argparse
import gzip
import json

from megatron_mmpl.training.step_profile import summarize_gaps, summarize_kernels

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cuda_runtime", "cuda_driver")


def trace_events(path: str, categories=GPU_CATEGORIES) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every complete event of these categories in a chrome trace (default: the GPU's)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
            if e.get("ph") == "X" and e.get("cat") in categories]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=1, help="steps the trace covers (for per-step figures)")
    p.add_argument("--gaps", type=int, default=0, help="list the N longest GPU idle stretches")
    args = p.parse_args(argv)
    kernels = trace_events(args.trace)
    print(summarize_kernels(kernels, args.steps))
    if args.gaps:
        print(summarize_gaps(kernels, trace_events(args.trace, HOST_CATEGORIES), args.gaps))


if __name__ == "__main__":
    main()
