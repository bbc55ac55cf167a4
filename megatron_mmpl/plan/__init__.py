"""Will a run fit, and how long is it: the memory/throughput planner (memory.py), `mmpl plan` (command.py), the
launch presets it vouches for (presets/*.yaml, shipped as package data) and their generator (generate.py).
Pure Python: reads the model's spec and the run config, imports neither torch nor transformers."""
