"""Training and measuring: data, optimizers, the training loop, checkpoints, run sets (runset), counts."""
