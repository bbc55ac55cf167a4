"""HF ⇄ Megatron-Core conversion: `mapping` (the declarative name/layout registry) and the CLI pieces on top."""
