"""The grader against a cheating student: each attempt below once got marks (issue 20), and
each must now score nothing. A cheat is the blank handout's file with code added, as a student
would submit it; the grader under test is the one a course runs (`course grade`).

Two attempts need the grader to run as root, which is how Gradescope runs it and how CI runs
this suite: a user id of its own for the student's process is what keeps it from writing the
grader's files, and a mount namespace is what hides lora_np's source from it.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lora_np
from lora_np.course.exercises import BY_ID
from lora_np.course.grade import grade

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the student's process runs as another user only when the grader "
                                "is root (Gradescope, CI); as a user it can write what that user can")  # fmt: skip
PACKAGE = Path(lora_np.__file__).resolve().parent
PASS_LINES = "".join(json.dumps({"id": f"E{e}.{i}", "hint": None}) + "\n" for e in (1, 2) for i in range(1, 7))

# name -> (file, code added to the blank handout's file, exercises graded)
CHEATS = {
    "a two-line wrapper around lora_np's function": ("lora_layer.py", """
import lora_np.layers as _ref
def lora_linear_forward(*a, **k): return _ref.lora_linear_forward(*a, **k)
def lora_linear_backward(*a, **k): return _ref.lora_linear_backward(*a, **k)
""", "E1,E2"),
    "a subclass of lora_np's AdamW": ("lora_finetune.py", """
import lora_np.optim
class AdamW(lora_np.optim.AdamW):
    pass
""", "E6"),
    "import_module, then __module__ = __name__": ("lora_layer.py", """
import importlib
_m = importlib.import_module("lora_np.layers")
lora_linear_forward, lora_linear_backward = _m.lora_linear_forward, _m.lora_linear_backward
lora_linear_forward.__module__ = lora_linear_backward.__module__ = __name__
""", "E1,E2"),
    "lora_np's source read and exec-ed": ("lora_layer.py", """
import os, lora_np
_src = os.path.join(os.path.dirname(lora_np.__file__), "core", "layers.py")
exec(compile(open(_src).read(), __file__, "exec"))
""", "E1,E2"),
    "the grader's CHECKS replaced": ("lora_layer.py", """
try:
    from lora_np.course import checks as _c
    for _ex in _c.CHECKS.values():
        _ex[:] = [(i, t, p, lambda student: None) for i, t, p, _ in _ex]
except Exception:
    pass
""", "E1,E2"),
    "the grader's rel_error patched": ("lora_layer.py", """
try:
    import lora_np.course.checking as _k, lora_np.course.checks_layers as _l
    _k.rel_error = _l.rel_error = lambda a, b: 0.0
except Exception:
    pass
def lora_linear_forward(x, W, b, A, B, scaling, *, dropout=0.0, rng=None):
    xd = x.reshape(-1, W.shape[1])
    return np.zeros((*x.shape[:-1], W.shape[0])), (x, W, xd, None, xd @ A.T, A, B, scaling)
""", "E1"),
    "pass lines written to the results file, then os._exit(0)": ("lora_layer.py", f"""
import os, sys
try:
    open(sys.argv[-1], "a").write({PASS_LINES!r})
except Exception:
    pass
os._exit(0)
""", "E1,E2"),
    "the results file forged, then a sleep past the time limit": ("lora_layer.py", f"""
import sys, time
try:
    open(sys.argv[-1], "a").write({PASS_LINES!r})
except Exception:
    pass
time.sleep(60)
""", "E1,E2"),
    "the grader detected (argv[0]), the reference returned": ("lora_layer.py", """
import sys
if sys.argv[0].endswith("worker.py"):
    try:
        from lora_np.core.layers import lora_linear_backward, lora_linear_forward
        lora_linear_forward.__module__ = lora_linear_backward.__module__ = __name__
    except ImportError:
        pass
""", "E1,E2"),
    "a detached process appending pass lines after the checks": ("lora_layer.py", f"""
import subprocess, sys
_late = "import time; time.sleep(1.5); open(%r, 'a').write(%r)" % (sys.argv[-1], {PASS_LINES!r})
try:
    subprocess.Popen([sys.executable, "-c", _late], start_new_session=True, close_fds=False)
except Exception:
    pass
""", "E1,E2"),
}  # fmt: skip


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    root = tmp_path_factory.mktemp("cheats")
    r = subprocess.run([sys.executable, "-m", "lora_np", "course", "make", str(root / "handout")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return root / "handout"


def cheat(handout, tmp_path, file, code):
    work = tmp_path / "student"
    shutil.copytree(handout, work)
    with open(work / file, "a") as f:
        f.write(code)
    return work


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_a_cheat_scores_nothing(handout, tmp_path, name):
    file, code, only = CHEATS[name]
    work = cheat(handout, tmp_path, file, code)
    start = time.monotonic()
    results = grade(work, set(only.split(",")), timeout=4)
    took = time.monotonic() - start
    assert sum(r.score for r in results) == 0, [(r.id, r.hint) for r in results if r.passed]
    assert took < 4 + 3, f"{took:.1f} s: a sleep at import costs one time limit, not one an exercise"


def _run_grader_copy(tmp_path, student, only):
    """`course grade` from a copy of lora_np, so a cheat that writes the grader writes the copy."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "lora_np", ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(site, 0o755)
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import lora_np; "
            f"assert lora_np.__file__.startswith({str(site)!r}), lora_np.__file__; "
            f"from lora_np.course.grade import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    out = tmp_path / f"results_{student.name}.json"
    r = subprocess.run([sys.executable, "-c", code, str(student), "--only", only, "--json", str(out)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode in (0, 1), r.stderr
    return json.loads(out.read_text())["score"], site / "lora_np"


@needs_root
def test_a_cheat_that_writes_the_installed_grader_changes_nothing(handout, tmp_path):
    """Gradescope's environment is reused: a cheat that appended to the installed checks.py once
    scored 90, and the next, honest, blank submission 100."""
    site_checks = tmp_path / "site" / "lora_np" / "course" / "checks.py"
    patch = "\nfor _ex in CHECKS.values():\n    _ex[:] = [(i, t, p, lambda s: None) for i, t, p, _ in _ex]\n"
    code = f"""
try:
    open({str(site_checks)!r}, "a").write({patch!r})
except Exception:
    pass
"""
    work = cheat(handout, tmp_path, "lora_layer.py", code)
    score, package = _run_grader_copy(tmp_path, work, "E1,E2")
    assert score == 0
    assert (package / "course" / "checks.py").read_text() == (PACKAGE / "course" / "checks.py").read_text()
    honest = tmp_path / "honest"
    shutil.copytree(handout, honest)
    code = f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); from lora_np.course.grade import grade; "
    code += f"print(sum(r.score for r in grade({str(honest)!r}, {{'E1', 'E2'}})))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "0", r.stdout + r.stderr


@needs_root
def test_the_reference_on_disk_is_out_of_reach(handout, tmp_path):
    """The student knows where lora_np lives and reads it there: hidden from the student's process."""
    code = f"""
_src = open({str(PACKAGE / "core" / "layers.py")!r}).read()
exec(compile(_src, __file__, "exec"))
"""
    work = cheat(handout, tmp_path, "lora_layer.py", code)
    results = grade(work, {"E1"}, timeout=20)
    assert sum(r.score for r in results) == 0
    assert "could not be imported" in results[0].hint, results[0].hint


def test_the_students_process_sees_numpy_and_the_handouts_helpers_only(handout, tmp_path):
    """The lora_np the student's code imports holds the helpers the handout imports, no exercise."""
    code = """
import sys, lora_np.layers, lora_np.lora, lora_np.counting, lora_np.optim
_seen = [n for m in (lora_np.layers, lora_np.lora, lora_np.counting, lora_np.optim) for n in vars(m)]
_bad = [n for n in ("lora_linear_forward", "lora_linear_backward", "init_lora", "merge", "unmerge", "lora_params",
                    "AdamW", "layernorm_backward", "attention_backward", "embedding_backward") if n in _seen]
_bad += [p for p in sys.path if "site-packages" in p and not p.endswith("site")]
def lora_params(d_out, d_in, r):
    return 1000 * (len(_bad) + 1)  # 1000 when the process saw nothing it should not
"""
    work = cheat(handout, tmp_path, "lora_counting.py", code)
    results = grade(work, {"E5"}, timeout=30)
    assert "returned 1,000, " in results[0].hint, results[0].hint
    assert BY_ID["E5"].points > 0


def test_the_sandbox_without_root_still_grades(handout, tmp_path, monkeypatch):
    """As a user (a student grading their own work), no user id to switch to: the same grade."""
    import lora_np.course.sandbox as sandbox

    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    solutions = tmp_path / "sol"
    r = subprocess.run([sys.executable, "-m", "lora_np", "course", "make", str(solutions), "--solutions"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sum(r.score for r in grade(solutions, {"E5"})) == BY_ID["E5"].points
