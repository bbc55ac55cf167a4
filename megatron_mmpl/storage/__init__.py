"""What lands on disk: atomic files and directories (atomic.py), the checkpoint directory layout (checkpoint_dir.py),
one trainer per run directory (run_lock.py)."""
