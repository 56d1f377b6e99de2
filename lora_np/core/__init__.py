"""The reading path: LoRA and the tiny GPT it adapts, as the paper has them (README, "Reading order")."""
