"""Qwen25VLModel: the ViT (first pipeline stage only) feeding image/video embeddings into a megatron GPTModel."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_mmpl.compat.rope import apply_inv_freq, use_per_token_mrope_under_cp
from megatron_mmpl.models.qwen25vl.configs import Qwen25VLConfigs
from megatron_mmpl.models.qwen25vl.language_model import LanguageModel
from megatron_mmpl.models.qwen25vl.specs import block_spec, language_layer_spec, vision_layer_spec
from megatron_mmpl.models.qwen25vl.vision_model import Qwen25VisionModel
from megatron_mmpl.parallel.context_parallel import ZigzagPlan, encode_vision_over_cp


class Qwen25VLModel(MegatronModule):
    """Qwen2.5-VL on Megatron-Core: `vision_model` (ViT + merger, first stage) and `language_model` (GPTModel).

    forward → logits [b, s, V] (gathered over TP) when labels is None, else per-token loss [b, s].
    """

    def __init__(
        self,
        cfgs: Qwen25VLConfigs,
        pre_process: bool = True,
        post_process: bool = True,
        *,
        attention_backend: str | None = None,
        vp_stage: int | None = None,
        cp_group=None,
    ):
        super().__init__(config=cfgs.language)
        self.cfgs = cfgs
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.pre_process, self.post_process = pre_process, post_process
        self.image_token_id, self.video_token_id = cfgs.spec.tokens.image, cfgs.spec.tokens.video
        self.vision_model = None
        if pre_process:
            spec = vision_layer_spec(cfgs.spec.vision.fullatt_block_indexes, attention_backend)
            self.vision_model = Qwen25VisionModel(cfgs.vision, cfgs.projector, cfgs.spec.vision, spec)
        self.language_model = LanguageModel(
            config=cfgs.language,
            transformer_layer_spec=block_spec(language_layer_spec(attention_backend), cfgs.language, vp_stage),
            vocab_size=cfgs.spec.vocab, max_sequence_length=cfgs.spec.max_position_embeddings,
            pre_process=pre_process, post_process=post_process, parallel_output=True,
            share_embeddings_and_output_weights=cfgs.spec.tied, position_embedding_type="mrope",
            rotary_base=cfgs.spec.rope_theta, scatter_embedding_sequence_parallel=False, vp_stage=vp_stage,
        )
        if "rope_inv_freq" in cfgs.extra:  # linear / YaRN length extension (spec.rope_scaling)

            apply_inv_freq(self.language_model, cfgs.extra["rope_inv_freq"])
        if cfgs.language.context_parallel_size > 1:

            use_per_token_mrope_under_cp(self.language_model)
        self.share_embeddings_and_output_weights = cfgs.spec.tied
        # Run a zero-weighted dummy image through the ViT on text-only training batches, so every rank uses
        # the same parameters (DDP bucket readiness) and joins the same ViT collectives.
        self.dummy_vision_on_text_only = True
        # The context-parallel group (None: CP=1): its ranks share the ViT's images (encode_vision_over_cp).
        self.cp_group = cp_group
        self.tp_group = self.language_model.tp_group  # what parallel/tensor_shards.py shards full weights over

    # Pipeline-schedule plumbing, delegated to the GPTModel.
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params=None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cp_plan: ZigzagPlan | None = None,
    ) -> torch.Tensor:
        """input_ids [b, s]; position_ids [3, b, s] (from rope_index); pixel_values [n_patches, C·T·P·P].

        `packed_seq_params`: PackedSeqParams(qkv_format='sbhd', cu_seqlens_q=cu_seqlens, ...) for packed rows
        (b=1): the LM attends causally within each sample. With labels, the per-token loss is returned unweighted
        (megatron convention: the training loss function applies loss_mask). `cp_plan`: this CP rank's share of
        the packed row (parallel/context_parallel.py); the merged embeddings are split with it (after the vision
        merge, see DESIGN.md), while input_ids stay whole.
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self._merged_embeddings(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, cp_plan
            )
        return self.language_model(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            packed_seq_params=packed_seq_params, runtime_gather_output=True if labels is None else None,
        )

    def _merged_embeddings(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                           cp_plan=None):
        """Token embeddings [s, b, h] with the ViT outputs written at the image/video pad tokens."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        used_vision = False
        for kind, pix, grid, tok in (
            ("image", pixel_values, image_grid_thw, self.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, self.video_token_id),
        ):
            mask = input_ids == tok  # [b, s]
            if pix is None:
                if bool(mask.any()):
                    raise ValueError(f"input_ids hold {int(mask.sum())} {kind} pad tokens (id {tok}) but no "
                                     f"{kind} pixels were given")
                continue
            if grid is None:
                raise ValueError(f"{kind} pixels given without {kind}_grid_thw")
            grid = torch.as_tensor(grid).view(-1, 3)
            implied = int(grid.prod(-1).sum()) // self.cfgs.spec.vision.spatial_merge_size**2
            if int(mask.sum()) != implied:
                raise ValueError(
                    f"input_ids hold {int(mask.sum())} {kind} pad tokens (id {tok}) but {kind}_grid_thw "
                    f"{grid.tolist()} implies {implied} (Σ t·h·w / merge²); the prompt and the {kind}s disagree"
                )
            # Under CP each rank encodes a balanced share of the images; the embeddings are gathered here.
            feats = encode_vision_over_cp(self.vision_model, pix, grid, self.cfgs.spec.vision.spatial_merge_size,
                                          self.cp_group)  # [n_tokens, h]
            emb = emb.transpose(0, 1).masked_scatter(mask[..., None], feats.to(emb.dtype)).transpose(0, 1)
            used_vision = True
        if not used_vision and self.dummy_vision_on_text_only and self.training and torch.is_grad_enabled():
            m, d = self.cfgs.spec.vision.spatial_merge_size, self.cfgs.spec.vision
            dummy = torch.zeros(m * m, d.patch_dim, dtype=emb.dtype, device=emb.device)
            emb = emb + 0.0 * self.vision_model(dummy, torch.tensor([[1, m, m]])).sum()
        if cp_plan is not None:
            emb = cp_plan.split(emb, seq_dim=0)  # [s, b, h] → this CP rank's zigzag share
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb.contiguous()
