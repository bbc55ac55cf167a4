"""Helpers (no tests): tiny GPTModel (mrope, GQA, qkv bias, SwiGLU, RMSNorm) with CoreAttention, and a packed batch."""

import torch

VOCAB = 64
LENGTHS = (7, 10, 1, 5)  # none a multiple of 4 (2·CP) or 8 (2·CP·TP): exercises padding


def build_gpt(tp=1, cp=1, pp=1, sequence_parallel=False, backend=None, stock_attention=False):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_mmpl.compat.rope import use_per_token_mrope_under_cp
    from megatron_mmpl.compat.specs import gpt_layer_spec

    cfg = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        add_qkv_bias=True, add_bias_linear=False, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, bias_activation_fusion=False, layernorm_epsilon=1e-6,
        mrope_section=[1, 1, 2], hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        sequence_parallel=sequence_parallel, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        bias_dropout_fusion=False,
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm") if stock_attention else gpt_layer_spec(backend=backend)
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=256,
        position_embedding_type="mrope", share_embeddings_and_output_weights=False, rotary_base=10000,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )
    use_per_token_mrope_under_cp(model)
    return model


def sample_positions(n: int, seed: int) -> torch.Tensor:
    """[3, n] M-RoPE-like positions restarting at 0: text, then an 'image' block (t const, h/w grid), text."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n).expand(3, n).clone()
    if n >= 5:
        a = int(torch.randint(0, n - 4, (1,), generator=g))
        grid = torch.arange(4)
        pos[0, a : a + 4] = a
        pos[1, a : a + 4] = a + grid // 2
        pos[2, a : a + 4] = a + grid % 2
        pos[:, a + 4 :] = pos[:, a + 4 :] - 4 + 2 + 0  # next text position = max(grid)+1, as rope_index does
    return pos


def packed_batch(lengths=LENGTHS, seed=0) -> dict:
    """The packed-batch contract (b=1): input_ids, labels, loss_mask, position_ids [3,1,s], cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    ids, labels, pos = [], [], []
    for i, n in enumerate(lengths):
        ids.append(torch.randint(0, VOCAB, (n,), generator=g))
        lab = torch.randint(0, VOCAB, (n,), generator=g)
        lab[torch.rand(n, generator=g) < 0.3] = -100
        labels.append(lab)
        pos.append(sample_positions(n, seed + i))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    labels = torch.cat(labels)[None]
    return {"input_ids": torch.cat(ids)[None], "labels": labels, "loss_mask": (labels != -100).float(),
            "position_ids": torch.cat(pos, 1)[:, None], "cu_seqlens": cu}
