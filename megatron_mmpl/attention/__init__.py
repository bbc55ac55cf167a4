"""Core attention for packed sequences (sdpa / flex / te backends) and context-parallel attention."""
