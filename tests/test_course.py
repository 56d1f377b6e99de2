"""The course kit: the handout, its solutions and an honest autograder.

The grader is judged by what it does to code whose correctness is known independently: the
untouched handout (nothing written) must score 0, the solutions (lora_np's reference code,
itself checked against finite differences in the rest of this suite) full marks, and each
realistic student bug planted into the solutions must cost points in its own exercise and only
there.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lora_np.course.checks import CHECKS
from lora_np.course.exercises import BY_ID, EXERCISES, FILES, TOTAL_POINTS
from lora_np.course.grade import grade
from lora_np.course.make import BEGIN, END, strip_solutions
from lora_np.course.notebooks import NOTEBOOKS

README = Path(__file__).resolve().parents[1] / "README.md"


def course(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lora_np", "course", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`course make` twice, as an instructor runs it: the handout and the solutions."""
    root = tmp_path_factory.mktemp("course")
    for kind, extra in (("handout", []), ("solutions", ["--solutions"])):
        r = course("make", str(root / kind), *extra)
        assert r.returncode == 0, r.stderr
    return root


# Gradescope's results.json, as its autograder documentation specifies the fields we write.
TOP = {"score": (int, float), "execution_time": (int, float), "output": str, "tests": list}
TEST = {"name": str, "number": str, "score": (int, float), "max_score": (int, float), "status": str, "output": str}


def validate_gradescope(doc):
    for key, types in TOP.items():
        assert isinstance(doc[key], types), key
    assert doc.get("visibility", "visible") in ("visible", "hidden", "after_due_date", "after_published")
    for t in doc["tests"]:
        for key, types in TEST.items():
            assert isinstance(t[key], types), (t, key)
        assert t["status"] in ("passed", "failed") and 0 <= t["score"] <= t["max_score"]
    assert doc["score"] == sum(t["score"] for t in doc["tests"])


def test_the_handout_scores_zero(made, tmp_path):
    out = tmp_path / "results.json"
    r = course("grade", str(made / "handout"), "--json", str(out))
    assert r.returncode == 1, r.stdout + r.stderr  # not full marks
    doc = json.loads(out.read_text())
    validate_gradescope(doc)
    assert doc["score"] == 0
    assert len(doc["tests"]) == sum(len(c) for c in CHECKS.values())
    assert all(t["status"] == "failed" and "not written yet" in t["output"] for t in doc["tests"])
    assert "total" in r.stdout and f"0/{TOTAL_POINTS}" in r.stdout


def test_the_solutions_get_full_marks(made, tmp_path):
    out = tmp_path / "results.json"
    r = course("grade", str(made / "solutions"), "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    validate_gradescope(doc)
    assert doc["score"] == TOTAL_POINTS == 100
    assert all(t["status"] == "passed" and t["output"] == "" for t in doc["tests"])
    assert f"{TOTAL_POINTS}/{TOTAL_POINTS}  full marks" in r.stdout


def test_the_handout_is_the_solutions_with_every_region_stubbed(made):
    """One source, two outputs: stripping the solutions gives the handout, byte for byte."""
    for f in FILES:
        sol = (made / "solutions" / f.name).read_text()
        assert sol.count(BEGIN) == sol.count(END) == sum(len(e.blanks) for e in EXERCISES if e.file == f.name)
        assert (made / "handout" / f.name).read_text() == strip_solutions(sol)
    for nb in sorted((made / "solutions").glob("*.ipynb")):
        sol, hand = json.loads(nb.read_text()), json.loads((made / "handout" / nb.name).read_text())
        assert len(sol["cells"]) == len(hand["cells"])
        marked = 0
        for s, h in zip(sol["cells"], hand["cells"], strict=True):
            if BEGIN in s["source"]:
                marked += 1
                assert s["metadata"]["nbgrader"]["solution"] is True  # nbgrader can make the handout itself
                stub = "YOUR ANSWER HERE" if s["cell_type"] == "markdown" else "raise NotImplementedError()"
                assert stub in h["source"] and BEGIN not in h["source"]
            else:
                assert s == h
        assert marked > 0, nb.name


def test_points_add_up():
    assert {e: sum(c[2] for c in CHECKS[e]) for e in BY_ID} == {e.id: e.points for e in EXERCISES}
    assert TOTAL_POINTS == 100


# (exercise, file, the solution's line, the student's line, a word the hint must contain)
BUGS = {
    "alpha/r missing in dA": ("E2", "lora_layer.py", "dA = dxA.T @ xd if need_dA", "dA = (g @ B).T @ xd if need_dA",
                              "dA"),
    "transposed square W in dx": ("E2", "lora_layer.py", "dx = g @ np.asarray(W)  #", "dx = g @ np.asarray(W).T  #",
                                  "dx"),
    "dropout mask forgotten in backward": ("E2", "lora_layer.py", "dx += dxd if mask is None else dxd * mask",
                                           "dx += dxd", "dropout"),
    "scaling applied twice in forward": ("E1", "lora_layer.py", "h += (scaling * xA) @ B.T",
                                         "h += (scaling * scaling * xA) @ B.T", "times"),
    "scaling applied twice in dB": ("E2", "lora_layer.py", "dB = scaling * (g.T @ xA)",
                                    "dB = scaling * scaling * (g.T @ xA)", "dB"),
    "dx through the merged weight (forms B·A)": ("E2", "lora_layer.py", "dx = g @ np.asarray(W)  #",
                                                 "dx = g @ (W + scaling * B @ A) - (scaling * (g @ B)) @ A  #",
                                                 "d_out × d_in"),
    "frozen dA computed, then dropped": ("E2", "lora_layer.py", "dA = dxA.T @ xd if need_dA else None",
                                         "dA = dxA.T @ xd\n    dA = dA if need_dA else None", "frozen"),
    "unmerge adds instead of subtracting": ("E4", "lora_adapters.py", "params[name] = merged[name] - delta",
                                            "params[name] = merged[name] + delta", "unmerge"),
    "B initialized at random instead of A": ("E3", "lora_adapters.py", 'if name.endswith(".B"):',
                                             'if name.endswith(".A"):', "must start at exactly 0"),
    "merge with alpha/r under rsLoRA": ("E4", "lora_adapters.py",
                                        'delta = lora.scaling * (adapters[name + ".B"] @ adapters[name + ".A"])\n',
                                        'delta = lora.alpha / lora.r * (adapters[name + ".B"]\n'
                                        '            @ adapters[name + ".A"])\n',
                                        "rslora"),
    "weight decay on vectors too": ("E6", "lora_finetune.py", "if self.weight_decay and p.ndim >= 2:",
                                    "if self.weight_decay:", "vector"),
    "AdamW rebinds instead of updating in place": ("E6", "lora_finetune.py", "p -= lr * (m / c1)",
                                                   "self.arrays[name] = p - lr * (m / c1)", "in place"),
    "Adam without bias correction": ("E6", "lora_finetune.py", "p -= lr * (m / c1) / (np.sqrt(v / c2)",
                                     "p -= lr * m / (np.sqrt(v)", "step 1"),
    "embedding W[ids] = dout": ("E7", "lora_challenge.py", "np.add.at(dW, ids.reshape(-1), dout.reshape(-1, D))",
                                "dW[ids.reshape(-1)] = dout.reshape(-1, D)", "dW"),
    "LayerNorm without the variance term": ("E7", "lora_challenge.py", "dx -= through_var", "dx -= 0.0", "dx"),
    "counting A only": ("E5", "lora_counting.py", "return r * (d_in + d_out)", "return r * d_in", "times"),
    # what the notebooks assert is graded too (issue 20): each refusal, removed
    "dropout=1.0 accepted": ("E1", "lora_layer.py", "if not 0.0 <= dropout < 1.0:", "if not 0.0 <= dropout <= 1.0:",
                             "dropout=1.0 must raise ValueError"),
    "init_lora without check_rank": ("E3", "lora_adapters.py", "    check_rank(cfg, lora)\n", "", "r = 9"),
    "lora_params without the rank bound": ("E5", "lora_counting.py", "    if r > min(d_out, d_in):\n",
                                           "    if False:\n", "lora_params(4096, 1024, 1025) must raise"),
    "trainable_names accepts any bias": ("E6", "lora_finetune.py", "    if bias not in BIAS_OPTIONS:\n",
                                         "    if False:\n", "bias='some' must raise"),
}  # fmt: skip


# issue 21: each check with a bug that it alone must see, so that weakening the check fails a test:
# (check, file, the solution's line, the student's line, a word of that check's hint)
OWN_BUGS = {
    "E1.1": ("lora_layer.py", "    h = x2 @ np.asarray(W).T  #", "    h = x2 @ np.asarray(W).T + 1e-7  #",
             "max relative error"),
    # a rate 12σ off: a check loosened to 60σ misses it
    "E1.4": ("lora_layer.py", "mask = (rng.random(x2.shape) >= dropout)",
             "mask = (rng.random(x2.shape) >= 1.15 * dropout)", "of the inputs"),
    "E2.1": ("lora_layer.py", "    dx = g @ np.asarray(W)  #", "    dx = g @ (np.asarray(W) * (1 + 1e-4))  #",
             "finite differences"),
    "E3.2": ("lora_adapters.py", "            adapters[name] = np.zeros(shape)",
             "            adapters[name] = np.zeros(shape)\n            adapters[name][0, 0] = 1e-3", "exactly 0"),
    "E4.1": ("lora_adapters.py", "            merged[name] = merged[name] + delta  # W' = W0 + s·B·A",
             "            merged[name] = merged[name] + delta  # W' = W0 + s·B·A\n"
             "    merged['W_e'] = params['W_e'] * 1.5", "carries no adapter"),
    "E6.3": ("lora_finetune.py", "            p -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps)",
             "            p -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps) + lr * 1e-3 * (name[-1] == 'A')",
             "moved at step 1"),
}  # fmt: skip


def test_a_missing_scaling_is_named_by_every_check_that_sees_it(made, tmp_path):
    work = plant(made, tmp_path, "lora_layer.py", "h += (scaling * xA) @ B.T", "h += xA @ B.T")
    results = {r.id: r for r in grade(work, {"E1"})}
    for check_id in ("E1.1", "E1.2", "E1.4"):  # float64, float32 and dropout: one diagnosis
        assert "the low-rank term of out is" in results[check_id].hint, results[check_id].hint


def test_base_weights_in_trainable_names_cost_in_e6_1_only(made, tmp_path):
    work = plant(made, tmp_path, "lora_finetune.py", "    return names\n", "    return names + ['W_e']\n")
    results = {r.id: r for r in grade(work, {"E6"})}
    assert not results["E6.1"].passed and results["E6.2"].passed and results["E6.3"].passed, results


@pytest.mark.parametrize("check_id", sorted(OWN_BUGS))
def test_each_named_check_sees_its_own_bug(made, tmp_path, check_id):
    file, old, new, word = OWN_BUGS[check_id]
    work = plant(made, tmp_path, file, old, new)
    results = {r.id: r for r in grade(work, {check_id.split(".")[0]})}
    assert not results[check_id].passed and word in results[check_id].hint, results[check_id]


def plant(made, tmp_path, file, old, new):
    work = tmp_path / "student"
    shutil.copytree(made / "solutions", work)
    text = (work / file).read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in the solutions' {file}"
    (work / file).write_text(text.replace(old, new))
    return work


def scores(results):
    return {e: sum(r.score for r in results if r.exercise == e) for e in {r.exercise for r in results}}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_planted_bug_costs_points_in_its_exercise_only(made, tmp_path, bug):
    ex, file, old, new, word = BUGS[bug]
    work = plant(made, tmp_path, file, old, new)
    same_file = {e.id for e in EXERCISES if e.file == file}  # other files are never imported (test below)
    results = grade(work, same_file)
    got = scores(results)
    assert got[ex] < BY_ID[ex].points, f"{bug}: not caught"
    assert all(got[e] == BY_ID[e].points for e in same_file - {ex}), f"{bug}: cost points elsewhere: {got}"
    hints = " ".join(r.hint for r in results if not r.passed)
    assert word in hints, hints


def test_grading_an_exercise_reads_its_own_file_only(made, tmp_path):
    work = tmp_path / "student"
    shutil.copytree(made / "solutions", work)
    for f in FILES:
        if f.name != "lora_counting.py":
            (work / f.name).write_text("this is not Python (\n")
    assert scores(grade(work, {"E5"})) == {"E5": BY_ID["E5"].points}


# What a student's code may do that must not crash the grader: each costs its exercise only.
CONTAINED = {
    "changes its input": ("E2", "lora_layer.py", "    return dx.reshape(x.shape), dA, dB",
                          "    xd[...] = 0.0\n    return dx.reshape(x.shape), dA, dB", "in place"),
    "raises": ("E4", "lora_adapters.py", "    check_adapters(merged, adapters, lora)\n",
               "    raise RuntimeError('oops')\n", "RuntimeError: oops (line"),
    "ends the process": ("E6", "lora_finetune.py", "    if bias not in BIAS_OPTIONS:",
                         "    import os\n    os._exit(3)\n    if bias not in BIAS_OPTIONS:", "exit code 3"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONTAINED))
def test_misbehaving_code_is_contained(made, tmp_path, case):
    ex, file, old, new, word = CONTAINED[case]
    work = plant(made, tmp_path, file, old, new)
    same_file = {e.id for e in EXERCISES if e.file == file}
    results = grade(work, same_file)
    got = scores(results)
    assert got[ex] < BY_ID[ex].points and all(got[e] == BY_ID[e].points for e in same_file - {ex}), got
    assert word in " ".join(r.hint for r in results if not r.passed)


def test_an_endless_loop_meets_the_time_limit_and_the_grader_goes_on(made, tmp_path):
    work = plant(made, tmp_path, "lora_counting.py", "    return r * (d_in + d_out)", "    while True:\n        pass")
    r = course("grade", str(work), "--only", "E5,E6", "--timeout", "5")
    assert r.returncode == 1
    assert "time limit of 5 s exceeded" in r.stdout and "E6 one LoRA fine-tuning step" in r.stdout
    assert "20/20  passed" in r.stdout  # E6, graded after the loop was killed


def test_the_reference_imported_is_not_a_solution(made, tmp_path):
    work = tmp_path / "student"
    shutil.copytree(made / "handout", work)
    (work / "lora_layer.py").write_text("from lora_np.layers import lora_linear_backward, lora_linear_forward\n")
    results = grade(work, {"E1", "E2"})
    assert scores(results) == {"E1": 0, "E2": 0}
    assert all("cannot import name" in r.hint and "cannot come from lora_np" in r.hint for r in results)
    assert not any("lora_np_grade_" in r.hint for r in results)  # no temporary path in what the student reads


def test_a_debugging_print_costs_nothing_and_is_noted(made, tmp_path):
    step = "        self.t += 1\n"
    work = plant(made, tmp_path, "lora_finetune.py", step, step + "        print('step', self.t)\n")
    results = grade(work, {"E6"})
    assert scores(results) == {"E6": BY_ID["E6"].points}
    assert "AdamW.step printed" in results[0].note


def test_a_missing_file_fails_its_exercises_and_the_rest_is_graded(made, tmp_path):
    work = tmp_path / "student"
    shutil.copytree(made / "solutions", work)
    (work / "lora_adapters.py").unlink()
    out = tmp_path / "results.json"
    r = course("grade", str(work), "--only", "E3,E4,E5", "--json", str(out))
    assert r.returncode == 1
    doc = json.loads(out.read_text())
    validate_gradescope(doc)
    assert doc["score"] == BY_ID["E5"].points
    assert all("lora_adapters.py is missing" in t["output"] for t in doc["tests"] if t["number"][:2] in ("E3", "E4"))


def test_a_syntax_error_fails_its_file_with_the_line(made, tmp_path):
    work = plant(made, tmp_path, "lora_counting.py", "    return r * (d_in + d_out)", "    return r * (d_in + d_out")
    results = grade(work, {"E5"})
    assert scores(results) == {"E5": 0}
    assert all("could not be imported: SyntaxError" in r.hint for r in results)


@pytest.mark.parametrize(
    "args, message",
    [
        (["grade", "nowhere"], "is not a folder"),
        (["grade", ".", "--only", "E9"], "exercises must be among"),
        (["grade", "."], "has none of lora_adapters.py"),
        (["grade", "HANDOUT", "--json", "HANDOUT"], "must be a file path"),
        (["grade", "HANDOUT", "--timeout", "0"], "--timeout must be"),
        (["make", "HANDOUT"], "never overwritten"),
        (["nope"], "invalid choice"),
    ],
)
def test_bad_command_lines_get_one_clear_line_and_exit_2(made, tmp_path, args, message):
    args = [a.replace("HANDOUT", str(made / "handout")) for a in args]
    r = course(*args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_make_never_overwrites_a_students_work_unless_forced(made, tmp_path):
    work = tmp_path / "h"
    shutil.copytree(made / "handout", work)
    (work / "lora_layer.py").write_text("# my work\n")
    assert course("make", str(work)).returncode == 2
    assert (work / "lora_layer.py").read_text() == "# my work\n"
    assert course("make", str(work), "--force").returncode == 0
    assert (work / "lora_layer.py").read_text() == (made / "handout" / "lora_layer.py").read_text()


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_the_solutions_notebooks_run_top_to_bottom(made, name):
    """Each exercise notebook, solved, runs in its folder as a student runs it (its asserts included)."""
    nb = nbformat.reads((made / "solutions" / name).read_text(), as_version=4)
    where = {"metadata": {"path": str(made / "solutions")}}  # the kernel's working folder
    NotebookClient(nb, timeout=300, kernel_name="python3", resources=where).execute()


def test_the_readme_counts_the_exercises():
    words = {5: "Five", 6: "Six", 7: "Seven", 8: "Eight", 9: "Nine"}
    assert f"{words[len(EXERCISES)]} exercises" in README.read_text(encoding="utf-8")


def test_the_guide_quotes_the_graders_points():
    """notebooks/COURSE.md lists every check and exercise with its points: they must be the grader's."""
    guide = (README.parent / "notebooks" / "COURSE.md").read_text(encoding="utf-8")
    checks = dict(re.findall(r"^\| (E\d\.\d) \| .* \| (\d+) \|$", guide, flags=re.M))
    assert checks == {cid: str(points) for ex in CHECKS.values() for cid, _, points, _ in ex}
    rows = re.findall(r"^\| (E\d)(?: \(challenge\))? \| `(\w+\.py)` \| .* \| (\d+) \| .* \|$", guide, flags=re.M)
    assert rows == [(e.id, e.file, str(e.points)) for e in EXERCISES]
    assert f"| | | | **{TOTAL_POINTS}** | |" in guide


def test_make_never_replaces_a_students_own_figure(made, tmp_path):
    work = tmp_path / "h"
    (work / "figures").mkdir(parents=True)
    (work / "figures" / "lora_layer.png").write_bytes(b"my drawing")
    assert course("make", str(work)).returncode == 2
    assert (work / "figures" / "lora_layer.png").read_bytes() == b"my drawing"


def _autograder(made, tmp_path, submission):
    """Gradescope's layout in a scratch folder: the zip unpacked in source/, the submission, then run_autograder."""
    root = tmp_path / "autograder"
    r = course("make", str(tmp_path / "zip"), "--gradescope")
    assert r.returncode == 0, r.stderr
    import zipfile

    zipfile.ZipFile(tmp_path / "zip" / "autograder.zip").extractall(root / "source")
    shutil.copytree(submission, root / "submission")
    env = dict(os.environ, AUTOGRADER_ROOT=str(root), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(root / "source" / "run_autograder")], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((root / "results" / "results.json").read_text())
    validate_gradescope(doc)
    assert str(tmp_path) not in json.dumps(doc).replace(str(root / "submission"), "")  # no temporary path
    return doc


def test_gradescope_zip_grades_a_submission_in_a_subfolder(made, tmp_path):
    sub = tmp_path / "sub"
    (sub / "hw1").mkdir(parents=True)
    for f in ("lora_counting.py", "lora_layer.py"):  # one subfolder deep, three files missing
        shutil.copy(made / "solutions" / f, sub / "hw1" / f)
    doc = _autograder(made, tmp_path, sub)
    by_ex = {e.id: sum(t["score"] for t in doc["tests"] if t["number"].startswith(e.id + ".")) for e in EXERCISES}
    assert by_ex == {"E1": 10, "E2": 20, "E3": 0, "E4": 0, "E5": 10, "E6": 0, "E7": 0}
    assert any("lora_adapters.py is missing" in t["output"] for t in doc["tests"])


def test_the_gradescope_zip_pins_versions_and_nbgrader_keeps_the_students_files(tmp_path):
    import zipfile

    assert course("make", str(tmp_path / "z"), "--gradescope", "--hide-until-due").returncode == 0
    z = zipfile.ZipFile(tmp_path / "z" / "autograder.zip")
    pins = z.read("requirements.txt").decode()
    assert all(re.search(rf"^{name}==\d", pins, flags=re.M) for name in ("numpy", "hypothesis", "matplotlib"))
    assert "--hide-until-due" in z.read("run_autograder").decode() and "src/lora_np/core/layers.py" in z.namelist()
    assert course("make", str(tmp_path / "nb"), "--nbgrader").returncode == 0
    config = (tmp_path / "nb" / "nbgrader_config.py").read_text()
    assert all(repr(f.name) in config for f in FILES) and "exclude_overwriting" in config
    assert (tmp_path / "nb" / "source" / "hw1" / "lora_layer.py").read_text() == strip_solutions(
        (tmp_path / "nb" / "source" / "hw1" / "lora_layer.py").read_text())  # blank: the students write it
    assert BEGIN in (tmp_path / "nb" / "source" / "hw1" / "1_lora_layer.ipynb").read_text()  # nbgrader strips these


# Solutions written another way that the grader gives full marks: the notebook that uses the function must run too.
# (notebook, file, the solution's line, the variant's line, the exercise)
FULL_MARKS_VARIANTS = {
    "a NumPy integer count": ("3_counting.ipynb", "lora_counting.py", "    return r * (d_in + d_out)",
                              "    import numpy\n    return numpy.int64(r * (d_in + d_out))", "E5"),
    "merged names in another order": ("2_adapters.ipynb", "lora_adapters.py", "    return merged\n",
                                      "    merged = type(merged)(merged.config, dict(reversed(merged.items())),\n"
                                      "                          merged.merged_adapters)\n    return merged\n", "E4"),
}  # fmt: skip


@pytest.mark.parametrize("variant", FULL_MARKS_VARIANTS)
def test_a_full_marks_variant_runs_its_notebook(made, tmp_path, variant):
    notebook, file, old, new, exercise = FULL_MARKS_VARIANTS[variant]
    work = plant(made, tmp_path, file, old, new)
    results = grade(work, {exercise})
    assert all(r.passed for r in results), [(r.id, r.hint) for r in results if not r.passed]
    nb = nbformat.reads((work / notebook).read_text(), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
