"""Exports carry tokenizer, image-processor and chat-template files that transformers loads: the tokenizer's special
ids equal the model config's, the image processor has Qwen2.5-VL's settings, the chat template renders image
placeholders, and `AutoProcessor.from_pretrained` works (on the GPU machine: it needs torchvision for its video
processor, and no torchvision build runs beside CI's torch==2.13.0 CPU wheel — PyPI's torchvision 0.28.0, the
release for torch 2.13, fails to import there with "operator torchvision::nms does not exist")."""

import pytest

pytestmark = pytest.mark.unit
QUICKSTART_IDS = dict(vocab_size=512, image_token_id=492, video_token_id=493, vision_start_token_id=489,
                      vision_end_token_id=490)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from megatron_mmpl.data.processor_files import write_processor_files
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset

    out = tmp_path_factory.mktemp("export")
    cfg = hf_config_from_preset("tiny", **QUICKSTART_IDS)
    write_processor_files(out, cfg, "tiny", min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    cfg.save_pretrained(out)
    return out


def test_tokenizer_and_image_processor_load_with_transformers(export_dir):
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(export_dir)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == QUICKSTART_IDS["image_token_id"]
    assert tok.convert_tokens_to_ids("<|vision_start|>") == QUICKSTART_IDS["vision_start_token_id"]
    ip = Qwen2VLImageProcessorPil.from_pretrained(export_dir)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert ip.size == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}


def test_wrong_tokenizer_for_the_model_is_refused(tmp_path):
    from megatron_mmpl.data.processor_files import write_processor_files
    from megatron_mmpl.models.qwen25vl.presets import hf_config_from_preset

    with pytest.raises(ValueError, match="disagrees with the model config on special ids"):
        write_processor_files(tmp_path, hf_config_from_preset("tiny"), "tiny")  # test preset: other ids


def test_chat_template_renders_image_placeholders(export_dir):
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_dir)
    template = json.loads((export_dir / "chat_template.json").read_text())["chat_template"]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which page is marked?"}]}]
    text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Which page is marked?" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.gpu  # needs torchvision (see the module docstring), which the GPU machine has
def test_auto_processor_loads_the_export(export_dir):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(export_dir)
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which page is marked?"}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in proc.apply_chat_template(msgs, tokenize=False)
