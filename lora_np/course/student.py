"""What a check says when the student's code fails it, and how the grader tells an input changed.

A graded call fails (raises Failure, whose message is the hint the student reads) when the
function is missing, is still a blank (NotImplementedError), raises, or changes an input in
place; sandbox.py runs the call in the student's process and raises these.
"""


import numpy as np


class Failure(Exception):
    """A check failed. The message is the hint: what failed, on which shapes, by how much; never the fix."""


def _snapshot(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_snapshot(v) for v in value]
    return value  # configs are frozen, floats immutable; a Generator is meant to advance


def _changed(before, after, path):
    """The path of the first input that differs from its snapshot, or None."""
    if isinstance(before, np.ndarray):
        same = (
            isinstance(after, np.ndarray)
            and after.shape == before.shape
            and after.dtype == before.dtype
            and np.array_equal(after, before, equal_nan=after.dtype.kind in "fc")
        )
        return None if same else path
    if isinstance(before, dict):
        if set(before) != set(after):
            return path
        for k in before:
            p = _changed(before[k], after[k], f"{path}[{k!r}]")
            if p:
                return p
        return None
    if isinstance(before, list):
        if len(before) != len(after):
            return path
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            p = _changed(b, a, f"{path}[{i}]")
            if p:
                return p
    return None
