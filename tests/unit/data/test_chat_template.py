"""Token ids of our chat rendering equal transformers' Qwen2.5-VL processor (chat template + image pads) on
multi-image conversations, with the real Qwen2 vocabulary and the tiny one; the answer mask covers answers only."""

import numpy as np
import pytest
from PIL import Image

from megatron_mmpl.data.chat_template import QWEN25VL_CHAT_TEMPLATE, render
from megatron_mmpl.data.images import ImageProcessor, ImageProcessorConfig
from megatron_mmpl.data.tokenizer import (
    QWEN_ADDED_TOKENS,
    build_qwen2_tokenizer,
    build_tiny_tokenizer,
    qwen_tiktoken_path,
    special_ids,
)
from tests.requires import skip_or_fail

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def qwen2():
    try:  # the ranks are read as a file: importing dashscope (and its network client's imports) is not needed
        qwen_tiktoken_path()
    except FileNotFoundError as e:
        skip_or_fail(f"{e} ([dev] extra)")
    return build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


def _processor(tok, max_pixels):
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        """The real processor; only its class check of the (unused) video processor is skipped, because
        transformers' video processor classes need torchvision, which this environment does not install."""

        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)
    return ImageOnlyProcessor(image_processor=ip, tokenizer=tok, video_processor=None,
                              chat_template=QWEN25VL_CHAT_TEMPLATE)


CONVERSATIONS = [
    [  # many pages then a question; single answer word
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "Which page is marked? Answer with one word."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ],
    [  # explicit system, multi-turn, text between images, string content, whitespace/unicode edge cases
        {"role": "system", "content": "You read documents.  Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Page one:\n"}, {"type": "image"},
                                     {"type": "text", "text": " and page two —"}, {"type": "image"},
                                     {"type": "text", "text": "\n\nWhat's the total?  (naïve café, 3.14)"}]},
        {"role": "assistant", "content": "The total is 1,234.5 — see page 2."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "\n  Zero.\n"}]},
    ],
]
SIZES = [(60, 80), (200, 90), (33, 500), (140, 140), (300, 200), (80, 60)]


@pytest.mark.parametrize("which", ["qwen2", "tiny"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_ids_equal_hf_processor(which, conv, request):
    tok = request.getfixturevalue(which)
    msgs = CONVERSATIONS[conv]
    n_img = sum(1 for m in msgs if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image")
    rng = np.random.default_rng(conv)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES[:n_img]]
    proc = _processor(tok, 28 * 28 * 24)
    text = proc.apply_chat_template(msgs, tokenize=False)
    ref = proc(text=[text], images=images, return_tensors="np")
    ours = ImageProcessor(ImageProcessorConfig.from_hf(proc.image_processor))
    grids = [ours(im)[1] for im in images]
    ids, mask = render(msgs, [t * h * w // 4 for t, h, w in grids], tok)
    assert np.array_equal(ref["input_ids"][0], ids)
    # answer mask: exactly the assistant texts and their <|im_end|>
    answers = [m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
               for m in msgs if m["role"] == "assistant"]
    sid = special_ids(tok)
    assert int((ids[mask] == sid.im_end).sum()) == len(answers)
    decoded = tok.decode(ids[mask])
    for a in answers:
        assert a.strip() in decoded
    assert "user" not in tok.decode(ids[mask]) and not mask[ids == sid.image_pad].any()


def test_generation_prompt_equal(tiny):
    proc = _processor(tiny, 28 * 28 * 4)
    msgs = CONVERSATIONS[0][:1]
    images = [Image.new("RGB", (56, 56), (i * 60, 0, 0)) for i in range(3)]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ref = proc(text=[text], images=images, return_tensors="np")["input_ids"][0]
    ids, mask = render(msgs, [4, 4, 4], tiny, add_generation_prompt=True)
    assert np.array_equal(ref, ids) and not mask.any()


def test_qwen2_tokenizer_matches_tiktoken_and_real_ids(qwen2):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from megatron_mmpl.data.tokenizer import qwen_tiktoken_path

    ranks = load_tiktoken_bpe(str(qwen_tiktoken_path()))
    pat = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
    enc = tiktoken.Encoding("qwen", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
    rng = np.random.default_rng(0)
    pieces = list(ranks)
    texts = ["Hello world! It's 2024-05-01.", "你好，世界。 emoji 🎉🎉 ", "  spaces\n\n\tand tabs  "]
    texts += [b"".join(pieces[i] for i in rng.integers(0, len(pieces), 30)).decode("utf-8", "ignore")
              for _ in range(300)]
    import unicodedata

    texts = [t for t in texts if unicodedata.normalize("NFC", t) == t]  # HF normalises NFC, tiktoken does not
    assert len(texts) > 250
    for t in texts:
        assert qwen2.encode(t, add_special_tokens=False) == enc.encode(t), t
    # real ids (as in Qwen2.5-VL's tokenizer and transformers' Qwen2_5_VLConfig defaults)
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig()
    sid = special_ids(qwen2)
    assert (sid.image_pad, sid.video_pad, sid.vision_start, sid.vision_end) == (
        cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    assert (sid.endoftext, sid.im_start, sid.im_end, sid.vision_pad) == (151643, 151644, 151645, 151654)
    assert cfg.text_config.bos_token_id == sid.endoftext and cfg.text_config.eos_token_id == sid.im_end
    assert [qwen2.convert_tokens_to_ids(t) for t in QWEN_ADDED_TOKENS] == list(range(151643, 151665))


def test_tiny_tokenizer_layout(tiny):
    sid = special_ids(tiny)
    assert sid.endoftext == 480 and max(sid.to_dict().values()) < 512
    for w in ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"):
        assert len(tiny.encode(w, add_special_tokens=False)) == 1, w
    moved = special_ids(build_tiny_tokenizer(first_added_id=1000))
    assert moved.image_pad == 1000 + QWEN_ADDED_TOKENS.index("<|image_pad|>")
