"""The ViT MLP is built wider than the checkpoint's when its width is not a multiple of 64 (Qwen2.5-VL-3B/7B:
3420 → 3456): GEMMs over a width that is not a multiple of 8 fall off the fast Hopper kernels (benchmarks/
bench_vit_mlp_width.py: 1.49× for the MLP at 3456 on an H200). The extra gate/up rows and down columns are zero,
so the output is unchanged (silu(0)·0 = 0), their gradients are exactly zero, and they stay zero under AdamW
with weight decay. Conversion pads on import and drops the padding on export (conversion/mapping.py); 64 keeps
every TP shard (tp ≤ 8) a multiple of 8, and the saved shape independent of TP. Pure Python (the planner uses it).
"""

VIT_FFN_MULTIPLE = 64


def padded_vit_ffn(width: int) -> int:
    """The ViT MLP width this trainer builds for a checkpoint width."""
    return -(-width // VIT_FFN_MULTIPLE) * VIT_FFN_MULTIPLE
