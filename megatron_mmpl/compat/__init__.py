"""Overrides of megatron-core behaviour, each naming the megatron call it serves and the version it was written for."""
