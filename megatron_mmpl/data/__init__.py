"""Long-document data: page images (Qwen smart_resize/patchify), chat template + answer mask, sample schema, shards
by length bucket, synthetic documents and the visual needle, the streaming mixture loader and packing.

Entry points: `tokenizer.load_tokenizer`, `synth.write_synth`, `build.write_build`, `loader.build_train_loader`,
`packing.collate_packed`; CLI `mmpl data synth|build|inspect` (commands.py).
"""
