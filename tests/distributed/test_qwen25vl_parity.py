"""Our Megatron-Core Qwen2.5-VL computes the same function as transformers' (fp32, CPU, random tiny weights).

One 1-rank group checks TP=1 (ViT block by block, logits on image/text/video/packed prompts, gradients of both
towers, tied embeddings, input errors); one 4-rank group checks TP=2, TP=2+SP, PP=2 (1+3 layers) and TP=2×PP=2
through megatron's pipeline schedule, including gradients at TP=2×PP=2. References are computed here, in the
pytest process, with transformers (eager attention).
"""

import pickle

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

IMAGES = [4, ("image", 1, 4, 6), 2, ("image", 1, 8, 4), 2]  # text before, between, after; 26 tokens
TEXT = [10]
VIDEO = [2, ("video", 4, 4, 4, 0.5), 3]  # 8 frames (temporal_patch 2), second_per_grid 0.5
# fp32 on CPU; observed (printed with -s): logits ≤ 4e-6 (2.2e-5 for the tied model), ViT blocks ≤ 1.1e-6,
# gradients ≤ 1.6e-6 relative. README quotes these asserted bounds.
LOGIT_TOL, BLOCK_TOL, GRAD_TOL = 5e-5, 1e-5, 1e-5
MODEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _labels(batch, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, batch["input_ids"].shape, generator=g)


def _packed(a, b):
    """Two samples in one row: ids/positions concatenated, cu_seqlens at the boundary, pixels of both."""
    row = {k: torch.cat([a[k], b[k]], dim=-1) for k in ("input_ids", "position_ids")}
    for k in ("pixel_values", "image_grid_thw"):
        parts = [x[k] for x in (a, b) if k in x]
        if parts:
            row[k] = torch.cat(parts)
    sa, sb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    row["cu_seqlens"] = torch.tensor([0, sa, sa + sb], dtype=torch.int32)
    return row


@pytest.fixture(scope="module")
def ref():
    from megatron_mmpl.models.qwen25vl.hf_mapping import hf_to_mcore_dict
    from megatron_mmpl.models.qwen25vl.testing import hf_logits, mm_prompt, tiny_hf_model

    hf = tiny_hf_model("tiny", seed=0)
    cfg = hf.config
    b = {"images": mm_prompt(cfg, IMAGES, 1), "text": mm_prompt(cfg, TEXT, 2), "video": mm_prompt(cfg, VIDEO, 3)}
    out = {"weights": hf_to_mcore_dict(hf.state_dict(), cfg), "batches": b, "logits": {}}
    with torch.no_grad():
        for k, batch in b.items():
            out["logits"][k] = hf_logits(hf, batch)
    b["packed"] = _packed(b["images"], b["text"])
    out["logits"]["packed"] = torch.cat([out["logits"]["images"], out["logits"]["text"]], dim=1)
    # ViT block inputs/outputs (HF runs blocks in window order, as ours do)
    blocks = []
    hooks = [blk.register_forward_hook(lambda m, a, kw, o: blocks.append((a[0] if a else kw["hidden_states"], o)),
                                       with_kwargs=True) for blk in hf.model.visual.blocks]
    with torch.no_grad():
        img = b["images"]
        out["vision"] = hf.model.visual(img["pixel_values"], grid_thw=img["image_grid_thw"]).pooler_output
    for h in hooks:
        h.remove()
    out["blocks"] = blocks
    # gradients of a per-token mean loss (labels are already "shifted": logits[t] predict labels[t])
    batch = b["images"]
    labels = _labels(batch, cfg.text_config.vocab_size, 4)
    logits = hf_logits(hf, batch)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    grads = {n: p.grad for n, p in hf.named_parameters()}
    out["labels"] = labels
    out["text_labels"] = _labels(b["text"], cfg.text_config.vocab_size, 6)
    out["grads"] = hf_to_mcore_dict(grads, cfg)
    # tied-embedding model (3B style)
    tied = tiny_hf_model("tiny-tied", seed=5)
    with torch.no_grad():
        out["tied_logits"] = hf_logits(tied, b["images"])
    out["tied_weights"] = hf_to_mcore_dict(tied.state_dict(), tied.config)
    return out


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _grad_rel(ours: dict, theirs: dict) -> dict:
    return {n: ((ours[n] - theirs[n]).norm() / theirs[n].norm().clamp_min(1e-12)).item() for n in ours}


def _run(model, batch, labels=None):
    """One micro-batch through megatron's schedule: logits on the last stage (forward only), or the loss
    backward through every stage. Returns the last stage's logits (or None)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mmpl.models.qwen25vl.specs import packed_seq_params

    def step(it, m):
        x = next(it)
        psp = packed_seq_params(x["cu_seqlens"]) if "cu_seqlens" in x else None
        out = m(x["input_ids"], x["position_ids"], labels=labels, packed_seq_params=psp,
                **{k: x[k] for k in MODEL_KEYS if k in x})
        if labels is None:
            return out, None
        return out, lambda o: (o.mean(), {"loss": o.mean().detach()})

    res = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=batch["input_ids"].shape[1], micro_batch_size=1, forward_only=labels is None,
    )
    return res[0] if labels is None and res else None


def _tp1(ref_bytes, ckpt_dir):
    """Everything at TP=1 in one process; returns measurements for the parent to assert on. Also saves the
    loaded model as a TP=1 megatron dist checkpoint (what the converter writes) for the layout test."""
    from megatron.core import dist_checkpointing

    ref = pickle.loads(ref_bytes)  # plain pickle: tensors inline (multiprocessing would pass one fd per tensor)
    from megatron_mmpl.models.qwen25vl.build import build_model, gather_full_weights, load_full_weights
    from megatron_mmpl.models.qwen25vl.hf_mapping import mcore_names
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    layout = initialize_parallel()
    cfg = hf_config_from_preset("tiny")
    torch.manual_seed(123)  # our init differs from HF's: everything must come from the loaded weights
    model = build_model(cfg, layout).eval()
    res = {"names": sorted(n for n, _ in model.named_parameters()), "expected_names": sorted(mcore_names(cfg))}
    load_full_weights(model, ref["weights"])
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    vis, batch = model.vision_model, ref["batches"]["images"]
    # ViT block by block, fed HF's block inputs
    _, _, _, rope, segs = vis.window_layout(batch["image_grid_thw"], torch.device("cpu"))
    res["block_kinds"] = [layer.full_attention for layer in vis.decoder.layers]
    res["blocks"], res["swapped"] = [], []
    # HF's blocks run in window order; ours with windows of one size back to back (`segs.block_rows`)
    ours = (lambda t: t) if segs.block_rows is None else (lambda t: t[segs.block_rows])
    res["regrouped"] = segs.block_rows is not None
    with torch.no_grad():
        for layer, (x_in, x_out) in zip(vis.decoder.layers, ref["blocks"]):
            x_in, x_out = ours(x_in), ours(x_out)
            y, _ = layer(hidden_states=x_in[:, None], attention_mask=None, rotary_pos_emb=rope, packed_seq_params=segs)
            res["blocks"].append(_max_diff(y[:, 0], x_out))
            other = segs.window if layer.full_attention else segs.full  # the other kind: must differ clearly
            y2, _ = layer(hidden_states=x_in[:, None], attention_mask=None, rotary_pos_emb=rope,
                          packed_seq_params=other)
            res["swapped"].append(_max_diff(y2[:, 0], x_out))
        res["vision"] = _max_diff(vis(batch["pixel_values"], batch["image_grid_thw"]), ref["vision"])
        res["logits"] = {k: _max_diff(_run(model, b), ref["logits"][k]) for k, b in ref["batches"].items()}
    # input errors
    errs = {}
    for name, kwargs in {
        "pad_count": dict(image_grid_thw=torch.tensor([[1, 4, 6], [1, 8, 8]])),
        "pixel_shape": dict(pixel_values=batch["pixel_values"][:-4]),
    }.items():
        try:
            with torch.no_grad():
                model(batch["input_ids"], batch["position_ids"], **{**{k: batch[k] for k in MODEL_KEYS if k in batch},
                                                                    **kwargs})
            errs[name] = "no error"
        except ValueError as e:
            errs[name] = str(e)
    res["errors"] = errs
    # text-only training batch: the dummy image keeps every ViT weight in the graph, with zero gradient
    model.train()
    model.zero_grad()
    _run(model, ref["batches"]["text"], labels=ref["text_labels"])
    res["text_only_grads"] = {n: None if p.grad is None else p.grad.abs().max().item()
                              for n, p in model.vision_model.named_parameters()}
    # gradients of both towers
    model.train()
    model.zero_grad()
    _run(model, batch, labels=ref["labels"])
    res["grad_rel"] = _grad_rel(gather_full_weights(model, grads=True), ref["grads"])
    # tied embeddings
    tied = build_model(hf_config_from_preset("tiny-tied"), layout).eval()
    load_full_weights(tied, ref["tied_weights"])
    with torch.no_grad():
        res["tied"] = _max_diff(_run(tied, batch), ref["tied_logits"])
    res["tied_has_output_weight"] = tied.language_model.output_layer.weight is not None
    # tiny-tied's ViT MLP (60) is built zero-padded to 64: after a backward the padding's gradients are 0
    tied.train()
    _run(tied, batch, labels=ref["labels"])
    mlp = tied.vision_model.decoder.layers[0].mlp
    width = tied.cfgs.vision.ffn_hidden_size
    res["pad"] = dict(width=width, fc1=mlp.linear_fc1.weight.grad.view(2, width, -1)[:, 60:].abs().max().item(),
                      fc1_bias=mlp.linear_fc1.bias.grad.view(2, width)[:, 60:].abs().max().item(),
                      fc2=mlp.linear_fc2.weight.grad[:, 60:].abs().max().item(),
                      real=mlp.linear_fc1.weight.grad.abs().max().item())
    return res


def _layouts(ref_bytes, ckpt_dir):
    """TP=2, TP=2+SP, PP=2 (uneven), TP=2×PP=2 on 4 ranks, one after another; logits per layout. TP=2×PP=2
    takes its weights from the TP=1 dist checkpoint (resharded on load), the others from the full dict."""
    from megatron.core import dist_checkpointing

    ref = pickle.loads(ref_bytes)
    from megatron.core import parallel_state as ps

    from megatron_mmpl.models.qwen25vl.build import build_model, gather_full_weights, load_full_weights
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    cfg = hf_config_from_preset("tiny")
    res = {}
    for name, tp, pp, kw in (
        ("tp2", 2, 1, {}),
        ("tp2_sp", 2, 1, {"sequence_parallel": True}),
        ("pp2_1+3", 1, 2, {"first_stage_layers": 1}),
        ("tp2_pp2", 2, 2, {}),
    ):
        layout = initialize_parallel(tp=tp, pp=pp)
        torch.manual_seed(123)
        model = build_model(cfg, layout, **kw).eval()
        if name == "tp2_pp2":
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
        else:
            load_full_weights(model, ref["weights"])
        out = {"layers": [layer.layer_number for layer in model.language_model.decoder.layers]}
        with torch.no_grad():
            for k, b in ref["batches"].items():
                if kw.get("sequence_parallel") and b["input_ids"].shape[1] % tp:
                    continue
                logits = _run(model, b)
                if logits is not None:
                    out[k] = _max_diff(logits, ref["logits"][k])
        if name == "tp2_pp2":
            model.train()
            _run(model, ref["batches"]["images"], labels=ref["labels"])
            out["grads"] = gather_full_weights(model, grads=True)
        res[name] = out
        ps.destroy_model_parallel()
    return res


@pytest.fixture(scope="module")
def tp1(ref, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("tp1_ckpt")
    (res,) = run_distributed(_tp1, 1, pickle.dumps(ref), str(ckpt), timeout=300)
    return res, str(ckpt)


def test_tp1_matches_transformers(tp1):
    res, _ = tp1
    assert res["names"] == res["expected_names"], set(res["names"]) ^ set(res["expected_names"])
    assert res["block_kinds"] == [False, True, False, True]  # fullatt_block_indexes [1, 3]
    assert res["regrouped"]  # windows of two sizes over two images: full blocks gather rows into frames
    print("ViT blocks max|Δ|", res["blocks"], "with the other attention kind", res["swapped"])
    assert max(res["blocks"]) <= BLOCK_TOL, res["blocks"]
    assert min(res["swapped"]) > 100 * BLOCK_TOL, res["swapped"]  # the check can tell window from full
    assert res["vision"] <= BLOCK_TOL, res["vision"]
    print("logits max|Δ|", res["logits"], "tied", res["tied"])
    assert all(v <= LOGIT_TOL for v in res["logits"].values()), res["logits"]
    assert res["tied"] <= LOGIT_TOL and not res["tied_has_output_weight"]
    pad = res["pad"]
    assert pad["width"] == 64 and pad["real"] > 0 and pad["fc1"] == pad["fc1_bias"] == pad["fc2"] == 0.0, pad
    worst = max(res["grad_rel"].items(), key=lambda kv: kv[1])
    print("grad rel err: worst", worst, "over", len(res["grad_rel"]), "tensors")
    assert len(res["grad_rel"]) == len(res["names"])  # every weight, both towers, got a gradient
    assert worst[1] <= GRAD_TOL, worst
    assert "implies 22" in res["errors"]["pad_count"], res["errors"]
    assert "pixel_values has shape" in res["errors"]["pixel_shape"], res["errors"]


def test_text_only_batch_reaches_every_vit_weight(tp1):
    grads = tp1[0]["text_only_grads"]
    assert grads and all(g == 0.0 for g in grads.values()), grads  # present (not None) and exactly zero


def test_tp_pp_layouts_match_transformers(ref, tp1):
    per_rank = run_distributed(_layouts, 4, pickle.dumps(ref), tp1[1], timeout=600)
    for name in per_rank[0]:
        seen = {}
        for r in per_rank:
            seen.update({k: v for k, v in r[name].items() if k not in ("layers", "grads")})
        print(name, "logits max|Δ|", seen)
        assert set(seen) >= ({"images", "text"} if name == "tp2_sp" else {"images", "text", "video", "packed"}), name
        assert all(v <= LOGIT_TOL for v in seen.values()), (name, seen)
    assert sorted(r["pp2_1+3"]["layers"] for r in per_rank) == [[1], [1], [2, 3, 4], [2, 3, 4]]
    grads = {}
    for r in per_rank:
        grads.update(r["tp2_pp2"]["grads"])
    rel = _grad_rel(grads, {n: ref["grads"][n] for n in grads})
    assert set(grads) == set(ref["grads"])
    worst = max(rel.items(), key=lambda kv: kv[1])
    print("TP2xPP2 grad rel err: worst", worst)
    assert worst[1] <= GRAD_TOL, worst
