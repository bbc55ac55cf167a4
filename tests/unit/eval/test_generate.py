"""Greedy generation (transformers' `generate`, KV cache, left-padded batches) equals a hand-rolled greedy loop over
transformers' forward with our own 3D M-RoPE positions, on the tiny model in fp32; --rope-scaling reaches the
loaded model as if the config had carried it."""

import pytest
import torch

from tests.unit.eval.fixtures import write_tiny_export

pytestmark = pytest.mark.unit
NEW = 6


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_tiny_export(tmp_path_factory.mktemp("hf") / "tiny")


def _items(export, targets):
    from megatron_mmpl.data.needle import needle_sample
    from megatron_mmpl.eval.generate import load_processing
    from megatron_mmpl.eval.sources import sample_item

    tok, improc = load_processing(str(export))
    return [sample_item(needle_sample(f"d{i}", t, tok, improc, seed=3)) for i, t in enumerate(targets)], tok, improc


def _reference(model, prompt, eos):
    """Greedy by hand: the whole sequence through forward every step, no cache, positions from our rope_index."""
    from megatron_mmpl.models.qwen25vl.rope_index import rope_index, rope_index_kwargs

    ids = torch.from_numpy(prompt.input_ids)
    grid = torch.tensor(prompt.grids)
    out = []
    for _ in range(NEW):
        pos, _ = rope_index(ids, grid, None, None, **rope_index_kwargs(model.config))
        with torch.no_grad():
            logits = model(input_ids=ids[None], position_ids=pos[:, None], use_cache=False, image_grid_thw=grid,
                           pixel_values=torch.from_numpy(prompt.pixel_values)).logits[0, -1]
        t = int(logits.argmax())
        if t in eos:
            break
        out.append(t)
        ids = torch.cat([ids, torch.tensor([t])])
    return out


def test_generate_equals_hand_rolled_greedy_single_and_batched(export):
    from megatron_mmpl.data.tokenizer import special_ids
    from megatron_mmpl.eval.generate import generate_all, load_model
    from megatron_mmpl.eval.prompts import build_prompt

    items, tok, improc = _items(export, [100, 112, 124])
    model = load_model(str(export), torch.device("cpu"))
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    ids = special_ids(tok)
    ref = {it.key: _reference(model, build_prompt(it, tok, improc), [ids.im_end, ids.endoftext]) for it in items}
    assert any(len(r) == NEW for r in ref.values())  # the loop really runs several steps
    lengths = {it.key: len(build_prompt(it, tok, improc).input_ids) for it in items}
    assert len(set(lengths.values())) == 3  # the batch is padded
    for batch_size in (1, 3):
        got = {g.prompt.item.key: g.tokens for g in generate_all(model, items, tok, improc, max_new_tokens=NEW,
                                                                 batch_size=batch_size, progress=False)}
        assert got == ref, batch_size


def test_rope_scaling_reaches_the_loaded_model(export):
    from megatron_mmpl.eval.generate import load_model, rope_scaling_arg
    from megatron_mmpl.eval.prompts import build_prompt, collate
    from megatron_mmpl.models.qwen25vl.testing import tiny_hf_model
    from tests.unit.eval.fixtures import TOKENS

    scaling = rope_scaling_arg("yarn:4", trained_len=64)
    assert scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    items, tok, improc = _items(export, [300])
    batch = collate([build_prompt(items[0], tok, improc)], 480, TOKENS["image_token_id"], "cpu")
    plain, scaled = load_model(str(export), torch.device("cpu")), load_model(str(export), torch.device("cpu"), scaling)
    tc = plain.config.get_text_config().to_dict()
    tc["rope_parameters"] = {**tc["rope_parameters"], **scaling}
    built = tiny_hf_model("tiny", seed=0, attn_implementation="sdpa", text_config=tc, **TOKENS)  # same weights
    with torch.no_grad():
        a, b, c = (m(**batch).logits for m in (plain, scaled, built))
    assert (a - b).abs().max() > 1e-2  # the scaling changes the function: the check can fail
    assert (b - c).abs().max() <= 1e-5
    for bad in ("yarn", "ntk:4", "linear:0.5"):
        with pytest.raises(ValueError, match="--rope-scaling"):
            rope_scaling_arg(bad, 64)
    with pytest.raises(ValueError, match="--trained-len"):
        rope_scaling_arg("yarn:4", None)


def test_batches_group_similar_lengths():
    from megatron_mmpl.eval.prompts import plan_batches

    lengths = [100, 95, 50, 90, 48, 200]
    assert plan_batches(lengths, 3) == [[5], [0, 1, 3], [2, 4]]
    assert plan_batches(lengths, 3, batch_tokens=200) == [[5], [0, 1], [3], [2, 4]]
    assert plan_batches(lengths, 1) == [[5], [0], [1], [3], [2], [4]]
