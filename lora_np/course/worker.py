"""The student's side of the grader: a process that runs the student's functions and hands back
only what they return. Started by sandbox.py, never by hand.

    python -I -S worker.py REQUESTS_FD REPLIES_FD STUDENT_DIR FILE SETTINGS_JSON

It judges nothing: it has no reference to compare with, no checks and no results file. It reads
a request (a function or class of FILE, its arguments), calls it and writes a reply: the value
returned, the arguments as they are after the call (so the grader sees what was changed in
place), what was printed, and the peak memory the call allocated when asked. Everything crosses
in wire.py's format, which executes nothing on either side.

This file and wire.py are copied into the student's folder of the grader: they import the
standard library and NumPy only. The lora_np the student's code sees is given.py's helpers.
"""

import contextlib
import ctypes
import ctypes.util
import io
import json
import os
import sys
import traceback
import tracemalloc

PRELOAD = ("numpy", "numpy.linalg", "numpy.random", "math", "cmath", "numbers", "collections", "collections.abc",
           "itertools", "functools", "operator", "dataclasses", "typing", "copy", "random", "statistics", "hashlib",
           "warnings", "inspect", "re", "json", "io", "string", "textwrap", "decimal", "fractions", "heapq",
           "bisect", "enum", "abc", "contextlib", "traceback", "tracemalloc", "importlib.util", "glob", "pathlib",
           "time", "datetime", "pprint", "struct", "array", "types", "weakref", "fnmatch", "unittest",
           "numpy.testing", "numpy.fft", "numpy.polynomial", "lora_np",
           "lora_np.config", "lora_np.params", "lora_np.lora", "lora_np.counting", "lora_np.optim", "lora_np.train",
           "lora_np.layers", "lora_np.nf4", "wire")  # fmt: skip


def _restrict(settings):
    """As root: hide the reference's folders (a mount namespace, when the kernel lets us), then
    become an unprivileged user for good. Runs before any student code."""
    uid, gid, hide = settings.get("uid"), settings.get("gid"), settings.get("hide", [])
    if uid is None:
        return
    if hide:
        # Without CAP_SYS_ADMIN (Docker's default for root) there is no mount namespace: the folders
        # stay visible, and only their permissions keep them (run_autograder makes Gradescope's
        # copy root's alone). The user id below is what keeps the grader's files unwritten.
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 1 << 18
        if libc.unshare(CLONE_NEWNS) == 0 and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
            for d in hide:
                if libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=4k,mode=0555") != 0:
                    raise OSError(ctypes.get_errno(), f"cannot hide {d}")
    # Imported while the files can still be read: Python itself may live where the unprivileged
    # user cannot look (pyenv under /root). Modules a student imports beyond these must be readable.
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import resource

    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))  # counted per user: this run's user alone
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError("still able to become root")


def _where(e, path):
    frames = [fr for fr in traceback.extract_tb(e.__traceback__) if fr.filename == path]
    return frames[-1].lineno if frames else None


def _error(e, path):
    return {"type": type(e).__name__, "message": str(e)[:300], "line": _where(e, path),
            "blank": isinstance(e, NotImplementedError)}  # fmt: skip


def _aliases(result, inputs):
    """Paths of the parts of `result` that are an input object, or share memory with an input array."""
    import numpy as np

    objs, arrays = {id(v) for v in inputs}, [v for v in inputs if isinstance(v, np.ndarray)]
    out = []

    def walk(v, path, depth):
        if depth > 20:
            return
        if id(v) in objs or isinstance(v, np.ndarray) and any(np.shares_memory(v, a) for a in arrays):
            out.append(path)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{path}[{k!r}]", depth + 1)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]", depth + 1)

    walk(result, "", 0)
    return out[:50]


def _inputs(args, kwargs):
    """Every object reachable from the arguments (arrays, dicts, lists), to tell what a result shares."""
    found = []

    def walk(v, depth):
        if depth > 20:
            return
        found.append(v)
        if isinstance(v, dict):
            for x in v.values():
                walk(x, depth + 1)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, depth + 1)

    for v in (*args, *kwargs.values()):
        walk(v, 0)
    return [v for v in found if not isinstance(v, (int, float, str, bool, type(None)))]


def _frame(v, depth=0):
    """The containers of v copied, the arrays in them the very same objects: what an instance was
    given, as the caller holds it (a dict entry rebound later does not change the caller's array)."""
    if depth > 20:
        return v
    if isinstance(v, dict):
        return {k: _frame(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_frame(x, depth + 1) for x in v) if type(v) in (list, tuple) else v
    return v


def main(argv):
    fd_in, fd_out, student_dir, file_name, settings = int(argv[0]), int(argv[1]), argv[2], argv[3], json.loads(argv[4])
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, *settings["path"], student_dir]
    os.chdir(student_dir)
    _restrict(settings)
    import wire  # noqa: I001 (found on the path just set)
    import numpy as np  # noqa: F401

    requests, replies = os.fdopen(fd_in, "rb"), os.fdopen(fd_out, "wb")

    def send(value):
        replies.write(wire.encode(value, classes))
        replies.flush()

    classes = {}
    try:
        from lora_np.config import LoraConfig, ModelConfig
        from lora_np.params import Params

        classes = {"LoraConfig": LoraConfig, "ModelConfig": ModelConfig, "Params": Params}
    except ImportError:
        pass
    path = os.path.join(student_dir, file_name)
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location(file_name[:-3], path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            spec.loader.exec_module(module)
    except BaseException as e:  # a SyntaxError, an exception or sys.exit() at import time
        err = _error(e, path)
        err["line"] = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else err["line"]
        send({"import_error": err})
        return 0
    send({"ready": True})
    objects = {}  # handle -> (instance, the constructor's arguments)
    state = {"call": 0}

    def proxy(name, call):
        def ask(*args, **kwargs):
            if state["call"] != call:
                raise RuntimeError(f"{name} is lora_np's, lent only while the graded call runs")
            send({"callback": name, "args": args, "kwargs": kwargs})
            reply = wire.read(requests, classes)
            if "error" in reply:
                kind = {"ValueError": ValueError, "TypeError": TypeError}.get(reply["error"]["type"], RuntimeError)
                raise kind(reply["error"]["message"])
            return reply["result"]

        return ask

    while True:
        try:
            req = wire.read(requests, classes)
        except EOFError:
            return 0
        state["call"] += 1
        op, name = req["op"], req["name"]
        target = getattr(module, name, None) if op in ("call", "new") else objects.get(req["handle"], (None,))[0]
        if op == "method":
            target = getattr(target, name, None)
        if not callable(target) or (op != "method" and getattr(target, "__module__", None) != module.__name__):
            send({"missing": True, "from": getattr(target, "__module__", None) if target is not None else None})
            continue
        args, kwargs = req["args"], req["kwargs"]
        lent = {n: getattr(module, n, None) for n in req.get("refs", ())}
        for n in lent:
            setattr(module, n, proxy(n, state["call"]))
        printed = io.StringIO()
        reply = {}
        try:
            if req.get("measure"):
                tracemalloc.start()
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                result = target(*args, **kwargs)
            if req.get("measure"):
                reply["peak"] = tracemalloc.get_traced_memory()[1]
        except BaseException as e:
            reply["error"] = _error(e, path)
            result = None
        finally:
            tracemalloc.stop()
            for n, v in lent.items():
                setattr(module, n, v)
            state["call"] += 1
        reply["printed"] = printed.getvalue()[:300]
        reply["n_printed"] = len(printed.getvalue())
        reply["args"], reply["kwargs"] = args, kwargs
        if "error" not in reply:
            reply["aliases"] = _aliases(result, _inputs(args, kwargs))
            if op == "new":
                objects[len(objects)] = (result, _frame((args, kwargs)))
                reply["handle"], result = len(objects) - 1, None
            elif op == "method":
                reply["self_args"] = objects[req["handle"]][1]
            reply["result"] = result
        try:
            send(reply)
        except (wire.WireError, TypeError, ValueError) as e:
            send({"unsendable": str(e)[:200], "printed": reply["printed"], "n_printed": reply["n_printed"]})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
