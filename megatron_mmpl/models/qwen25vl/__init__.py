"""Qwen2.5-VL on Megatron-Core.

rope_index (3D M-RoPE positions, no model needed) · presets (config.json data) · configs (HF config →
TransformerConfigs) · vision_geometry / vision_model (ViT) · specs (layer specs) · model (Qwen25VLModel) ·
build (build_model, full-weight load/gather) · testing (tiny random models and prompts for tests).
Modules are imported directly; this package imports nothing heavy.
"""
