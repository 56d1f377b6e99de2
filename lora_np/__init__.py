"""lora_np: LoRA (Hu et al., 2021) from scratch in NumPy, on a tiny hand-written GPT.

Every layer is a forward/backward pair (lora_np.layers); every gradient is checked against
finite differences (lora_np.gradcheck, tests/). Start with README.md.
"""

from .config import LORA_TARGETS, LoraConfig, ModelConfig
from .lora import init_lora, merge, unmerge
from .model import model_backward, model_forward
from .params import Params, cast, init_params

__all__ = [
    "LORA_TARGETS",
    "LoraConfig",
    "ModelConfig",
    "Params",
    "cast",
    "init_lora",
    "init_params",
    "merge",
    "model_backward",
    "model_forward",
    "unmerge",
]
