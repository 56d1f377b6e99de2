"""Pieces shared by the course notebooks (lora_np.course.notebooks).

A cell is a tuple ("markdown" | "code", source). Written answers and small "compute this" tasks sit
between nbgrader's solution delimiters, each on a line of its own; no other line of any cell may
contain those two phrases, since nbgrader replaces every line range they enclose.
"""

from textwrap import dedent


def md(text):
    """A markdown cell; the source is dedented and stripped of blank lines at both ends."""
    return ("markdown", dedent(text).strip("\n"))


def code(text):
    """A code cell; the source is dedented and stripped of blank lines at both ends."""
    return ("code", dedent(text).strip("\n"))


# The paragraph every notebook's introduction ends with.
HOW_TO_WORK = """\
**How to work.** Open this notebook from the handout folder: the notebook runs in that folder, so
`from lora_layer import ...` imports *your* file. Write each function in its `.py` file, then run the
cells below it, in order. A cell that calls a function you have not written yet stops with
`NotImplementedError`: that is expected; run the cells after you write the function. The first code cell
turns on `autoreload`, so an edit to a `.py` file is picked up the next time you run a cell, without
restarting the kernel.

Three kinds of check, from quick to thorough:

- the asserts in the cells below, on small inputs you can print and look at;
- gradient checks: your backward against centered finite differences of your own forward, in float64,
  judged by the relative error `rel_error(a, b)` $= \\max|a-b| / (\\max|a| + \\max|b|)$. Following CS231n, a
  correct gradient of a smooth function gives about $10^{-7}$ or less;
- `check("E1")` (and so on) runs the autograder's own tests for one exercise on the `.py` files of this
  folder, in a fresh process, and prints what passed, what failed and why. It returns `True` at full marks.

**Inline questions** are answered in the markdown cell under each question, in a few precise sentences.
Cite the paper's section, equation or table where you use it, and back a number with a cell that prints it."""


def setup_code(imports):
    """The first code cell: autoreload, one BLAS thread, then `imports` (a block of import lines)."""
    head = """\
# Run this cell first. autoreload re-reads your .py files whenever a cell runs.
%load_ext autoreload
%autoreload 2

import os

# The matrices here are tiny: BLAS threads cost more than they save. Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from lora_np.course import check
"""
    return ("code", head + dedent(imports).strip("\n"))
