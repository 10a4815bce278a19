"""Training support: trainable-part spec and table, checkpoints, distributed set-up, memory estimate."""
