"""Loader page throughput per worker on this CPU: decode + resize + patchify of page images, ours vs transformers.

Pages are rendered text pages at letter size and 144 dpi (1224x1584 px, PNG, like `mmpl data build` stores PDF
pages), processed at Qwen2.5-VL's default max_pixels (1280·28² → 1,232-token pages). One process, one thread: the
number is pages/s for ONE loader worker. Also times the whole sample path (read from a shard, decode, render ids,
rope index) on synthetic 32K samples.

    python benchmarks/bench_loader.py [--pages 20] [--samples 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=20)
    ap.add_argument("--samples", type=int, default=2, help="32K synthetic samples for the end-to-end figure (0: skip)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from megatron_mmpl.data.images import ImageProcessor
    from megatron_mmpl.data.length import encode_png
    from megatron_mmpl.data.synth import filler_page

    pages = [encode_png(filler_page(1224, 1584, i).convert("RGB")) for i in range(args.pages)]
    ours = ImageProcessor()

    def run(fn):
        fn(pages[0])  # warm-up
        t = time.perf_counter()
        for p in pages:
            fn(p)
        return len(pages) / (time.perf_counter() - t)

    ours_ps = run(ours)
    ref_ps = None
    try:
        import io

        from PIL import Image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        hf = Qwen2VLImageProcessorPil()
        ref_ps = run(lambda b: hf(images=[Image.open(io.BytesIO(b))], return_tensors="np"))
    except ImportError:
        pass
    _, grid = ours(pages[0])
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; 1 thread; "
          f"page 1224x1584 PNG -> grid {grid} ({grid[1] * grid[2] // 4} tokens)")
    print(f"ours          : {ours_ps:7.2f} pages/s per worker (decode + resize + normalise + patchify)")
    if ref_ps:
        print(f"transformers  : {ref_ps:7.2f} pages/s (Qwen2VLImageProcessorPil, same pages); "
              f"ours/transformers {ours_ps / ref_ps:.2f}x")

    if args.samples:
        from megatron_mmpl.data.loader import LoaderOptions, build_train_loader
        from megatron_mmpl.data.synth import write_synth
        from megatron_mmpl.data.tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        with tempfile.TemporaryDirectory() as d:
            write_synth(f"{d}/s", targets=[32768], per_target=args.samples, tokenizer=tok, tokenizer_name="tiny",
                        improc=ours, tasks=["extract_single"])
            opts = LoaderOptions(shards=f"{d}/s", recipe="balanced", min_len=32768, max_len=32768, max_seq_len=32768,
                                 num_workers=0, pack_buffer=1, task_weights={"extraction": 1})
            loader = build_train_loader(opts, tok, dp_rank=0, dp_size=1)
            it = iter(loader)
            next(it)
            t, n_pages, n_tok = time.perf_counter(), 0, 0
            for _ in range(args.samples):
                b = next(it)
                n_pages += len(b["image_grid_thw"])
                n_tok += b["input_ids"].shape[1]
            dt = time.perf_counter() - t
            print(f"end to end    : {n_pages / dt:7.2f} pages/s, {n_tok / dt:9.0f} tokens/s per worker "
                  f"(32K samples of {n_pages // args.samples} pages: shard read + decode + ids + rope index + pack)")


if __name__ == "__main__":
    main()
