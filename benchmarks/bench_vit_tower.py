"""The Qwen2.5-VL ViT tower alone at the 32K job's shape on one GPU, bf16: forward + backward time, TFLOP/s, MFU,
and a torch.profiler table of its top kernels; plus the patch embedding as HF's Conv3d vs one GEMM.

The tower is the trainer's (models/qwen25vl/vision_model.py built by build_model, fused kernels, the trainer's
default `model.vit_recompute`); the input is 26 page images of 80×62 patches (the 32K text-page samples of
bench_e2e.py), random pixels (the tower's cost does not depend on them). FLOPs: training/flops.py's ViT count.

    python benchmarks/bench_vit_tower.py [--model qwen25vl-3b] [--images 26] [--grid 80 62] [--profile [--trace FILE]]
                                         [--ablate [NAME ...]]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F


def timed(fn, warmup: int = 2, reps: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / 1e3


def patch_embed_forms(vit, n: int) -> None:
    """HF's Conv3d on [n, C, T, P, P] vs F.linear on [n, C·T·P·P] with the same weight (forward + weight grad)."""
    w = vit.patch_embed.weight.detach().clone().requires_grad_(True)
    d = vit.dims
    x = torch.randn(n, d.patch_dim, device="cuda", dtype=w.dtype)
    dy = torch.randn(n, w.shape[0], device="cuda", dtype=w.dtype)

    def conv():
        y = F.conv3d(x.view(n, d.in_channels, d.temporal_patch_size, d.patch_size, d.patch_size), w,
                     stride=w.shape[2:]).view(n, -1)
        y.backward(dy)

    def gemm():
        F.linear(x, w.view(w.shape[0], -1)).backward(dy)

    y_conv = F.conv3d(x.view(n, d.in_channels, d.temporal_patch_size, d.patch_size, d.patch_size), w,
                      stride=w.shape[2:]).view(n, -1)
    err = (y_conv.float() - F.linear(x, w.view(w.shape[0], -1)).float()).abs().max().item()
    t_gemm = timed(gemm)
    t_conv = timed(conv, warmup=1, reps=2)
    print(f"patch embed, {n} patches, fwd + weight grad: Conv3d {t_conv * 1e3:.2f} ms, GEMM {t_gemm * 1e3:.2f} ms "
          f"({t_conv / t_gemm:.1f}x), max |Δ| of outputs {err:.2e}")


ABLATIONS = (("triton-windows",), ("triton-swiglu",), ("triton-backward",), ("qkv-rope",), ("bias-dropout",),
             ("qkv-rope", "bias-dropout"))


def set_fusions(vit, off: tuple[str, ...]) -> None:
    """Turn the tower's CUDA fusions off by name ("qkv-rope": QKVRopeSelfAttention's one kernel; "bias-dropout":
    megatron's compiled bias-dropout-add) or back on; both are read at forward time."""
    from megatron_mmpl.attention.qkv_rope import QKVRopeSelfAttention, fusable

    for mod in vit.modules():
        if isinstance(mod, QKVRopeSelfAttention):
            mod.fused_qkv_rope = "qkv-rope" not in off and bool(mod.config.apply_rope_fusion) and fusable(mod)
        if hasattr(mod, "config"):
            mod.config.bias_dropout_fusion = "bias-dropout" not in off


def ablate(vit, step, forward, only=()) -> None:
    """Each of ABLATIONS against the tower as built ("triton-backward": inductor's kernel for the QKV-RoPE
    backward instead of the Triton one; "triton-swiglu": megatron's compiled SwiGLU instead of compat/swiglu.py's
    Triton kernels; "triton-windows": batched SDPA for the windows instead of attention/window_attention.py), timed
    A B B A in this one process (base, ablated, ablated, base): on the device machines a second process, or a
    later run, can be 6-15 % slower whatever it runs (docs/PERFORMANCE.md, 2026-12-07), so one pair of runs does
    not rank two settings. `only`: the names whose ablations to run (all when empty)."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl as megatrons
    from megatron.core.transformer import mlp

    from megatron_mmpl.attention import qkv_rope, window_attention

    triton = qkv_rope._TRITON_BACKWARD  # read at backward time
    windows = window_attention.KERNEL  # read at forward time
    swiglu = mlp.bias_swiglu_impl  # read at forward time: compat/swiglu.py's unless MMPL_SWIGLU=compiled
    for off in (a for a in ABLATIONS if not only or set(a) <= set(only)):
        times = {}
        for setting in ((), off, off, ()):
            set_fusions(vit, setting)
            qkv_rope._TRITON_BACKWARD = triton and "triton-backward" not in setting
            mlp.bias_swiglu_impl = megatrons if "triton-swiglu" in setting else swiglu
            window_attention.KERNEL = "sdpa" if "triton-windows" in setting else windows
            with torch.no_grad():
                f = timed(forward, warmup=1, reps=3)
            times.setdefault(setting, []).append((timed(step, warmup=1, reps=3), f))
        (a, fa), (b, fb) = ([sum(x) / 2 for x in zip(*times[k])] for k in ((), off))
        print(f"  without {' + '.join(off)}: fwd+bwd {b:.3f} s against {a:.3f} ({b / a - 1:+.1%}), forward alone "
              f"{fb:.3f} s against {fa:.3f} ({fb / fa - 1:+.1%}); A B B A")
    set_fusions(vit, ())
    qkv_rope._TRITON_BACKWARD = triton
    mlp.bias_swiglu_impl = swiglu
    window_attention.KERNEL = windows


def run_mode(args, cfg, spec, layout, grid, flops: float, peak: float | None, first: bool) -> None:
    """Time (and on the first mode, profile) the tower built under cfg.model.vit_recompute."""
    from megatron_mmpl.training.model_provider import build_model_chunk

    mode = cfg.model.vit_recompute
    vit = build_model_chunk(cfg, spec, layout).vision_model
    vit.train()
    n = int(grid.prod(-1).sum())
    if first:
        patch_embed_forms(vit, n)
    pixels = torch.randn(n, spec.vision.patch_dim, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(n // vit.merge_unit, spec.hidden, device="cuda", dtype=torch.bfloat16)

    def step():
        vit(pixels, grid).backward(dy)

    try:
        torch.cuda.reset_peak_memory_stats()
        sec = timed(step, warmup=1, reps=3)
        with torch.no_grad():
            fwd = timed(lambda: vit(pixels, grid), warmup=1, reps=3)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        print(f"vit_recompute={mode}: out of memory")
        return
    from megatron_mmpl.training.flops import FlopModel, Training

    rebuilt = FlopModel(spec, Training.of(cfg.model, spec)).rebuilt_flops([], grid.tolist())
    forward = FlopModel(spec, Training(vit_tower_rebuilt=True)).rebuilt_flops([], grid.tolist())
    mfu = f", MFU {flops / sec / 1e12 / peak:.1%}, HFU {(flops + rebuilt) / sec / 1e12 / peak:.1%}" if peak else ""
    print(f"vit_recompute={mode}: fwd+bwd {sec:.3f} s, {flops / sec / 1e12:.0f} TFLOP/s{mfu}, peak {peak_gib:.1f} "
          f"GiB; forward alone (no grad) {fwd:.3f} s, {forward / fwd / 1e12:.0f} TFLOP/s")
    if args.ablate is not None and first:
        ablate(vit, step, lambda: vit(pixels, grid), args.ablate)
    if args.profile and first:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=80))
        if args.trace:
            prof.export_chrome_trace(args.trace)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen25vl-3b")
    p.add_argument("--images", type=int, default=26)
    p.add_argument("--grid", type=int, nargs=2, default=[80, 62], help="patches per image (h w)")
    p.add_argument("--recompute", nargs="+", default=["chunked", "none"], help="model.vit_recompute values")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one forward + backward")
    p.add_argument("--trace", default=None, help="with --profile: write the Chrome trace (JSON) here")
    p.add_argument("--ablate", nargs="*", default=None, choices=sorted({n for off in ABLATIONS for n in off}),
                   help="also time the first mode with each of ABLATIONS turned off (the Triton window attention, "
                        "the Triton SwiGLU kernels, "
                        "the Triton QKV-RoPE backward, the QKV-bias-RoPE kernel, the bias-dropout-add fusion, the "
                        "last two together), or only those that turn off the names given (same tower, same inputs, "
                        "A B B A)")
    args = p.parse_args()

    from megatron_mmpl.config import load_config
    from megatron_mmpl.config.hf_config import resolve_hf_config
    from megatron_mmpl.models.qwen25vl.spec import ModelSpec
    from megatron_mmpl.parallel.process_groups import destroy_parallel, initialize_parallel
    from megatron_mmpl.training.flops import FlopModel, peak_tflops

    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    cfg = load_config(None, [f"model.hf_config={args.model}", "model.dtype=bf16", "model.recompute=none",
                             "model.hf_overrides={text_config.num_hidden_layers: 1}"])
    spec = ModelSpec.from_hf(resolve_hf_config(cfg.model))
    layout = initialize_parallel()
    grid = torch.tensor([[1, *args.grid]] * args.images)
    n = int(grid.prod(-1).sum())
    flops = FlopModel(spec).vit_flops(grid.tolist())
    peak = peak_tflops(None)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model} ViT "
          f"({spec.vision.depth} blocks), {args.images} images of {args.grid[0]}x{args.grid[1]} = {n} patches, "
          f"{flops / 1e12:.1f} TFLOP per fwd+bwd")
    for mode in args.recompute:
        cfg.model.vit_recompute = mode
        run_mode(args, cfg, spec, layout, grid, flops, peak, first=mode == args.recompute[0])
        torch.cuda.empty_cache()
    destroy_parallel()


if __name__ == "__main__":
    main()
