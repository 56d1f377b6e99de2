"""After LoRA: its successors and the adapter baselines, each a layer pair plugged into the core's seam."""
