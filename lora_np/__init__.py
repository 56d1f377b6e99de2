"""lora_np: LoRA (Hu et al., 2021) from scratch in NumPy, on a tiny hand-written GPT.

Every layer is a forward/backward pair; every gradient is checked against finite differences.
Read it in this order, each step adding one idea to the one before:

  The reading path, the paper alone (lora_np/core/):
    1. core/config.py     the model's shape and LoRA's r, α, targets (Section 4.1)
    2. core/params.py     the tiny GPT's weights, by the literature's names
    3. core/layers.py     every layer a forward/backward pair; eq. (3) is lora_linear_forward,
                          ∂L/∂A = s·Bᵀ·g·xᵀ and ∂L/∂B = s·g·(A·x)ᵀ are lora_linear_backward
    4. core/model.py      the GPT, forward and backward, with LoRA on any linear weight
    5. core/lora.py       adapters: created (A random, B = 0), checked, merged (W' = W0 + s·B·A)
    6. core/gradcheck.py  finite differences, the judge of every backward
  Then the training, and the rest:
    7. training/   the data, AdamW, the training loop, checkpoints, run sets, counting, Section 7's measures
    8. methods/    what came after LoRA (DoRA, VeRA, PiSSA, LoRA+, QLoRA's NF4 base) and the
                   adapter baselines it is measured against, each plugged into the core by its own
                   module (lora_np.core.lora.register); serving many adapters in one batch (Section 4.2)
    9. io/         GPT-2's published files: safetensors, its BPE tokenizer, its layout, PEFT's format
   10. studies/    programs: the demo, Section 7, the successors, the adapter baselines, full rank,
                   latency and serving, the GPT-2 fine-tune
   11. bench/      LoRA's cost model, measured
   12. figures/    every figure in figures/
   13. course/     the homework and its autograder
   14. __main__.py the `python -m lora_np ...` commands

Each folder is a layer of the house, and a module imports only from its own layer or a lower one.
Layers, lowest first: core, methods, training, io, studies, bench, figures, course, cli (__main__.py).
(The training comes before the methods in the reading order; among the layers it is above them,
since a checkpoint stores a 4-bit base and the counts count every method.) tests/test_house.py
parses every module and fails on an import that runs up, a cycle, or a private name used outside
its module.
"""

import sys

from .core import config, gradcheck, layers, lora, model, params
from .core.config import LORA_TARGETS, LoraConfig, ModelConfig
from .core.lora import init_lora, merge, unmerge
from .core.model import model_backward, model_forward
from .core.params import Params, cast, init_params
from .io import bpe, gpt2, peft, safetensors
from .methods import adapters, dora, nf4, pissa, variants, vera
from .training import analysis, checkpoint, counting, data, optim, train

# Earlier versions kept every module in this one folder; their import paths still work:
# lora_np.dora is the module lora_np/methods/dora.py, the same object under a second name.
for _module in (config, params, layers, model, lora, gradcheck, data, optim, train, checkpoint, counting, analysis,
                dora, vera, pissa, nf4, adapters, variants, gpt2, bpe, safetensors, peft):  # fmt: skip
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
del _module

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
