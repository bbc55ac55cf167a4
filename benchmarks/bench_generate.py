"""Evaluation speed: prefill and generation tokens/s of transformers' Qwen2.5-VL (bf16, SDPA, KV cache) on a long
page-image prompt, and peak GPU memory — the path `mmpl eval docvqa|needle` runs.

    python benchmarks/bench_generate.py --json /tmp/bench_generate.json    # H200: 3B shape at 32K and 128K
    python benchmarks/bench_generate.py --preset tiny --lengths 2k --page-tokens 64 --device cpu --new-tokens 4
                                                                            # smoke test of the script itself

Random weights (speed depends on shapes, not values). The prompt is a document of letter pages at 144 dpi
(1,224×1,584 px, capped at 1,280 tokens a page as in training) plus text, exactly `length` tokens. Prefill = the
first `generate` step (ViT over every page + LM over the prompt, first token out); the ViT's share is timed on
its own. Generation = the next `new_tokens − 1` tokens with the KV cache (batch 1), in the same call. Peak =
torch's peak allocated memory over that call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build_prompt(cfg, length: int, max_page_tokens: int = 1280, page_px=(1224, 1584)):
    """input_ids [1, length] of pages + text, their pixel values, grids and mm_token_type_ids."""
    from megatron_mmpl.data.images import smart_resize
    from megatron_mmpl.models.qwen25vl.testing import mm_prompt

    vc = cfg.vision_config
    f = vc.patch_size * vc.spatial_merge_size
    h, w = smart_resize(page_px[1], page_px[0], f, 56 * 56, max_page_tokens * f * f)
    per_page = (h // f) * (w // f) + 2  # pad tokens + vision start/end
    head = 32  # text before the pages; the question and the rest of the budget after them
    n_pages = max(1, (length - head - 16) // per_page)
    tail = length - head - n_pages * per_page
    if tail < 1:
        raise ValueError(f"length {length} is too short for one {w}x{h} page; raise --lengths")
    batch = mm_prompt(cfg, [head] + [("image", 1, h // vc.patch_size, w // vc.patch_size)] * n_pages + [tail])
    assert batch["input_ids"].shape[1] == length, batch["input_ids"].shape
    batch["mm_token_type_ids"] = (batch["input_ids"] == cfg.image_token_id).long()
    del batch["position_ids"]  # generate builds the 3D positions from mm_token_type_ids
    return batch, n_pages


@torch.no_grad()
def measure(model, batch, new_tokens: int, device) -> dict:
    """One `generate` call, clocked at every logits step: the first step ends the prefill, the rest decode."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            _sync(device)
            self.stamps.append(time.perf_counter())
            return scores

    batch = {k: v.to(device) for k, v in batch.items()}
    n = batch["input_ids"].shape[1]
    _reset(device)
    _sync(device)
    t = time.perf_counter()
    model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    _sync(device)
    vit_s = time.perf_counter() - t
    _reset(device)
    clock = Clock()
    gc = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                          pad_token_id=0)
    _sync(device)
    t = time.perf_counter()
    out = model.generate(**batch, generation_config=gc, logits_processor=LogitsProcessorList([clock]))
    _sync(device)
    assert out.shape[1] == n + new_tokens and len(clock.stamps) == new_tokens
    prefill_s = clock.stamps[0] - t
    decode_s = clock.stamps[-1] - clock.stamps[0]
    return {"prompt_tokens": n, "vit_s": vit_s, "prefill_s": prefill_s, "prefill_tokens_per_s": n / prefill_s,
            "lm_prefill_tokens_per_s": n / max(prefill_s - vit_s, 1e-9), "new_tokens": new_tokens,
            "decode_tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None,
            "peak_gib": _peak_gib(device)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen25vl-3b", help="a name from megatron_mmpl.models.qwen25vl presets")
    p.add_argument("--lengths", default="32k,128k", help="prompt lengths in tokens (k = 1024)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated after the prompt")
    p.add_argument("--page-tokens", type=int, default=1280, help="token cap of one page (1280: a letter page)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.eval.needle import parse_lengths
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = hf_config_from_preset(args.preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.preset} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {dtype}, sdpa) "
          f"on {name}")
    warm, _ = build_prompt(cfg, 4 * (args.page_tokens + 2) + 64, args.page_tokens)
    measure(model, warm, 2, device)  # kernels, allocator
    rows = []
    for length in parse_lengths(args.lengths):
        batch, n_pages = build_prompt(cfg, length, args.page_tokens)
        try:
            r = {"length": length, "pages": n_pages, **measure(model, batch, args.new_tokens, device)}
        except torch.cuda.OutOfMemoryError as e:
            r = {"length": length, "pages": n_pages, "error": f"out of memory: {e}".splitlines()[0]}
        rows.append(r)
        if "error" in r:
            print(f"{length:>7} tokens ({n_pages} pages): {r['error']}")
            continue
        mem = f" | peak {r['peak_gib']:.1f} GiB allocated" if r["peak_gib"] is not None else ""
        print(f"{length:>7} tokens ({n_pages} pages): prefill {r['prefill_s']:.2f} s = "
              f"{r['prefill_tokens_per_s']:,.0f} tok/s (ViT {r['vit_s']:.2f} s; LM part "
              f"{r['lm_prefill_tokens_per_s']:,.0f} tok/s) | decode {r['decode_tokens_per_s']:.1f} tok/s" + mem)
    if args.json:
        import transformers

        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "device": name, "dtype": str(dtype),
                       "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
