"""One exercise, graded in a process of its own: python -m lora_np.course.worker DIR EXERCISE RESULTS.

Started by grade.py, never by hand. It imports the student's file for EXERCISE from DIR, runs
that exercise's checks in order and appends one JSON line per check to RESULTS as soon as the
check ends, so the checks finished before a time-out or a crash still count.
"""

import importlib.util
import json
import os
import sys
import traceback


def load(directory, file_name):
    """Import DIR/file_name under its own name (DIR first on sys.path, so its files can import each other)."""
    path = os.path.join(directory, file_name)
    sys.path.insert(0, os.path.abspath(directory))
    spec = importlib.util.spec_from_file_location(file_name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, path


def main(argv):
    directory, ex_id, results = argv
    from .checks import CHECKS
    from .exercises import BY_ID
    from .student import Failure, Student

    ex = BY_ID[ex_id]
    try:
        if not os.path.isfile(os.path.join(directory, ex.file)):
            raise FileNotFoundError(f"{ex.file} is missing")
        student = Student(*load(directory, ex.file))
        problem = None
    except FileNotFoundError as e:
        problem = f"{e}: submit every file of the handout"
    except BaseException as e:  # a SyntaxError, an exception or sys.exit() at import time
        tb = [fr for fr in traceback.extract_tb(e.__traceback__) if os.path.basename(fr.filename) == ex.file]
        line = getattr(e, "lineno", None) or (tb[-1].lineno if tb else "?")
        problem = f"{ex.file} could not be imported: {type(e).__name__} at line {line}: {str(e)[:200]}"
    with open(results, "a", encoding="utf-8") as out:
        for check_id, _, _, fn in CHECKS[ex_id]:
            hint = problem
            if hint is None:
                try:
                    fn(student)
                except Failure as e:
                    hint = str(e)
                except Exception as e:
                    if type(e).__module__.startswith("hypothesis"):  # e.g. Flaky: a failure that did not repeat
                        hint = (f"{ex.file} gave different results for the same input from one call to the next "
                                f"({type(e).__name__}); a layer must be a pure function of its inputs")
                    else:  # student calls are contained in Student.call: this is the grader's own error
                        hint = f"the grader failed on this check ({type(e).__name__}: {e}); please report it"
            out.write(json.dumps({"id": check_id, "hint": hint}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
