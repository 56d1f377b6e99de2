"""Test settings. pyproject.toml selects the hypothesis profile "ci"; `--hypothesis-profile=dev` explores more."""

import os

# One BLAS thread for the tests, the notebooks they run and the demo subprocess, unless the
# caller chose otherwise. The test matrices are tiny, so threads add nothing; and when another
# process shares the cores, OpenBLAS threads that spin-wait for each other slow a run 10-20x.
# (Set before anything imports NumPy: OpenBLAS reads it once, when it loads.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

from lora_np.training.heap import keep_freed_memory  # noqa: E402

# Freed arrays' memory stays in each test process for reuse, instead of coming back page fault by
# page fault, as in every command; the environment carries it to the notebooks' kernels.
keep_freed_memory()

settings.register_profile(
    "ci",
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    deadline=None,  # timing varies on shared runners; speed is measured in the benchmark
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
