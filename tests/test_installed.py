"""Files are found where the user is, not beside the installed package.

`pip install .` copies lora_np/ into site-packages, with no notebooks/ or figures/ beside it. The
same is done here by hand, faster than building a wheel: the package folder alone is copied into
a fresh folder, and each command runs from yet another folder with only that copy on its path.
(`pip install .` itself into a fresh virtual environment was run by hand; the closing note of the
change says so.)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
STUDIES = {  # command -> the results file its notebook reads
    "experiments": "section7_results.json",
    "successors": "successors_results.json",
    "fullrank": "fullrank_results.json",
    "adapters": "adapters_results.json",
    "serving": "serving_results.json",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A copy of the package alone (as pip would install it) and an empty working folder elsewhere."""
    site = tmp_path_factory.mktemp("site-packages")
    shutil.copytree(REPO / "lora_np", site / "lora_np", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path_factory.mktemp("elsewhere")

    def run(*args, cwd=work):
        env = {**os.environ, "PYTHONPATH": str(site), "OPENBLAS_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "lora_np", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    probe = run("--help")
    assert probe.returncode == 0, probe.stderr
    return run, site, work


def test_the_copy_is_what_runs(installed):
    run, site, work = installed
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import lora_np; print(lora_np.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(where).parent == site / "lora_np"
    assert not (site / "notebooks").exists() and not (site / "figures").exists()


@pytest.mark.parametrize("command", STUDIES)
def test_each_study_checks_the_file_it_is_given_from_another_folder(installed, command):
    run, _, _ = installed
    r = run(command, "--check", "--out", str(NOTEBOOKS / STUDIES[command]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fits the code's configuration" in r.stdout


@pytest.mark.parametrize("command", STUDIES)
def test_each_study_looks_in_the_current_folder_by_default(installed, command, tmp_path):
    run, _, _ = installed
    r = run(command, "--check", cwd=tmp_path)  # nothing here yet: a clear line naming the file, exit 1
    assert r.returncode == 1 and STUDIES[command] in r.stderr and "Traceback" not in r.stderr, r.stderr
    shutil.copy(NOTEBOOKS / STUDIES[command], tmp_path)
    r = run(command, "--check", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_figures_read_the_files_they_are_told(installed, tmp_path):
    run, _, _ = installed
    out = tmp_path / "figs"
    r = run("figures", "--out", str(out), "--results", str(NOTEBOOKS), "--bench", str(REPO / "figures" / "bench.json"),
            "rank_sweep.png", "bench.png")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "quick" not in r.stdout  # bench.png is drawn from the committed run, not a quick one
    assert sorted(p.name for p in out.iterdir()) == ["bench.png", "rank_sweep.png"]
    r = run("figures", "--out", str(out), "rank_sweep.png")  # no notebooks/section7_results.json here
    assert r.returncode == 2 and "section7_results.json" in r.stderr and "--results" in r.stderr, r.stderr


# The grader locates its own code, never a data file: its worker script, run by path in a process of its
# own, and lora_np itself, which the Gradescope zip carries.
OWN_CODE = {"lora_np/course/sandbox.py", "lora_np/course/worker.py", "lora_np/course/platforms.py"}


def test_nothing_is_located_through_the_package_path():
    # the way the studies used to find notebooks/: Path(__file__).resolve().parent.parent / "notebooks"
    found = {str(p.relative_to(REPO)) for p in (REPO / "lora_np").rglob("*.py") if "__file__" in p.read_text()}
    assert found <= OWN_CODE, sorted(found - OWN_CODE)
