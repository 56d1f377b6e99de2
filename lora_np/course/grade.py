"""`python -m lora_np course grade DIR`: the autograder.

Each exercise runs in a process of its own (worker.py) with a time limit, so a student's code
that loops forever, exits, crashes or eats the process loses that exercise's points and nothing
else; its output never reaches the grader's table or its JSON. The checks themselves, with their
points, are in checks.py.

The result prints as a table, a hint under every failed check; `--json FILE` writes it in the
format Gradescope's autograder reads,

    {"score": ..., "execution_time": ..., "output": ...,
     "tests": [{"name", "number", "score", "max_score", "status", "output"}, ...]}

and the exit status is 0 only at full marks.
"""

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from ..studies.cli import Parser, check_out_file
from ..training.checkpoint import write_atomic
from ..training.threads import add_threads_flag, apply_threads
from .checks import CHECKS
from .exercises import BY_ID, EXERCISES, FILES
from .sandbox import Sandbox, TimeUp
from .student import Failure

DEFAULT_TIMEOUT = 120.0  # seconds an exercise may take; the solutions need a few


@dataclass
class Result:
    exercise: str
    id: str  # "E2.1"
    title: str
    points: int
    passed: bool
    hint: str  # why it failed, or ""
    note: str = ""  # something to fix that costs nothing, e.g. a debugging print

    @property
    def score(self):
        return self.points if self.passed else 0


def _checks(ex_id):
    return CHECKS[ex_id]


def run_exercise(directory, ex_id, timeout, box=None):
    """Grade one exercise: its checks run here, the student's functions in a sandbox (sandbox.py).
    A check that raised Failure failed with its hint; at the time limit the rest fail. `box`: a
    Sandbox already started for this exercise (grade starts them all at once), closed here."""
    ex = BY_ID[ex_id]
    out, notes, stopped = [], [], None
    if not os.path.isfile(os.path.join(directory, ex.file)):
        stopped = f"{ex.file} is missing: submit every file of the handout"
    elif box is None:
        box = Sandbox(directory, ex.file, 0.0)
    if box is not None:
        box.deadline = time.monotonic() + timeout
    try:
        for check_id, title, points, fn in _checks(ex_id):
            hint = stopped
            if hint is None:
                hint = _run_check(fn, box, ex.file)
                if isinstance(hint, TimeUp):
                    stopped = hint = (f"not finished: time limit of {timeout:g} s exceeded (an endless loop, or "
                                      f"far too slow) during or before this check")  # fmt: skip
            out.append(Result(ex_id, check_id, title, points, hint is None, hint or ""))
    finally:
        if box is not None:
            notes = box.notes
            box.close()
    if notes and out:
        out[0].note = notes[0]
    return out


def _run_check(fn, box, file_name):
    """None when the check passed, else its hint (or TimeUp)."""
    try:
        fn(box)
        return None
    except Failure as e:
        return str(e)
    except TimeUp as e:
        return e
    except Exception as e:
        if type(e).__module__.startswith("hypothesis"):  # e.g. Flaky: a failure that did not repeat
            return (f"{file_name} gave different results for the same input from one call to the next "
                    f"({type(e).__name__}); a layer must be a pure function of its inputs")
        return f"the grader failed on this check ({type(e).__name__}: {e}); please report it"


def grade(directory, only=None, timeout=DEFAULT_TIMEOUT):
    """Every check of the chosen exercises (all by default), in order: a list of Result."""
    chosen = [ex for ex in EXERCISES if only is None or ex.id in only]
    # every exercise's process started now, all importing at once under one deadline: a file that
    # sleeps or loops at import costs one time limit in all, not one an exercise
    boxes, started = {}, time.monotonic()
    try:
        for ex in chosen:
            if os.path.isfile(os.path.join(directory, ex.file)):
                boxes[ex.id] = Sandbox(directory, ex.file, 0.0)
                boxes[ex.id].spawn(import_deadline=started + timeout)
        results = []
        for ex in chosen:
            results.extend(run_exercise(directory, ex.id, timeout, boxes.pop(ex.id, None)))
    finally:
        for box in boxes.values():
            box.close()
    return results
    return results


def table(results, directory):
    lines = [f"lora_np course grade {directory}", "", f"{'exercise':<56} {'points':>7}  result"]
    for ex in EXERCISES:
        rs = [r for r in results if r.exercise == ex.id]
        if rs:
            got, top = sum(r.score for r in rs), sum(r.points for r in rs)
            status = "passed" if got == top else "failed"
            lines.append(f"{ex.id + ' ' + ex.title:<56} {f'{got}/{top}':>7}  {status}")
            for r in rs:
                if r.note:
                    lines.append(f"    note: {r.note}")
                if not r.passed:
                    lines.append(f"    {r.id} {r.title} (-{r.points})")
                    lines.append(f"        {r.hint}")
    got, top = sum(r.score for r in results), sum(r.points for r in results)
    lines += ["", f"{'total':<56} {f'{got}/{top}':>7}  {'full marks' if got == top else ''}".rstrip()]
    return "\n".join(lines)


def gradescope(results, seconds, text, hide_until_due=False):
    """Gradescope's results.json: one test a check, its score and max_score, the hint as its output.
    hide_until_due: the tests, their hints and the table are shown after the due date only; the
    student sees that the submission was graded, and the score then too."""
    shown = "after_due_date" if hide_until_due else "visible"
    note = {r.exercise: r.note for r in results if r.note}
    return {
        "score": sum(r.score for r in results),
        "execution_time": round(seconds, 1),
        "output": text if not hide_until_due else "Graded. The checks and their hints are shown after the due date.",
        "visibility": shown,
        "stdout_visibility": "hidden",
        "tests": [
            {"name": f"{r.id} {r.title}", "number": r.id, "score": r.score, "max_score": r.points,
             "status": "passed" if r.passed else "failed", "visibility": shown,
             "output": r.hint + (f"\nnote: {note.pop(r.exercise)}" if r.exercise in note else "")}
            for r in results
        ],  # fmt: skip
    }


def find_files(directory):
    """{handout file: its path} for the handout's files anywhere under `directory` (a submission
    zipped with its folder puts them in a subfolder); the shallowest wins."""
    found = {}
    for root, dirs, files in sorted(os.walk(directory), key=lambda w: w[0].count(os.sep)):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for f in FILES:
            if f.name in files and f.name not in found:
                found[f.name] = os.path.join(root, f.name)
    return found


def check(*ids, directory="."):
    """For the exercise notebooks: grade some exercises of the handout in `directory`, print the
    table, and return True when they all get full marks. check("E1") or check("E1", "E2")."""
    only = _check_ids(ids)
    results = grade(directory, only)
    print(table(results, directory))
    return all(r.passed for r in results)


def _check_ids(ids):
    bad = [i for i in ids if i not in BY_ID]
    if not ids or bad:
        raise ValueError(f"exercises must be among {sorted(BY_ID)}, got {list(ids) if ids else 'none'}")
    return set(ids)


def main(argv, prog="python -m lora_np course grade"):
    p = Parser(prog=prog, description="Grade a course handout: every exercise, with hints.")
    p.add_argument("dir", help="the handout folder holding the student's .py files")
    p.add_argument("--only", default="", help="comma-separated exercises, e.g. E1,E2 (default: all)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds each exercise may take (default {DEFAULT_TIMEOUT:g})")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the results here, in Gradescope's results.json format")
    p.add_argument("--find-files", action="store_true",
                   help="look for the handout's files in dir's subfolders too, and grade a dir without any (each "
                        "missing file scores 0 with a message): for a submission as Gradescope unpacks it")
    p.add_argument("--hide-until-due", action="store_true",
                   help="with --json: the checks and hints are shown to the student after the due date only")
    add_threads_flag(p)
    a = p.parse_args(argv)
    if importlib.util.find_spec("hypothesis") is None:
        p.error("grading draws its test cases with hypothesis, which is not installed: python -m pip install "
                "'lora-np[course]' (from a clone: python -m pip install -e '.[course]')")  # fmt: skip
    try:  # every argument checked before any student code runs; the output path first
        if a.json is not None:
            check_out_file("--json", a.json)
        only = _check_ids([s.strip() for s in a.only.split(",") if s.strip()]) if a.only else None
        if not os.path.isdir(a.dir):
            raise ValueError(f"dir {a.dir!r} is not a folder")
        files = sorted({BY_ID[e].file for e in (only or BY_ID)})
        if a.find_files:
            pass  # everything missing is graded too: 0 points, a message for each file
        elif not any(os.path.isfile(os.path.join(a.dir, f)) for f in files):  # some missing: those exercises fail
            raise ValueError(f"dir {a.dir!r} has none of {', '.join(files)}: is it a handout from `course make`?")
        if not (a.timeout > 0 and a.timeout < float("inf")):
            raise ValueError(f"--timeout must be a number of seconds > 0, got {a.timeout}")
    except ValueError as e:
        p.error(str(e))
    # the workers inherit the count; on stderr, so stdout is the grade report alone
    apply_threads(a.threads, log=lambda line: print(line, file=sys.stderr))
    start = time.perf_counter()
    if a.find_files:
        with tempfile.TemporaryDirectory() as gathered:  # the files found, side by side, as the handout has them
            for name, path in find_files(a.dir).items():
                shutil.copyfile(path, os.path.join(gathered, name))
            results = grade(gathered, only, a.timeout)
    else:
        results = grade(a.dir, only, a.timeout)
    text = table(results, a.dir)
    print(text)
    if a.json is not None:
        doc = gradescope(results, time.perf_counter() - start, text, a.hide_until_due)
        write_atomic(a.json, lambda f: f.write(json.dumps(doc, indent=1, ensure_ascii=False).encode("utf-8")))
    return 0 if all(r.passed for r in results) else 1
