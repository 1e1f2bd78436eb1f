"""The Ray Train loop shared by warmup and finetune: exact gradient accumulation, checkpoints, resume."""
