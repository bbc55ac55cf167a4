"""Greedy generation with a KV cache from an exported Hugging Face checkpoint (transformers' `generate`):
bf16 + SDPA on a GPU, fp32 on the CPU; RoPE scaling (yarn | linear) written into the loaded config the way
`model.rope_scaling` does for training, so one checkpoint is evaluated at 1×, 2×, 4× its training length.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron_mmpl.data.images import ImageProcessor, ImageProcessorConfig
from megatron_mmpl.data.tokenizer import load_tokenizer, special_ids, tokenizer_fingerprint
from megatron_mmpl.eval.prompts import Prompt, build_prompt, collate, plan_batches, prompt_length


def rope_scaling_arg(spec: str | None, trained_len: int | None) -> dict | None:
    """`--rope-scaling` (none | yarn:<factor> | linear:<factor>) as HF rope keys; yarn's original length is
    --trained-len (the window the checkpoint was trained at, in tokens)."""
    if spec is None or spec == "none":
        return None
    kind, _, factor = spec.partition(":")
    try:
        f = float(factor)
    except ValueError:
        f = None
    if kind not in ("yarn", "linear") or f is None or f < 1:
        raise ValueError(f"--rope-scaling {spec!r}: use none, yarn:<factor> or linear:<factor> with factor >= 1 "
                         "(e.g. yarn:4 to read 4x the trained length)")
    if kind == "linear":
        return {"rope_type": "linear", "factor": f}
    if not trained_len:
        raise ValueError("--rope-scaling yarn needs --trained-len (the training window in tokens, e.g. 32768)")
    return {"rope_type": "yarn", "factor": f, "original_max_position_embeddings": int(trained_len)}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    return torch.device(device)


def load_model(model_dir: str, device: torch.device, rope_scaling: dict | None = None):
    """The exported model for inference (eval mode): bf16 + sdpa on CUDA, fp32 + sdpa on the CPU."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.config.hf_config import apply_rope_overrides

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"--model {model_dir!r} has no config.json; export with `mmpl convert mcore-to-hf`")
    cfg = AutoConfig.from_pretrained(model_dir)
    apply_rope_overrides(cfg, None, rope_scaling)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, config=cfg, dtype=dtype,
                                                               attn_implementation="sdpa")
    return model.to(device).eval()


def load_processing(model_dir: str, shards_index: dict | None = None):
    """(tokenizer, ImageProcessor) of the checkpoint; for shards, the ones the data was built with — refused when
    the checkpoint's tokenizer counts tokens differently."""
    from transformers import AutoTokenizer


    has_tok = any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "vocab.json"))
    if shards_index is not None:
        tok = load_tokenizer(shards_index["tokenizer_name"])
        if has_tok and tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir)) != shards_index["tokenizer"]:
            raise ValueError(f"the shards were tokenized with {shards_index['tokenizer_name']!r}, which is not the "
                             f"tokenizer in {model_dir}; evaluate with data built by the model's tokenizer")
        return tok, ImageProcessor(ImageProcessorConfig.from_dict(shards_index["image_processor"]))
    if not has_tok:
        raise FileNotFoundError(f"{model_dir} has no tokenizer files; export with `mmpl convert mcore-to-hf "
                                "--tokenizer ...`")
    tok = AutoTokenizer.from_pretrained(model_dir)
    path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; export with `mmpl convert mcore-to-hf` (it writes one)")
    with open(path) as f:
        pp = json.load(f)
    size = pp.get("size") or {}
    keys = dict(min_pixels=pp.get("min_pixels", size.get("shortest_edge")),
                max_pixels=pp.get("max_pixels", size.get("longest_edge")), patch_size=pp.get("patch_size"),
                temporal_patch_size=pp.get("temporal_patch_size"), merge_size=pp.get("merge_size"),
                image_mean=pp.get("image_mean"), image_std=pp.get("image_std"))
    return tok, ImageProcessor(ImageProcessorConfig.from_dict({k: v for k, v in keys.items() if v is not None}))


@dataclass
class Generated:
    prompt: Prompt
    tokens: list[int]
    """New tokens up to (not including) the first end-of-turn token."""
    text: str
    first_logits: torch.Tensor
    """[V] fp32 logits of the first generated position."""


@torch.no_grad()
def greedy(model, batch: dict, max_new_tokens: int, eos_ids: list[int], pad_id: int):
    """(new token ids per row [b, ≤max_new_tokens] before the first eos, first-step logits [b, V])."""
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                          pad_token_id=pad_id, use_cache=True, return_dict_in_generate=True, output_logits=True)
    out = model.generate(**batch, generation_config=gc)
    new = out.sequences[:, batch["input_ids"].shape[1]:].tolist()
    rows = []
    for r in new:
        cut = next((i for i, t in enumerate(r) if t in eos_ids), len(r))
        rows.append(r[:cut])
    return rows, out.logits[0].float().cpu()


def generate_all(model, items, tokenizer, improc, *, max_new_tokens: int, max_len: int | None = None,
                 batch_size: int = 1, batch_tokens: int | None = None, progress: bool = True, skipped=None):
    """Yield a `Generated` per item that fits (in batches of similar length); items that do not fit in max_len
    are appended to `skipped`."""

    ids = special_ids(tokenizer)
    eos, pad = [ids.im_end, ids.endoftext], ids.endoftext
    device = next(model.parameters()).device
    lengths = [prompt_length(it, it.page_sizes, tokenizer, improc) for it in items]
    bar = tqdm(total=len(items), desc="generate", unit="doc", disable=not progress)
    try:
        for idx in plan_batches(lengths, batch_size, batch_tokens):
            prompts = []
            for i in idx:
                p = build_prompt(items[i], tokenizer, improc, max_len)
                if p is None:
                    if skipped is not None:
                        skipped.append(items[i])
                else:
                    prompts.append(p)
            if prompts:
                rows, logits = greedy(model, collate(prompts, pad, model.config.image_token_id, device),
                                      max_new_tokens, eos, pad)
                for p, r, lg in zip(prompts, rows, logits):
                    yield Generated(p, r, tokenizer.decode(r, skip_special_tokens=True), lg)
            bar.update(len(idx))
    finally:
        bar.close()
