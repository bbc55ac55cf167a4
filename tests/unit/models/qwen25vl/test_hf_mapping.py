"""HF ⇄ MCore weight mapping: exact round trip, the documented layouts, both HF namings, tied embeddings,
one error listing every uncovered tensor, and lazy tensor-by-tensor streaming."""

import pytest
import torch

from megatron_mmpl.models.qwen25vl.hf_mapping import (
    detect_naming,
    hf_to_mcore,
    hf_to_mcore_dict,
    mcore_names,
    mcore_to_hf,
    mcore_to_hf_dict,
)
from megatron_mmpl.models.qwen25vl.testing import tiny_hf_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def models():
    return {name: tiny_hf_model(name, seed=i) for i, name in enumerate(("tiny", "tiny-tied"))}


def _original_names(sd):
    """transformers ≥ 4.52 names → the released checkpoints' names."""
    out = {}
    for k, v in sd.items():
        k = k.replace("model.language_model.", "model.", 1) if k.startswith("model.language_model.") else k
        out[k.replace("model.visual.", "visual.", 1)] = v
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
@pytest.mark.parametrize("naming", ["hf", "original"])
def test_round_trip_is_exact(models, name, naming):
    hf = models[name]
    sd = {k: v for k, v in hf.state_dict().items() if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    if naming == "original":
        sd = _original_names(sd)
    assert detect_naming(sd) == naming
    mc = hf_to_mcore_dict(sd, hf.config)
    assert sorted(mc) == sorted(mcore_names(hf.config))
    assert ("language_model.output_layer.weight" in mc) != hf.config.tie_word_embeddings
    back = mcore_to_hf_dict(mc, hf.config, naming=naming)
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_layouts(models):
    hf = models["tiny"]
    cfg, tc, vc = hf.config, hf.config.text_config, hf.config.vision_config
    sd, mc = hf.state_dict(), hf_to_mcore_dict(hf.state_dict(), hf.config)
    d, heads, groups = tc.hidden_size // tc.num_attention_heads, tc.num_attention_heads, tc.num_key_value_heads
    p = "model.language_model.layers.2.self_attn."
    q, k, v = (sd[p + f"{x}_proj.weight"] for x in "qkv")
    per = heads // groups
    want = torch.cat([torch.cat([q[g * per * d:(g + 1) * per * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                      for g in range(groups)])  # [q × heads/groups; k; v] × groups
    assert torch.equal(mc["language_model.decoder.layers.2.self_attention.linear_qkv.weight"], want)
    bq, bk, bv = (sd[p + f"{x}_proj.bias"] for x in "qkv")
    want_b = torch.cat([torch.cat([bq[g * per * d:(g + 1) * per * d], bk[g * d:(g + 1) * d], bv[g * d:(g + 1) * d]])
                        for g in range(groups)])
    assert torch.equal(mc["language_model.decoder.layers.2.self_attention.linear_qkv.bias"], want_b)
    fused = sd["model.visual.blocks.1.attn.qkv.weight"]  # [q; k; v] over all heads
    vd, vh = vc.hidden_size // vc.num_heads, vc.num_heads
    vq, vk, vv = fused.chunk(3)
    want_v = torch.cat([torch.cat([x[h * vd:(h + 1) * vd] for x in (vq, vk, vv)]) for h in range(vh)])
    assert torch.equal(mc["vision_model.decoder.layers.1.self_attention.linear_qkv.weight"], want_v)
    m = "model.language_model.layers.0.mlp."
    assert torch.equal(mc["language_model.decoder.layers.0.mlp.linear_fc1.weight"],
                       torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]]))
    assert torch.equal(mc["vision_model.decoder.final_layernorm.weight"], sd["model.visual.merger.ln_q.weight"])
    assert torch.equal(mc["vision_model.projection.encoder.linear_fc2.bias"], sd["model.visual.merger.mlp.2.bias"])
    assert torch.equal(mc["vision_model.patch_embed.weight"], sd["model.visual.patch_embed.proj.weight"])
    assert cfg.tie_word_embeddings is False


def test_one_error_lists_every_uncovered_tensor(models):
    hf = models["tiny"]
    sd = dict(hf.state_dict())
    del sd["lm_head.weight"], sd["model.visual.blocks.3.mlp.up_proj.bias"]
    sd["model.visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        next(hf_to_mcore(sd, hf.config))
    msg = str(e.value)
    for n in ("lm_head.weight", "model.visual.blocks.3.mlp.up_proj.bias", "model.visual.extra.weight"):
        assert n in msg
    mc = hf_to_mcore_dict(hf.state_dict(), hf.config)
    del mc["language_model.decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(ValueError, match="layers.1.mlp.linear_fc2.weight"):
        next(mcore_to_hf(mc, hf.config))


def test_tied_model_accepts_and_ignores_lm_head(models):
    hf = models["tiny-tied"]
    sd = dict(hf.state_dict())
    sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
    assert "language_model.output_layer.weight" not in hf_to_mcore_dict(sd, hf.config)


def test_streams_lazily_from_a_getter(models):
    hf = models["tiny"]
    sd = hf.state_dict()
    calls = []

    def get(name):
        calls.append(name)
        return sd[name]

    it = hf_to_mcore(get, hf.config, names=list(sd))
    assert calls == []  # planning reads no tensor
    name, t = next(it)
    assert name == "language_model.embedding.word_embeddings.weight" and len(calls) == 1
    rest = dict(it)
    assert len(rest) + 1 == len(mcore_names(hf.config)) and sorted(calls) == sorted(sd)
