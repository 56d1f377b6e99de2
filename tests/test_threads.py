"""The BLAS thread policy: what each width gets, that the pool really changes, and the --threads flag."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from lora_np.train import Progress
from threadpoolctl import threadpool_info, threadpool_limits

from lora_np.studies.cli import Parser
from lora_np.training.threads import (
    MIN_D_MODEL_FOR_THREADS,
    THREAD_VARS,
    add_threads_flag,
    apply_threads,
    blas_threads,
    parse_threads,
    policy_threads,
    set_blas_threads,
)


def pool_sizes():
    # read from threadpoolctl directly, not through the module under test
    return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


@pytest.fixture
def restore_pool(monkeypatch):
    for v in THREAD_VARS:  # set_blas_threads writes these; monkeypatch puts the old values back
        monkeypatch.setenv(v, os.environ.get(v, "1"))
    with threadpool_limits(limits=None):  # restores the pool's size on the way out
        yield


def test_the_policy_gives_one_thread_below_512_and_every_core_from_there():
    assert policy_threads(None) == 1
    assert policy_threads(64) == policy_threads(MIN_D_MODEL_FOR_THREADS - 1) == 1
    assert policy_threads(MIN_D_MODEL_FOR_THREADS) == policy_threads(768) == (os.cpu_count() or 1)


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two cores to tell one thread from two")
def test_set_blas_threads_changes_the_pool_and_the_environment(restore_pool):
    set_blas_threads(2)
    assert pool_sizes() == {2} and blas_threads() == 2
    set_blas_threads(1)
    assert pool_sizes() == {1} and blas_threads() == 1
    assert all(os.environ[v] == "1" for v in THREAD_VARS)  # what a child process will read


def test_the_product_is_the_same_at_one_and_two_threads_to_round_off(restore_pool):
    a = np.random.default_rng(0).standard_normal((300, 200))
    set_blas_threads(1)
    one = a @ a.T
    set_blas_threads(2)
    assert np.allclose(a @ a.T, one, rtol=1e-12, atol=1e-12)


def test_apply_threads_says_what_it_chose_and_why(restore_pool):
    lines = []
    assert apply_threads(None, 64, log=lines.append) == 1
    assert apply_threads(None, 768, log=lines.append) == (os.cpu_count() or 1)
    assert apply_threads(3, 64, log=lines.append) == 3
    assert lines[0] == "BLAS threads: 1 (the policy for d_model 64 < 512; --threads N to change)"
    assert lines[1].startswith(f"BLAS threads: {os.cpu_count()} (the policy for d_model 768 >= 512")
    assert lines[2] == "BLAS threads: 3 (--threads)"


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", ""])
def test_a_bad_thread_count_is_refused(bad):
    with pytest.raises(ValueError, match=f"threads must be an int >= 1 or 'auto', got {bad!r}"):
        parse_threads(bad)
    p = Parser(prog="prog")
    add_threads_flag(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--threads", bad])
    assert p.parse_args(["--threads", "auto"]).threads is None and p.parse_args([]).threads is None
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        set_blas_threads(0)


def test_the_progress_line_names_the_thread_count(restore_pool):
    set_blas_threads(1)
    out = io.StringIO()
    Progress("train", steps=2, every=1, stream=out).update(1, 0.5, 1000.0, 1.0)
    assert "(1 thread)" in out.getvalue()


def test_the_demo_command_prints_its_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}  # the policy alone decides
    r = subprocess.run([sys.executable, "-m", "lora_np", "--steps", "2", "--pretrain-steps", "2", "--out",
                        str(tmp_path / "demo"), "--no-cache"], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "BLAS threads: 1 (the policy for d_model 64 < 512" in r.stdout
    assert "(1 thread)" in r.stderr  # the progress lines


def test_set_blas_threads_exports_the_count_to_child_processes(restore_pool, monkeypatch):
    # Written out here, not read from THREAD_VARS: OpenBLAS reads OPENBLAS_NUM_THREADS (and
    # OMP_NUM_THREADS when that is unset), an OpenMP build OMP_NUM_THREADS, MKL MKL_NUM_THREADS
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    for v in names:
        monkeypatch.setenv(v, "7")  # neither count set below, so a test cannot pass on what was there
    for n in (2, 1):
        set_blas_threads(n)
        child = subprocess.run([sys.executable, "-c", f"import os; print(*(os.environ.get(v) for v in {names}))"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert child.stdout.split() == [str(n)] * len(names), child.stderr
