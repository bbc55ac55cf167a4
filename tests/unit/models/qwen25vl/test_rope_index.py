"""3D M-RoPE position ids equal transformers' `Qwen2_5_VLModel.get_rope_index` (images, videos, text, padding)."""

import pytest
import torch

from megatron_mmpl.models.qwen25vl.rope_index import rope_index, rope_index_batch, rope_index_kwargs

pytestmark = pytest.mark.unit

IMG, VID, VSTART, VEND = 250, 251, 252, 253


@pytest.fixture(scope="module")
def hf():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           tokens_per_second=2, spatial_merge_size=2, patch_size=14, window_size=56),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )
    return Qwen2_5_VLModel(cfg), cfg


def _hf_positions(model, ids, img=None, vid=None, secs=None, mask=None):
    tt = (ids == IMG).int() + 2 * (ids == VID).int()
    return model.get_rope_index(ids, tt, img, vid, secs, mask)


def _prompt(parts, g):
    """parts: list of int (text length) or ('i'|'v', t, h, w) → token ids [s] (vision wrapped in start/end)."""
    out = []
    for p in parts:
        if isinstance(p, int):
            out += torch.randint(0, 200, (p,), generator=g).tolist()
        else:
            kind, t, h, w = p
            out += [VSTART] + [IMG if kind == "i" else VID] * (t * h * w // 4) + [VEND]
    return torch.tensor(out)


def _grids(parts, kind):
    gs = [p[1:] for p in parts if not isinstance(p, int) and p[0] == kind]
    return torch.tensor(gs, dtype=torch.long) if gs else None


CASES = {
    "text": [7],
    "image": [3, ("i", 1, 4, 6), 5],
    "two_images": [2, ("i", 1, 8, 4), 3, ("i", 1, 2, 2), 4],
    "video": [4, ("v", 3, 4, 4), 2],
    "mixed": [1, ("v", 2, 6, 4), 3, ("i", 1, 4, 4), ("i", 1, 2, 6), 2, ("v", 4, 2, 2), 3],
    "image_first_and_last": [("i", 1, 6, 2), 2, ("i", 1, 2, 2)],
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("secs", [None, "float"])
def test_single_sample_matches_transformers(hf, name, secs):
    model, cfg = hf
    g = torch.Generator().manual_seed(0)
    parts = CASES[name]
    ids = _prompt(parts, g)
    img, vid = _grids(parts, "i"), _grids(parts, "v")
    n_vid = 0 if vid is None else len(vid)
    sec = None if secs is None or not n_vid else torch.tensor([0.5, 1.3, 2 / 3, 0.77][:n_vid])
    ref_pos, ref_delta = _hf_positions(model, ids[None], img, vid, sec)
    pos, delta = rope_index(ids, img, vid, sec, **rope_index_kwargs(cfg))
    assert torch.equal(pos, ref_pos[:, 0]), name
    assert delta == int(ref_delta[0, 0])
    if n_vid and sec is not None:  # python floats give the same ids as a tensor
        pos2, _ = rope_index(ids, img, vid, sec.tolist(), **rope_index_kwargs(cfg))
        assert torch.equal(pos2, pos)


def test_batch_with_padding_matches_transformers(hf):
    model, cfg = hf
    g = torch.Generator().manual_seed(1)
    samples = [CASES["mixed"], CASES["text"], CASES["two_images"], CASES["video"]]
    seqs = [_prompt(p, g) for p in samples]
    s = max(len(x) for x in seqs) + 2
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    for i, x in enumerate(seqs):  # left padding, as generation batches use
        ids[i, s - len(x):], mask[i, s - len(x):] = x, 1
    img = torch.cat([_grids(p, "i") for p in samples if _grids(p, "i") is not None])
    vid = torch.cat([_grids(p, "v") for p in samples if _grids(p, "v") is not None])
    sec = torch.tensor([1.0, 0.5, 1.7])
    ref_pos, ref_delta = _hf_positions(model, ids, img, vid, sec, mask)
    pos, delta = rope_index_batch(ids, img, vid, sec, mask, **rope_index_kwargs(cfg))
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta)


def test_random_prompts_match_transformers(hf):
    model, cfg = hf
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        parts = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            r = torch.randint(0, 3, (1,), generator=g).item()
            if r == 0:
                parts.append(int(torch.randint(1, 6, (1,), generator=g)))
            else:
                t = 1 if r == 1 else int(torch.randint(1, 4, (1,), generator=g))
                h, w = (2 * int(torch.randint(1, 5, (1,), generator=g)) for _ in range(2))
                parts.append(("i" if r == 1 else "v", t, h, w))
        ids = _prompt(parts, g)
        img, vid = _grids(parts, "i"), _grids(parts, "v")
        sec = None if vid is None else torch.rand(len(vid), generator=g) * 3
        ref_pos, ref_delta = _hf_positions(model, ids[None], img, vid, sec)
        pos, delta = rope_index(ids, img, vid, sec, **rope_index_kwargs(cfg))
        assert torch.equal(pos, ref_pos[:, 0]), parts
        assert delta == int(ref_delta[0, 0])


def test_clear_errors(hf):
    _, cfg = hf
    kw = rope_index_kwargs(cfg)
    ids = torch.tensor([1, VSTART] + [IMG] * 4 + [VEND, 2])
    with pytest.raises(ValueError, match="implies"):
        rope_index(ids, torch.tensor([[1, 4, 6]]), **kw)
    with pytest.raises(ValueError, match="no image_grid_thw"):
        rope_index(ids, **kw)
    bad = torch.tensor([1, 3] + [IMG] * 4 + [VEND, 2])
    with pytest.raises(ValueError, match="vision_start"):
        rope_index(bad, torch.tensor([[1, 4, 4]]), **kw)
    split = torch.tensor([VSTART, IMG, IMG, 5, IMG, IMG, VEND])
    with pytest.raises(ValueError, match="contiguous"):
        rope_index(split, torch.tensor([[1, 4, 4]]), **kw)
