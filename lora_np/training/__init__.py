"""Training and measuring: data, optimizers, the training loop, checkpoints, counts."""
