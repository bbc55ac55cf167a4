"""Run transformers and our Megatron-Core model (at any TP/PP) on a built-in multi-image prompt; compare logits."""

from __future__ import annotations

import torch

from megatron_mmpl.conversion.hf_checkpoint import HFCheckpoint
from megatron_mmpl.models.qwen25vl.testing import hf_logits, mm_prompt
from megatron_mmpl.parallel.process_groups import initialize_parallel
from megatron_mmpl.parallel.spawn import run_distributed
from megatron_mmpl.storage.checkpoint_dir import resolve_checkpoint

# text, image, text, image, text — two image sizes (grid in patches), as in the parity tests
PROMPT = [5, ("image", 1, 4, 6), 3, ("image", 1, 8, 4), 4]


def _rank_logits(ckpt: str, hf_config_dict: dict, batch: dict, tp: int, pp: int):
    """One rank: our model at (tp, pp) from the checkpoint, forward; last stage TP-rank 0 returns the logits."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import Qwen2_5_VLConfig

    from megatron_mmpl.models.qwen25vl.build import build_model, load_model_weights

    layout = initialize_parallel(tp=tp, pp=pp)
    model = build_model(Qwen2_5_VLConfig(**hf_config_dict), layout, dtype=torch.float32,
                        overrides={"perform_initialization": False}).eval()
    load_model_weights(ckpt, model)
    keys = ("pixel_values", "image_grid_thw")

    def step(it, m):
        x = next(it)
        return m(x["input_ids"], x["position_ids"], **{k: x[k] for k in keys if k in x}), None

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=batch["input_ids"].shape[1], micro_batch_size=1, forward_only=True,
        )
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        return out[0].float()
    return None


def verify(hf_dir: str, ckpt_dir: str, tp: int = 1, pp: int = 1) -> dict:
    """Logit agreement of the HF checkpoint and the MCore checkpoint (both evaluated in fp32 on CPU or GPU)."""
    from transformers import Qwen2_5_VLForConditionalGeneration


    src = HFCheckpoint(hf_dir)
    ckpt = resolve_checkpoint(ckpt_dir)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    batch = mm_prompt(hf.config, PROMPT, seed=0)
    with torch.no_grad():
        ref = hf_logits(hf, batch).float()
    del hf
    per_rank = run_distributed(_rank_logits, tp * pp, str(ckpt), src.config_dict, batch, tp, pp)
    ours = next(o for o in per_rank if o is not None)
    diff = (ours - ref).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0).item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"max_abs_logit_diff": diff, "cosine": cos, "argmax_agree": agree}
