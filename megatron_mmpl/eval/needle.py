"""Retrieval accuracy on held-out needle documents, with the exported Hugging Face model (transformers forward).

For each sample: the prompt (all pages + question, generation prompt) → the model's next-token prediction at the
answer; correct when it equals the answer's first token. Reported against the documents' chance level.
"""

from __future__ import annotations

import os

import torch

from megatron_mmpl.data.schema import Sample
from megatron_mmpl.data.shards import load_index, load_shard_samples, read_members
from megatron_mmpl.data.tokenizer import load_tokenizer


def iter_samples(shards: str, limit: int | None = None):
    """The Samples of a shard directory, in index order."""

    index = load_index(shards)
    n = 0
    for shard in index["shards"]:
        with open(os.path.join(shards, shard["path"]), "rb") as f:
            for key, offset, nbytes, _ in load_shard_samples(shards, shard):
                if limit is not None and n >= limit:
                    return
                _, members = read_members(f, offset, nbytes)
                yield Sample.from_members(key, members)
                n += 1


def prompt_inputs(sample, tokenizer, improc) -> tuple[dict, str]:
    """transformers inputs for the sample's question (no answer) and the answer text."""
    from megatron_mmpl.data.chat_template import render

    *question, answer_msg = sample.messages
    if answer_msg["role"] != "assistant":
        raise ValueError(f"sample {sample.key}: last message is {answer_msg['role']!r}, not the assistant answer")
    answer = "".join(p.get("text", "") for p in answer_msg["content"]) if not isinstance(answer_msg["content"], str) \
        else answer_msg["content"]
    pvs, grids = zip(*(improc(page) for page in sample.pages)) if sample.pages else ((), ())
    m2 = improc.cfg.merge_size ** 2
    ids, _ = render(question, [t * h * w // m2 for t, h, w in grids], tokenizer, add_generation_prompt=True)
    inputs = {"input_ids": torch.from_numpy(ids)[None]}
    if pvs:
        import numpy as np

        inputs["pixel_values"] = torch.from_numpy(np.concatenate(pvs))
        inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return inputs, answer


@torch.no_grad()
def evaluate_needle(model_dir: str, shards: str, limit: int | None = None) -> dict:
    """Accuracy of the HF model in `model_dir` on the documents in `shards` (and the chance level)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.data.images import ImageProcessor, ImageProcessorConfig

    index = load_index(shards)
    tokenizer = load_tokenizer(index["tokenizer_name"])
    improc = ImageProcessor(ImageProcessorConfig.from_dict(index["image_processor"]))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct, chosen, n, chances = 0, 0, 0, []
    by_len: dict[int, list[int]] = {}  # target length → [correct, total]
    for sample in iter_samples(shards, limit):
        inputs, answer = prompt_inputs(sample, tokenizer, improc)
        logits = model(**inputs).logits[0, -1]  # [V] next token after "<|im_start|>assistant\n"
        target = tokenizer.encode(answer, add_special_tokens=False)[0]
        hit = int(logits.argmax()) == target
        correct += hit
        bucket = by_len.setdefault(int(sample.meta.get("target_tokens", sample.n_tokens)), [0, 0])
        bucket[0] += hit
        bucket[1] += 1
        choices = sample.meta.get("choices")
        if choices:  # prediction restricted to the candidate answers' first tokens
            firsts = [tokenizer.encode(c, add_special_tokens=False)[0] for c in choices]
            chosen += firsts[int(logits[firsts].argmax())] == target
            chances.append(1 / len(choices))
        n += 1
    if n == 0:
        raise ValueError(f"no samples in {shards}")
    return {"samples": n, "accuracy": correct / n, "choice_accuracy": chosen / n if chances else None,
            "chance": sum(chances) / len(chances) if chances else None,
            "by_length": {str(k): {"accuracy": c / t, "samples": t} for k, (c, t) in sorted(by_len.items())}}
