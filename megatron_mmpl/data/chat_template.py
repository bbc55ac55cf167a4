"""Qwen2.5-VL chat template rendered straight to token ids, with the answer mask (assistant answers + their <|im_end|>).

Produces exactly the ids of transformers' `Qwen2_5_VLProcessor(text=apply_chat_template(messages), images=...)`:
text between special tokens is encoded as one run (as the HF tokenizer does after splitting out added tokens), and
each image becomes <|vision_start|> + n × <|image_pad|> + <|vision_end|>.
"""

from __future__ import annotations

import numpy as np

from megatron_mmpl.data.tokenizer import SpecialIds, special_ids

DEFAULT_SYSTEM = "You are a helpful assistant."

# The released Qwen2-VL / Qwen2.5-VL chat template (chat_template.json), for HF processors and exports.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def _is_image(part: dict) -> bool:
    return part.get("type") == "image" or "image" in part or "image_url" in part


def render(
    messages: list[dict],
    image_tokens: list[int],
    tokenizer,
    ids: SpecialIds | None = None,
    add_generation_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [s] int64 and answer mask [s] bool of a conversation.

    messages: [{"role", "content": str | [{"type": "image"} | {"type": "text", "text": ...}]}]; the i-th image
    part gets `image_tokens[i]` pad tokens (= t·h·w / merge² of its grid). Videos are not supported here.
    """
    ids = ids or special_ids(tokenizer)
    out_ids: list[np.ndarray] = []
    out_mask: list[np.ndarray] = []
    run: list[tuple[str, bool]] = []  # text pieces since the last special token, with their answer flag

    def flush():
        if not run:
            return
        text = "".join(t for t, _ in run)
        enc = tokenizer._tokenizer.encode(text, add_special_tokens=False)
        tok = np.asarray(enc.ids, dtype=np.int64)
        mask = np.zeros(len(tok), dtype=bool)
        pos = 0
        spans = []
        for t, ans in run:
            if ans and t:
                spans.append((pos, pos + len(t)))
            pos += len(t)
        if spans:
            ends = np.asarray([e for _, e in enc.offsets]) if len(tok) else np.zeros(0, int)
            starts = np.asarray([s for s, _ in enc.offsets]) if len(tok) else np.zeros(0, int)
            for a, b in spans:  # a token is an answer token if it overlaps an answer span
                mask |= (starts < b) & (ends > a)
        out_ids.append(tok)
        out_mask.append(mask)
        run.clear()

    def special(tid: int, answer: bool = False, n: int = 1):
        flush()
        out_ids.append(np.full(n, tid, dtype=np.int64))
        out_mask.append(np.full(n, answer, dtype=bool))

    n_img = 0
    for i, msg in enumerate(messages):
        role, content = msg["role"], msg["content"]
        if i == 0 and role != "system":
            special(ids.im_start)
            run.append((f"system\n{DEFAULT_SYSTEM}", False))
            special(ids.im_end)
            run.append(("\n", False))
        answer = role == "assistant"
        special(ids.im_start)
        run.append((f"{role}\n", False))
        if isinstance(content, str):
            run.append((content, answer))
        else:
            for part in content:
                if _is_image(part):
                    if n_img >= len(image_tokens):
                        raise ValueError(f"conversation has more image parts than the {len(image_tokens)} images given")
                    special(ids.vision_start)
                    special(ids.image_pad, n=int(image_tokens[n_img]))
                    special(ids.vision_end)
                    n_img += 1
                elif part.get("type") == "video" or "video" in part:
                    raise ValueError("video parts are not supported by the long-document pipeline")
                elif "text" in part:
                    run.append((part["text"], answer))
        special(ids.im_end, answer=answer)
        run.append(("\n", False))
    if n_img != len(image_tokens):
        raise ValueError(f"{len(image_tokens)} images given but the conversation has {n_img} image parts")
    if add_generation_prompt:
        special(ids.im_start)
        run.append(("assistant\n", False))
    flush()
    return np.concatenate(out_ids), np.concatenate(out_mask)
