"""The Trainer loop, losses, evaluation, checkpoints, history, memory, distributed training, tracking,
metrics."""
