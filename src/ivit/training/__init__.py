"""Training: the resumable, distributed trainer, checkpoints, run logs."""
