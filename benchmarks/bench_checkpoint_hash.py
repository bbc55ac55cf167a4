"""Checkpoint hashing rate on this CPU: sha256 of one file through storage/integrity.file_digest, one process.

The file is written first, so it is read from the page cache: the figure is the hashing cost, not the disk's.
On a cold parallel filesystem the read rate bounds it instead.

    python benchmarks/bench_checkpoint_hash.py [--mib 1024] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from megatron_mmpl.storage.integrity import file_digest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024, help="size of the test file")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the test file is written")
    args = ap.parse_args()
    fd, path = tempfile.mkstemp(dir=args.dir, suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        file_digest(path)  # warm the cache
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            file_digest(path)
            rates.append(args.mib / (time.perf_counter() - t0))
    finally:
        os.remove(path)
    print(f"{platform.processor() or platform.machine()}: sha256 {max(rates):,.0f} MiB/s (best of 3, "
          f"{args.mib} MiB file, page cache)")


if __name__ == "__main__":
    main()
