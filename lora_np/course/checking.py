"""The autograder's machinery: the registry of checks, hypothesis settings for a grader, and the
comparisons every check shares (checks_layers.py and checks_model.py hold the checks)."""

import numpy as np
from hypothesis import HealthCheck, Verbosity, settings

from ..core.gradcheck import rel_error
from .student import Failure

CHECKS = {}  # exercise id -> [(check id, title, points, function)]


def check(ex_id, points, title):
    def register(fn):
        checks = CHECKS.setdefault(ex_id, [])
        checks.append((f"{ex_id}.{len(checks) + 1}", title, points, fn))
        return fn

    return register


def drawn(max_examples=10):
    """Hypothesis settings for a grader: the same examples every run, no database, quiet, and one
    (shrunk, so small) failing example reported rather than several."""
    return settings(
        max_examples=max_examples, derandomize=True, database=None, deadline=None, print_blob=False,
        suppress_health_check=list(HealthCheck), report_multiple_bugs=False, verbosity=Verbosity.quiet,
    )  # fmt: skip


def close(name, got, want, tol, where=""):
    """Fail unless `got` has want's shape and dtype and agrees to relative error tol."""
    if not isinstance(got, np.ndarray):
        raise Failure(f"{name} must be an array of shape {want.shape}, got {type(got).__name__}{where}")
    if got.shape != want.shape:
        raise Failure(f"{name} must have shape {want.shape}, got {got.shape}{where}")
    if got.dtype != want.dtype:
        raise Failure(f"{name} must be {want.dtype} like the inputs, got {got.dtype}{where}")
    err = rel_error(got, want)
    if not err < tol:  # written so that NaN fails
        times = ratio(got, want)
        hint = f"; it is {times:.4g} times the right value" if times is not None else ""
        raise Failure(f"{name} {got.shape}: max relative error {err:.1e} (needs < {tol:.0e}){hint}{where}")


def ratio(got, want, tol=1e-8):
    """The factor c when got = c·want to relative error tol (a scaling missing or applied twice), else None."""
    g, w = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    if not (np.all(np.isfinite(g)) and np.abs(w).max(initial=0) > 0):
        return None
    c = g @ w / (w @ w)
    return c if abs(c - 1) > 1e-3 and rel_error(g, c * w) < tol else None

def unpack(out, name, n):
    if not (isinstance(out, tuple) and len(out) == n):
        raise Failure(f"{name} must return a tuple of {n}, got {type(out).__name__}"
                      f"{f' of {len(out)}' if isinstance(out, tuple) else ''}")  # fmt: skip
    return out
