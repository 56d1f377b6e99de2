"""After LoRA: its successors and the adapter baselines, each a layer pair plugged into the core's seam.

Importing the package registers every method with the core (lora_np.core.lora.register), each from
its own module.
"""

from . import adapters, dora, nf4, pissa, vera  # noqa: F401
