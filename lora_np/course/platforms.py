"""The homework on the two platforms courses grade with: a Gradescope autograder zip and an
nbgrader course folder (`python -m lora_np course make DIR --gradescope | --nbgrader`).

Gradescope (its autograder specification): the zip holds `setup.sh`, run once when the image is
built, which installs the pinned versions of lora_np's dependencies (the versions that made the
handout, so hypothesis draws the same cases as on the student's machine), and `run_autograder`,
run for each submission as root, which grades /autograder/submission (the files may sit in a
subfolder) into /autograder/results/results.json. lora_np itself is in the zip, under src/;
run_autograder makes /autograder/source readable by root alone before grading, so the student's
process (another user, grade.py) cannot read the reference there.

nbgrader: `source/hw1/` holds the solutions notebooks, with nbgrader's cell metadata and
delimiters (generate_assignment makes the students' version), and the blank exercise files;
nbgrader_config.py sets `Autograde.exclude_overwriting`, without which autograde copies the
blank .py files over the student's before running the notebooks, and every check() scores 0.
"""

import io
import os
import stat
import zipfile
from importlib.metadata import version

from ..training.checkpoint import write_atomic
from .exercises import FILES
from .make import exercise_file, make

PINNED = ("numpy", "matplotlib", "threadpoolctl", "hypothesis")  # lora_np's dependencies and the course extra
ASSIGNMENT = "hw1"

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, when it builds the autograder's image (made by python -m lora_np course make --gradescope).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --no-cache-dir -r requirements.txt
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this for each submission, as root; the student's files are in $ROOT/submission,
# perhaps in a subfolder. AUTOGRADER_ROOT lets it run elsewhere, for a test.
set -u
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
chmod -R go-rwx "$ROOT/source"  # lora_np's reference is in there: out of the student's process's reach
mkdir -p "$ROOT/results"
cd "$ROOT/source"
PYTHONPATH="$ROOT/source/src" python3 -m lora_np course grade "$ROOT/submission" --find-files \\
    --timeout {timeout} --json "$ROOT/results/results.json"{hide}
status=$?
# 0 at full marks and 1 below both wrote results.json; anything else is the grader's own failure.
[ "$status" -le 1 ] || exit "$status"
exit 0
"""


def requirements():
    return "".join(f"{name}=={version(name)}\n" for name in PINNED)


def gradescope_zip(path, hide_until_due=False, timeout=60):
    """Write Gradescope's autograder zip to `path`."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lora_np's folder, put in the zip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text, mode in (
            ("setup.sh", SETUP, 0o755),
            ("run_autograder", RUN.format(timeout=timeout, hide=" --hide-until-due" if hide_until_due else ""), 0o755),
            ("requirements.txt", requirements(), 0o644),
        ):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | mode) << 16
            z.writestr(info, text)
        for root, dirs, files in os.walk(package):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for f in sorted(files):
                if f.endswith((".pyc", ".pyo")):
                    continue
                full = os.path.join(root, f)
                z.write(full, os.path.join("src", "lora_np", os.path.relpath(full, package)))
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def nbgrader_course(out_dir, force=False):
    """Write nbgrader's course folder: nbgrader_config.py and source/hw1 (solutions notebooks, blank .py files)."""
    source = os.path.join(out_dir, "source", ASSIGNMENT)
    os.makedirs(os.path.dirname(source), exist_ok=True)
    written = [f"source/{ASSIGNMENT}/{n}" for n in make(source, solutions=True, force=force)]
    for f in FILES:  # the students write these: nbgrader hands them out as they are, so blank
        text = exercise_file(f, False).encode("utf-8")
        write_atomic(os.path.join(source, f.name), lambda out, t=text: out.write(t))
    write_atomic(os.path.join(out_dir, "nbgrader_config.py"), lambda out: out.write(nbgrader_config().encode()))
    return written + ["nbgrader_config.py"]


def nbgrader_config():
    files = ", ".join(repr(f.name) for f in FILES)
    return f'''"""nbgrader's settings for the lora_np homework (python -m lora_np course make --nbgrader)."""

c = get_config()  # noqa: F821 (nbgrader provides it)
c.CourseDirectory.course_id = "lora_np"
# The students' .py files are their work: without this, autograde copies the blank ones from source/
# over them before running the notebooks, and every check() scores 0.
c.Autograde.exclude_overwriting = {{"{ASSIGNMENT}": [{files}]}}
'''

