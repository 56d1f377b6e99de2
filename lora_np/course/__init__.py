"""The course kit: a homework on LoRA made from lora_np's own reference code, and its autograder.

    python -m lora_np course make DIR [--solutions]    the handout (or its solutions)
    python -m lora_np course grade DIR [--json FILE]   grade it: a table with hints; Gradescope's JSON

exercises.py says which functions are exercises and what they are worth; make.py turns the
reference functions into blanks; checks.py is what the grader checks; grade.py runs the checks,
sandbox.py calls the student's functions in a process of their own (worker.py, with given.py's
helpers and wire.py's data format); platforms.py makes the Gradescope zip and the nbgrader
course; notebooks.py holds the exercise notebooks.
notebooks/COURSE.md is the instructor's guide.
"""


import os

from ..studies.cli import Parser, check_out_dir, fail
from .grade import check as _check
from .grade import main as grade_main
from .make import make
from .platforms import gradescope_zip, nbgrader_course


def check(*ids, directory="."):
    """Grade some exercises of the handout in `directory` (for the notebooks): check("E1")."""
    return _check(*ids, directory=directory)


def main(argv, prog="python -m lora_np course"):
    commands = {"make": _make, "grade": _grade}
    if not argv or argv[0] not in commands:
        p = Parser(prog=prog, description=__doc__.split("\n")[0])
        p.add_argument("command", choices=sorted(commands), help="make a handout, or grade one")
        p.parse_args(argv[:1])  # exits 2 with the usage for a missing or unknown command
    return commands[argv[0]](argv[1:], f"{prog} {argv[0]}")


def _make(argv, prog):
    p = Parser(prog=prog, description="Write the course handout (exercises with blanks).")
    p.add_argument("dir", help="folder to write (created if missing; existing exercise files are never replaced)")
    p.add_argument("--solutions", action="store_true", help="fill every blank: the instructor's version")
    p.add_argument("--force", action="store_true", help="replace exercise files already in dir")
    p.add_argument("--gradescope", action="store_true",
                   help="write dir/autograder.zip for Gradescope instead (setup.sh, run_autograder, pinned versions)")
    p.add_argument("--hide-until-due", action="store_true",
                   help="with --gradescope: students see the checks and hints after the due date only")
    p.add_argument("--nbgrader", action="store_true",
                   help="write an nbgrader course folder instead: dir/nbgrader_config.py and dir/source/hw1/")
    a = p.parse_args(argv)
    if a.gradescope and a.nbgrader:
        p.error("--gradescope and --nbgrader write different things: choose one")
    try:
        check_out_dir("dir", a.dir)
    except ValueError as e:
        fail(prog, str(e))
    try:
        if a.gradescope:
            os.makedirs(a.dir, exist_ok=True)
            zip_path = os.path.join(a.dir, "autograder.zip")
            if os.path.exists(zip_path) and not a.force:
                raise ValueError(f"{zip_path} exists; pass --force to replace it")
            gradescope_zip(zip_path, hide_until_due=a.hide_until_due)
            print(f"wrote Gradescope's autograder to {zip_path} (setup.sh, run_autograder, lora_np, pinned versions)")
            return 0
        if a.nbgrader:
            written = nbgrader_course(a.dir, force=a.force)
            print(f"wrote an nbgrader course to {a.dir}: {', '.join(written[-3:])} and source/hw1/")
            return 0
        written = make(a.dir, solutions=a.solutions, force=a.force)
    except ValueError as e:
        p.error(str(e))
    kind = "solutions" if a.solutions else "handout"
    print(f"wrote the {kind} to {a.dir}: {', '.join(written)}")
    return 0


def _grade(argv, prog):
    return grade_main(argv, prog)
