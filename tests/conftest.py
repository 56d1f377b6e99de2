"""Hypothesis profiles. pyproject.toml selects "ci"; `--hypothesis-profile=dev` explores more."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    deadline=None,  # timing varies on shared runners; speed is measured in the benchmark
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
