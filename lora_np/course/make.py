"""`python -m lora_np course make DIR [--solutions]`: the handout and its solutions, from one source.

The solutions are lora_np's own reference code: each exercise's function (exercises.py) with its
body between nbgrader's delimiters,

    ### BEGIN SOLUTION
    ...the reference body...
    ### END SOLUTION

and the handout is the solutions with every such region replaced by a stub, which is what
nbgrader's `generate_assignment` does to a notebook. The notebooks (notebooks.py) go through the
same replacement. One function writes both versions, so they cannot disagree, and the reference
modules themselves carry no markers.
"""

import ast
import inspect
import json
import os
import textwrap

from ..figures.diagrams import save_diagrams
from ..training.checkpoint import write_atomic
from .exercises import EXERCISES, FILES, TOTAL_POINTS, exercises_in
from .notebooks import NOTEBOOKS

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")  # nbgrader's default stubs
TEXT_STUB = ("YOUR ANSWER HERE",)
FIGURE_NAMES = ("lora_layer", "lora_backward")


def solution_source(obj, method=None):
    """The source of a reference function (or of a class, with one method as the exercise), its
    exercise body wrapped in BEGIN/END SOLUTION. Signature, docstring and comments are kept."""
    src = textwrap.dedent(inspect.getsource(obj))
    lines = src.splitlines()
    node = ast.parse(src).body[0]
    if method is not None:
        node = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    doc, first = node.body[0], node.body[1]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        raise ValueError(f"{obj.__qualname__}: an exercise needs a docstring, which the handout keeps")
    indent = " " * first.col_offset
    start, end = doc.end_lineno, node.end_lineno  # the body: lines (start, end], 1-based
    return "\n".join([*lines[:start], indent + BEGIN, *lines[start:end], indent + END, *lines[end:]]) + "\n"


def strip_solutions(text, stub=CODE_STUB):
    """Replace every BEGIN/END SOLUTION region (markers included) by `stub`, at the marker's indent."""
    out, inside = [], False
    for line in text.splitlines():
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ValueError(f"nested {BEGIN!r}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + s for s in stub)
        elif marker == END:
            if not inside:
                raise ValueError(f"{END!r} without {BEGIN!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN!r} without {END!r}")
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def exercise_file(f, solutions):
    """The text of one handout file: its docstring, its imports, then each exercise in turn."""
    parts = [f'"""{f.doc}\n"""\n\n{f.imports}\n']
    for ex in exercises_in(f.name):
        for obj, method in ex.blanks:
            parts.append(f"\n\n# {'-' * 76}\n# {ex.id}: {ex.title}\n\n\n{solution_source(obj, method)}")
    text = "".join(parts)
    return text if solutions else strip_solutions(text)


def notebook(cells, stem, solutions):
    """An nbformat-4 notebook (a dict) from [(kind, source), ...]. A cell with a solution region
    carries nbgrader's metadata, so nbgrader can generate the student version from the solutions."""
    out = []
    for i, (kind, source) in enumerate(cells):
        has_solution = BEGIN in source
        if not solutions:
            source = strip_solutions(source, CODE_STUB if kind == "code" else TEXT_STUB)
        meta = {}
        if has_solution:
            # a written answer is a manually graded answer for nbgrader, code an autograded answer
            meta["nbgrader"] = {"grade": kind == "markdown", "solution": True, "locked": False,
                                "grade_id": f"{stem}-{i}", "schema_version": 3}  # fmt: skip
            if kind == "markdown":
                meta["nbgrader"]["points"] = 1
        cell = {"cell_type": kind, "id": f"{stem}-{i}", "metadata": meta, "source": source.strip("\n")}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        out.append(cell)
    kernel = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return {"cells": out, "metadata": {"kernelspec": kernel, "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}  # fmt: skip


def readme(solutions):
    rows = "\n".join(f"| {e.id} | {e.title} | `{e.file}` | {e.points} |" for e in EXERCISES)
    version = (
        "This is the **solutions** version: every blank is filled, between `### BEGIN SOLUTION` and\n"
        "`### END SOLUTION`. Do not hand it to students; `python -m lora_np course make DIR` writes theirs.\n"
        if solutions
        else "Write each function where the file says `# YOUR CODE HERE`, keeping its name and signature.\n"
    )
    return f"""# LoRA from scratch: homework

Exercises on LoRA (Hu et al., 2021, arXiv:2106.09685) built from lora_np's reference code.
{version}
| exercise | what | file | points |
|---|---|---|---|
{rows}
| | total | | {TOTAL_POINTS} |

Work through the notebooks in order (`1_lora_layer.ipynb` ... `5_challenge.ipynb`): each explains
its exercise, lets you check your code as you go with `check("E1")`, and asks questions to answer
in writing. Grade everything from a terminal in this folder:

    python -m lora_np course grade .

It prints a table with a hint for each failed check and exits 0 only at full marks.
`--only E1,E2` grades some exercises; `--json results.json` writes Gradescope's format.
"""


def check_out_dir(out_dir, force):
    """Refuse a path that cannot take the handout, before anything is written."""
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f"out_dir must be a folder path, got {out_dir!r}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise ValueError(f"out_dir {out_dir!r}: its parent folder {parent!r} does not exist")
    if not os.access(out_dir if os.path.isdir(out_dir) else parent, os.W_OK):
        raise ValueError(f"out_dir {out_dir!r} is not writable")
    if not force and os.path.isdir(out_dir):
        ours = [f.name for f in FILES] + ["README.md"] + list(_notebook_names())
        ours += [f"figures/{n}.png" for n in FIGURE_NAMES]  # a figure the student redrew is their work too
        present = sorted(n for n in ours if os.path.exists(os.path.join(out_dir, n)))
        if present:
            raise ValueError(
                f"out_dir {out_dir!r} already holds {present[:3]}{'...' if len(present) > 3 else ''}; "
                f"a student's work is never overwritten: choose another folder, or pass --force to replace them"
            )
    return out_dir


def _notebook_names():
    return NOTEBOOKS


def make(out_dir, solutions=False, force=False):
    """Write the handout (or, with solutions=True, the solutions) into out_dir; returns the files written.

    Everything is generated in memory first and each file is written atomically, so a refused
    or failed make leaves no half-written exercise behind.
    """
    out_dir = check_out_dir(out_dir, force)
    texts = {f.name: exercise_file(f, solutions) for f in FILES}
    for name, cells in NOTEBOOKS.items():
        nb = notebook(cells, name.rsplit(".", 1)[0], solutions)
        texts[name] = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    texts["README.md"] = readme(solutions)
    os.makedirs(out_dir, exist_ok=True)
    for name, text in texts.items():
        write_atomic(os.path.join(out_dir, name), lambda f, t=text: f.write(t.encode("utf-8")))
    figures = save_diagrams(os.path.join(out_dir, "figures"), formats=("png",))
    return sorted(texts) + [f"figures/{n}" for n in figures]
