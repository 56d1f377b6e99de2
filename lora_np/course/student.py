"""What a check says when the student's code fails it, and how the grader tells an input changed.

A graded call fails (raises Failure, whose message is the hint the student reads) when the
function is missing, is still a blank (NotImplementedError), raises, or changes an input in
place; sandbox.py runs the call in the student's process and raises these.

Spy is an array that records the shape of every product formed from it: lora_np's own tests use
it to show that a layer never forms B·A or a frozen gradient. (The grader measures memory
instead, in the student's process: np.asarray(spy) drops a Spy, and a student's code may do that.)
"""

import contextlib

import numpy as np


class Failure(Exception):
    """A check failed. The message is the hint: what failed, on which shapes, by how much; never the fix."""


def snapshot(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    return value  # configs are frozen, floats immutable; a Generator is meant to advance


def changed_path(before, after, path):
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
            p = changed_path(before[k], after[k], f"{path}[{k!r}]")
            if p:
                return p
        return None
    if isinstance(before, list):
        if len(before) != len(after):
            return path
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            p = changed_path(b, a, f"{path}[{i}]")
            if p:
                return p
    return None


# ----------------------------------------------------------------------------
# Spy: which products were formed

_PRODUCTS = {np.dot, np.einsum, np.tensordot, np.outer, np.inner, np.kron, np.vdot, np.matmul}


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, Spy) else a


def _wrap(result):
    if isinstance(result, np.ndarray) and not isinstance(result, Spy):
        return result.view(Spy)
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    return result


class Spy(np.ndarray):
    """An ndarray that logs the shape of every product (matmul, dot, einsum, ...) and every
    reduction (sum, mean, ...) computed from it; results are Spies too, so the log follows the
    whole computation. Elementwise operations are not logged: scaling B is not forming dB."""

    log = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        if out:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*(_plain(i) for i in inputs), **kwargs)
        if ufunc is np.matmul or method == "reduce":
            Spy.log.append(np.shape(result))
        if out:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        def unwrap(v):
            if isinstance(v, (list, tuple)):
                return type(v)(unwrap(x) for x in v)
            return _plain(v)

        result = func(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()})
        if func in _PRODUCTS:
            Spy.log.append(np.shape(result))
        return _wrap(result)


@contextlib.contextmanager
def spying():
    """Collect the shapes of the products formed inside the block: `with spying() as shapes:`."""
    Spy.log = []
    yield Spy.log


def formed(shapes, forbidden):
    """The first logged shape whose last two axes are one of `forbidden`, or None."""
    return next((s for s in shapes if len(s) >= 2 and tuple(s[-2:]) in forbidden), None)
