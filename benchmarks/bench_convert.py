"""Conversion benchmark (CPU): HF → MCore and back for a random-weight checkpoint; wall time and peak RSS.

    python benchmarks/bench_convert.py --preset qwen25vl-3b --dtype bf16 --work /tmp/bench-convert

Peak memory is the summed PSS of the converter process and its children (dist_checkpointing forks writers that
share the parent's pages, so summed RSS would count them twice), sampled every 50 ms; the target for hf-to-mcore is
≤ 1.3 × checkpoint bytes + 2 GiB. Each direction runs as `mmpl convert ...` in a fresh process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _run_measured(cmd: list[str]) -> tuple[float, int]:
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:  # PSS: pages shared with forked writer processes are counted once, not once per process
            procs = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.time() - t0, peak


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen25vl-3b")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--work", default="/tmp/bench-convert")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    args = p.parse_args(argv)
    work = Path(args.work)
    hf, mc, back = work / "hf", work / "mcore", work / "back"
    shutil.rmtree(work, ignore_errors=True)
    here = Path(__file__).resolve().parent
    subprocess.run([sys.executable, str(here / "make_random_hf_checkpoint.py"), "--preset", args.preset,
                    "--dtype", args.dtype, "--out", str(hf)], check=True)
    ckpt_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    mmpl = [sys.executable, "-m", "megatron_mmpl.cli", "convert"]
    t_in, rss_in = _run_measured(mmpl + ["hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--dtype", args.dtype])
    t_out, rss_out = _run_measured(mmpl + ["mcore-to-hf", "--ckpt", str(mc), "--out", str(back), "--tokenizer",
                                           "none"])
    gib = 2**30
    res = {
        "date": str(datetime.date.today()), "preset": args.preset, "dtype": args.dtype,
        "cpus": os.cpu_count(), "checkpoint_gib": round(ckpt_bytes / gib, 2),
        "hf_to_mcore_s": round(t_in, 1), "hf_to_mcore_peak_pss_gib": round(rss_in / gib, 2),
        "mcore_to_hf_s": round(t_out, 1), "mcore_to_hf_peak_pss_gib": round(rss_out / gib, 2),
        "rss_target_gib": round((1.3 * ckpt_bytes + 2 * gib) / gib, 2),
    }
    print(json.dumps(res, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
