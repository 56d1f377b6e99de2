"""The homework: which reference functions become exercises, in which file, for how many points.

Every exercise is a function of lora_np with exactly its name and signature. The handout is
made from the reference function itself (lora_np.course.make): its signature and docstring,
formula and shapes included, are kept and its body becomes a blank; the solutions keep the
body. So the exercises cannot drift from the code they teach, and lora_np's own modules carry
no solution markers.

Each handout file starts with the imports its solution needs (NumPy and lora_np's helpers such
as check_int); the functions being written are never imported from lora_np there.
"""

from dataclasses import dataclass

from ..core import layers, lora
from ..training import counting, optim, train


@dataclass(frozen=True)
class Exercise:
    id: str  # "E1" ... "E7": the name the grader, the notebooks and the guide use
    title: str
    file: str  # the handout file that holds it
    points: int
    blanks: tuple  # ((reference object, method name or None), ...): the bodies the student writes


@dataclass(frozen=True)
class HandoutFile:
    name: str
    doc: str  # the file's docstring, which says what to do
    imports: str  # what the solutions use; given to the student as is


EXERCISES = (
    Exercise("E1", "LoRA layer forward (eq. 3, α/r, dropout into A)", "lora_layer.py", 10,
             ((layers.lora_linear_forward, None),)),
    Exercise("E2", "LoRA layer backward (dx, dA, dB; no B·A)", "lora_layer.py", 20,
             ((layers.lora_linear_backward, None),)),
    Exercise("E3", "init_lora: A random, B zero", "lora_adapters.py", 10, ((lora.init_lora, None),)),
    Exercise("E4", "merge / unmerge", "lora_adapters.py", 10, ((lora.merge, None), (lora.unmerge, None))),
    Exercise("E5", "counting LoRA's parameters", "lora_counting.py", 10,
             ((counting.lora_params, None), (counting.lora_transformer_params, None),
              (counting.config_lora_params, None))),
    Exercise("E6", "one LoRA fine-tuning step: what trains, AdamW", "lora_finetune.py", 20,
             ((train.trainable_names, None), (optim.AdamW, "step"))),
    Exercise("E7", "challenge: LayerNorm, attention, embedding backward", "lora_challenge.py", 20,
             ((layers.layernorm_backward, None), (layers.attention_backward, None),
              (layers.embedding_backward, None))),
)  # fmt: skip

_CHECK = (
    "Check as you go in the notebook, or from a terminal in this folder:\n"
    "    python -m lora_np course grade . --only {ids}\n"
    "Do not import the functions you are writing from lora_np: the grader compares yours with them."
)

FILES = (
    HandoutFile(
        "lora_layer.py",
        "E1 and E2: the LoRA layer, h = W0·x + b + (α/r)·B·A·drop(x) (paper eq. 3, Section 4.1).\n\n"
        "Tokens are rows, so in code the layer reads out = x @ W.T + b + s * (xd @ A.T) @ B.T.\n"
        "The cache is part of the contract: E2 is graded on the cache the reference E1 returns,\n"
        "so keep its layout exactly as the docstring of lora_linear_forward describes.\n"
        "lora_linear_forward raises ValueError for a dropout outside [0, 1) and for dropout > 0\n"
        "without an rng (E1 grades it, as the notebook asks).\n\n"
        + _CHECK.format(ids="E1,E2"),
        "import numpy as np",
    ),
    HandoutFile(
        "lora_adapters.py",
        "E3 and E4: adapters for the tiny GPT. init_lora makes them (A random, B zero, so the\n"
        "adapted model starts as exactly the pretrained one); merge folds W' = W0 + s·B·A into the\n"
        "weights for inference, unmerge takes it out again (paper Section 4.1).\n\n"
        "Helpers you may use: adapter_names(cfg, lora) gives every adapter's name and shape;\n"
        "check_adapters(params, adapters, lora) validates; lora.scaling is s. init_lora raises\n"
        "ValueError for an r above min(d_out, d_in) of a target (check_rank; E3 grades it).\n\n"
        + _CHECK.format(ids="E3,E4"),
        "import numpy as np\n\n"
        "from lora_np.config import LoraConfig, ModelConfig\n"
        "from lora_np.lora import adapter_names, check_adapters, check_rank\n"
        "from lora_np.params import check_seed, is_quantized",
    ),
    HandoutFile(
        "lora_counting.py",
        "E5: how many numbers LoRA trains: one weight, a whole transformer, a lora_np model\n"
        "(paper Section 4.1; |Θ| = 2·L̂·d_model·r in Section 5.1).\n\n"
        "Helpers you may use: check_int (validation), block_shapes(d_model, d_mlp).\n\n"
        + _CHECK.format(ids="E5"),
        "from collections.abc import Mapping\n\n"
        "from lora_np.config import LoraConfig, ModelConfig, check_int\n"
        "from lora_np.counting import check_shapes, block_shapes",
    ),
    HandoutFile(
        "lora_finetune.py",
        "E6: one LoRA fine-tuning step. trainable_names decides what trains (only the adapters,\n"
        "and some biases if asked); AdamW updates exactly those arrays. The model's forward and\n"
        "backward are given: lora_np.train.loss_and_grads(params, x, y, adapters, lora, trainable).\n\n"
        + _CHECK.format(ids="E6"),
        "import math\nfrom numbers import Real\n\nimport numpy as np\n\n"
        "from lora_np.optim import check_positive, Optimizer\n"
        "from lora_np.train import BIAS_OPTIONS",
    ),
    HandoutFile(
        "lora_challenge.py",
        "E7 (challenge): the backward of LayerNorm, of causal attention and of the embedding lookup.\n"
        "The forwards are given (imported from lora_np.layers); read them first.\n\n"
        + _CHECK.format(ids="E7"),
        "import numpy as np\n\n"
        "from lora_np.layers import attention_forward, embedding_forward, layernorm_forward  # noqa: F401 (given)",
    ),
)

BY_ID = {e.id: e for e in EXERCISES}
TOTAL_POINTS = sum(e.points for e in EXERCISES)


def exercises_in(file_name):
    return [e for e in EXERCISES if e.file == file_name]
