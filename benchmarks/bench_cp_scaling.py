"""CP weak scaling and parity on 2 GPUs (NCCL): a 7B-shape LM proxy with CoreAttention, packed M-RoPE rows.

    torchrun --nproc-per-node 2 benchmarks/bench_cp_scaling.py                 # 64K/GPU: CP=1@64K vs CP=2@128K
    torchrun --nproc-per-node 2 benchmarks/bench_cp_scaling.py --layers 4 --tokens-per-gpu 32768
    torchrun --nproc-per-node 2 benchmarks/bench_cp_scaling.py --device cpu --tiny   # smoke test (gloo)

Reports (rank 0): per-GPU tokens/s of fwd+bwd at CP=1 with N tokens and at CP=2 with 2N tokens (weak-scaling
efficiency = ratio, target ≥ 0.9), and max |Δ logits| of CP=2 vs CP=1 on the same packed row and weights (bf16).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch


def _batch(total: int, sample_len: int, vocab: int, device) -> dict:
    """A packed row of samples of `sample_len` tokens (last one shorter, odd-length), positions restarting."""
    g = torch.Generator().manual_seed(0)
    lens = [sample_len] * (total // sample_len) + ([total % sample_len] if total % sample_len else [])
    if len(lens) > 1 and lens[-1] % 2 == 0:  # make one sample not a multiple of 2·CP: exercises padding
        lens[-1], lens[-2] = lens[-1] - 1, lens[-2] + 1
    pos = torch.cat([torch.arange(n) for n in lens]).expand(3, 1, total).clone()
    ids = torch.randint(0, vocab, (1, total), generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids.to(device), "labels": torch.roll(ids, -1, 1).to(device),
            "loss_mask": torch.ones(1, total, device=device), "position_ids": pos.to(device), "cu_seqlens": cu}


def _model(args, cp: int, dtype, device):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_mmpl.compat.rope import use_per_token_mrope_under_cp
    from megatron_mmpl.compat.specs import gpt_layer_spec

    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn, add_qkv_bias=True, add_bias_linear=False,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        bias_activation_fusion=False, layernorm_epsilon=1e-6, mrope_section=args.mrope_section,
        hidden_dropout=0.0, attention_dropout=0.0, context_parallel_size=cp, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=True, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        bias_dropout_fusion=False, recompute_granularity="full" if args.recompute else None,
        recompute_method="uniform" if args.recompute else None, recompute_num_layers=1 if args.recompute else None,
    )
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=gpt_layer_spec(backend=args.backend),
                     vocab_size=args.vocab, max_sequence_length=1 << 20, position_embedding_type="mrope",
                     share_embeddings_and_output_weights=False, rotary_base=1e6)
    use_per_token_mrope_under_cp(model)
    return model.to(device)


def _step_time(model, local, psp, args, device) -> float:
    def step():
        loss = model(local["input_ids"], local["position_ids"], None, labels=local["labels"], packed_seq_params=psp)
        (loss * local["loss_mask"]).sum().backward()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t) / args.iters


def _logits(model, local, psp):
    with torch.no_grad():
        return model(local["input_ids"], local["position_ids"], None, packed_seq_params=psp).float()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens-per-gpu", type=int, default=65536)
    p.add_argument("--sample-len", type=int, default=16384, help="packed samples of this many tokens")
    p.add_argument("--parity-tokens", type=int, default=16384, help="row length for the CP=2 vs CP=1 logits check")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=18944)
    p.add_argument("--vocab", type=int, default=8192, help="small on purpose: logits of 128K×152K would dominate")
    p.add_argument("--mrope-section", type=int, nargs=3, default=[16, 24, 24])
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--recompute", action="store_true", help="full activation recompute (for more layers)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny dims, fp32")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens_per_gpu, args.sample_len, args.parity_tokens, args.layers = 64, 24, 40, 2
        args.hidden, args.heads, args.kv_heads, args.ffn, args.vocab = 32, 4, 2, 48, 64
        args.mrope_section, args.warmup, args.iters = [1, 1, 2], 1, 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_mmpl.parallel.context_parallel import packed_seq_params, split_packed_batch
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    initialize_parallel(cp=2)
    rank, n = dist.get_rank(), args.tokens_per_gpu
    # ---- CP=2: 2N tokens over 2 GPUs
    model = _model(args, 2, dtype, device)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    cp_rank, cp_group = ps.get_context_parallel_rank(), ps.get_context_parallel_group()
    local = split_packed_batch(_batch(2 * n, args.sample_len, args.vocab, device), cp_rank, 2)
    t_cp2 = _step_time(model, local, packed_seq_params(local["cu_seqlens"]), args, device)
    par = split_packed_batch(_batch(args.parity_tokens, args.sample_len, args.vocab, device), cp_rank, 2)
    logits_cp2 = par["cp_plan"].gather(_logits(model, par, packed_seq_params(par["cu_seqlens"])), 1, cp_group)
    del model
    # ---- CP=1: N tokens on each GPU (data parallel, no gradient sync needed for timing)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(context_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = _model(args, 1, dtype, device)
    model.load_state_dict(weights, strict=False)
    full = _batch(n, args.sample_len, args.vocab, device)
    t_cp1 = _step_time(model, full, packed_seq_params(full["cu_seqlens"]), args, device)
    par1 = _batch(args.parity_tokens, args.sample_len, args.vocab, device)
    logits_cp1 = _logits(model, par1, packed_seq_params(par1["cu_seqlens"]))
    if rank == 0:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        tps1, tps2 = n / t_cp1, 2 * n / t_cp2 / 2
        print(f"# bench_cp_scaling {datetime.date.today()} on 2× {name}, {dtype}, layers {args.layers}, "
              f"hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, ffn {args.ffn}, samples {args.sample_len}")
        print(f"CP=1 {n:>7} tokens/GPU: {t_cp1 * 1e3:9.1f} ms/step  {tps1:10.0f} tokens/s/GPU")
        print(f"CP=2 {2 * n:>7} tokens    : {t_cp2 * 1e3:9.1f} ms/step  {tps2:10.0f} tokens/s/GPU")
        print(f"weak-scaling efficiency (CP=2 per-GPU / CP=1 per-GPU): {tps2 / tps1:.3f}")
        d = (logits_cp2 - logits_cp1).abs().max().item()
        print(f"parity {args.parity_tokens} tokens: max |Δ logits| CP=2 vs CP=1 = {d:.4g} "
              f"(max |logit| {logits_cp1.abs().max().item():.3g})")
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
