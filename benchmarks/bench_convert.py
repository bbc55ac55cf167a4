"""Conversion benchmark (CPU): HF → MCore and back for a random-weight checkpoint; wall time and peak RSS.

    python benchmarks/bench_convert.py --preset qwen25vl-3b --dtype bf16 --work /tmp/bench-convert

Peak memory, two ways: the summed PSS of the converter process and its children (dist_checkpointing forks writers
that share the parent's pages, so summed RSS would count them twice), sampled every 50 ms; and the kernel's peak RSS
(ru_maxrss) of the largest process in the tree. The target is ≤ 1.3 × checkpoint bytes + 2 GiB. Each direction
runs as `mmpl convert ...` in a fresh process; the round trip is then checked bit-exact, tensor by tensor.
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


def _run_measured(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak summed PSS of the process tree, peak RSS of its largest process) of `cmd`."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd)
    ps = psutil.Process(proc.pid)
    peak, status, usage = 0, None, None
    while status is None:
        try:  # PSS: pages shared with forked writer processes are counted once, not once per process
            procs = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in procs))
        except psutil.Error:
            pass
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status, usage = st, ru
        else:
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.time() - t0, peak, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def _same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of HF dir `a` equals (torch.equal) the one of the same name in `b`, one tensor at a time."""
    import torch
    from safetensors import safe_open

    def index(d):
        return {n: f for f in d.glob("*.safetensors") for n in safe_open(str(f), "pt").keys()}

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for name, f in ia.items():
        with safe_open(str(f), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


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
    t_in, pss_in, rss_in = _run_measured(
        mmpl + ["hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--dtype", args.dtype])
    t_out, pss_out, rss_out = _run_measured(
        mmpl + ["mcore-to-hf", "--ckpt", str(mc), "--out", str(back), "--tokenizer", "none"])
    gib = 2**30
    res = {
        "date": str(datetime.date.today()), "preset": args.preset, "dtype": args.dtype,
        "cpus": os.cpu_count(), "checkpoint_gib": round(ckpt_bytes / gib, 2),
        "hf_to_mcore_s": round(t_in, 1), "hf_to_mcore_peak_pss_gib": round(pss_in / gib, 2),
        "hf_to_mcore_max_rss_gib": round(rss_in / gib, 2),
        "mcore_to_hf_s": round(t_out, 1), "mcore_to_hf_peak_pss_gib": round(pss_out / gib, 2),
        "mcore_to_hf_max_rss_gib": round(rss_out / gib, 2),
        "rss_target_gib": round((1.3 * ckpt_bytes + 2 * gib) / gib, 2),
        "roundtrip_bit_exact": _same_tensors(hf, back),
    }
    print(json.dumps(res, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
