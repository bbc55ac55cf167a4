#!/usr/bin/env python
"""Hugging Face ⇄ Megatron-Core checkpoint conversion; the same code as `mmpl convert`.

    python tools/checkpoint_conversion/convert.py hf-to-mcore --hf HF_DIR --out MCORE_DIR [--dtype bf16|fp32]
    python tools/checkpoint_conversion/convert.py mcore-to-hf --ckpt CKPT_DIR --out HF_DIR
    python tools/checkpoint_conversion/convert.py verify --hf HF_DIR --ckpt MCORE_DIR [--tp N --pp N]
"""

import sys

from megatron_mmpl.conversion.commands import main

if __name__ == "__main__":
    sys.exit(main())
