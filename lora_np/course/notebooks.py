"""The course's five exercise notebooks, as data: NOTEBOOKS maps a file name to its list of cells.

A cell is a tuple ("markdown" | "code", source). The cells are written for the solutions version:
written answers and small "compute this" tasks sit between nbgrader's solution delimiters, each on a
line of its own (in markdown cells too). The handout replaces each delimited region by nbgrader's default
stub, "# YOUR CODE HERE" and "raise NotImplementedError()" in code, "YOUR ANSWER HERE" in markdown; no
other line of any cell contains the delimiters' text.

The student's code lives in the handout's .py files, which the notebooks import (they run with the
handout folder as the working directory):

    1_lora_layer.ipynb     E1, E2   lora_layer.py      lora_linear_forward, lora_linear_backward
    2_adapters.ipynb       E3, E4   lora_adapters.py   init_lora, merge, unmerge
    3_counting.ipynb       E5       lora_counting.py   lora_params, lora_transformer_params, config_lora_params
    4_finetune_step.ipynb  E6       lora_finetune.py   trainable_names, AdamW.step
    5_challenge.ipynb      E7       lora_challenge.py  layernorm_backward, attention_backward, embedding_backward

Every notebook checks as it goes (asserts on small inputs, gradient checks in float64 against finite
differences of the student's own forward), then calls lora_np.course.check("E<n>"), and asks inline
questions whose answers cite the paper (Hu et al. 2021, arXiv:2106.09685) by section and table. Each
notebook builds its own tiny model, so each runs on its own.
"""

from .nb_adapters import CELLS as _ADAPTERS
from .nb_challenge import CELLS as _CHALLENGE
from .nb_counting import CELLS as _COUNTING
from .nb_finetune import CELLS as _FINETUNE
from .nb_lora_layer import CELLS as _LORA_LAYER

NOTEBOOKS = {
    "1_lora_layer.ipynb": _LORA_LAYER,
    "2_adapters.ipynb": _ADAPTERS,
    "3_counting.ipynb": _COUNTING,
    "4_finetune_step.ipynb": _FINETUNE,
    "5_challenge.ipynb": _CHALLENGE,
}
