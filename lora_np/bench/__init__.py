"""LoRA's cost model, measured: `python -m lora_np bench`."""
