"""The student's code, contained: every call is watched for what a grader must never trust.

A graded call fails (raises Failure, whose message is the hint the student reads) when the
function is missing, is still a blank (NotImplementedError), raises, calls sys.exit, prints,
or changes an input in place. A call that never returns is the parent process's business: each
exercise runs in a process of its own with a time limit (grade.py).

Spy is an array that records the shape of every product formed from it, so a check can show
that a function never formed B·A, or a frozen factor's gradient, without trusting its return.
"""

import contextlib
import inspect
import io
import os
import traceback

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


class Student:
    """The module a student wrote, loaded from `path`; `fn(name)` returns a watched callable."""

    def __init__(self, module, path):
        self.module, self.path, self.file = module, path, os.path.basename(path)

    def fn(self, name):
        f = getattr(self.module, name, None)
        if not callable(f):
            raise Failure(f"{self.file} defines no function {name}; keep the name and signature of the handout")
        self._own(name, f)
        return lambda *args, **kwargs: self.call(name, f, args, kwargs)

    def cls(self, name):
        c = getattr(self.module, name, None)
        if not isinstance(c, type):
            raise Failure(f"{self.file} defines no class {name}; keep the class of the handout")
        self._own(name, c)
        return c

    def _own(self, name, obj):
        """Refuse the reference itself: an exercise imported from lora_np (or anywhere) is not written."""
        if getattr(obj, "__module__", None) != self.module.__name__:
            raise Failure(f"{name} in {self.file} comes from {obj.__module__}, not from {self.file}: write it there")

    def call(self, name, f, args, kwargs):
        try:
            bound = inspect.signature(f).bind(*args, **kwargs)
        except TypeError as e:
            raise Failure(f"{name} does not take the handout's arguments ({e}); keep its signature") from None
        before = _snapshot(dict(bound.arguments))
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                result = f(*args, **kwargs)
        except Failure:
            raise
        except NotImplementedError:
            raise Failure(f"{name} is not written yet (it raises NotImplementedError)") from None
        except (Exception, SystemExit) as e:  # SystemExit: a sys.exit() in the student's code
            raise Failure(f"{name} raised {type(e).__name__}: {str(e)[:200]}{self._where(e)}") from None
        if printed.getvalue():
            text = printed.getvalue()
            raise Failure(
                f"{name} printed {len(text)} characters ({text[:60]!r}); a graded function must not "
                f"print: remove the debugging output"
            )
        for arg, value in bound.arguments.items():
            changed = _changed(before[arg], value, arg)
            if changed:
                raise Failure(
                    f"{name} changed its input {changed} in place; the caller still needs it: "
                    f"work on new arrays (x = x * m, not x *= m)"
                )
        return result

    def _where(self, e):
        frames = [fr for fr in traceback.extract_tb(e.__traceback__) if os.path.basename(fr.filename) == self.file]
        return f" (line {frames[-1].lineno} of {self.file})" if frames else ""


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
