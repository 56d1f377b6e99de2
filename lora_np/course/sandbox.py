"""The grader's side of the student's process: the student's functions called from far away.

The checks (checks_layers.py, checks_model.py) run in the grader's own process, which never
imports the student's code. They call the student's functions through a Sandbox: each call
crosses to a process of its own (worker.py) as data, and the values returned come back as data
(wire.py: JSON and .npy, nothing that executes). The grader computes the reference's answers
itself, compares and scores; nothing the student's process writes is a verdict.

What the student's process gets, in a fresh temporary folder:
- a copy of the submission's .py files, and the helpers the handout imports (given.py): not
  lora_np, whose modules hold the reference solutions;
- NumPy, and nothing else from site-packages (python -I -S, a path of our making);
- when the grader runs as root (Gradescope does): a user id of its own, so it cannot write the
  grader, the package, the temporary folders or the results, and every process left with that
  id is killed at the end; lora_np's own folder covered by an empty one (a mount namespace),
  when the kernel allows it, so the reference cannot be read from disk either.

A time limit covers a whole exercise; at it the process group (and, as root, every process of
the user) is killed, and the checks not finished fail.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..core.config import LoraConfig, ModelConfig
from ..core.params import Params
from . import given, wire
from .student import Failure, changed_path, snapshot

CLASSES = {"LoraConfig": LoraConfig, "ModelConfig": ModelConfig, "Params": Params}
HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(HERE)  # lora_np's folder: hidden, not used to find anything written


class _Raised(Exception):
    """The student's function raised, as a check expected it might (Sandbox.raised)."""


class TimeUp(Exception):
    """The exercise's time limit passed; its remaining checks fail."""


def _package_folders():
    """The folders that hold lora_np's reference code: hidden from the student's process as root."""
    pkg = PACKAGE
    parent = os.path.dirname(pkg)
    if not os.path.exists(os.path.join(parent, "pyproject.toml")):
        return [pkg]  # an installed package
    return [pkg, *(p for p in (os.path.join(parent, d) for d in (".git", "build")) if os.path.isdir(p))]


_TAKEN = set()  # user ids this grader has handed out and not yet released


def _free_uid():
    """A user id no process has, nor another sandbox of this grader: the student's processes
    alone run under it, so all of them can be killed."""
    used = {_uid_of(p) for p in _pids()} | _TAKEN
    for uid in range(40000 + os.getpid() % 20000, 70000):
        if uid not in used:
            _TAKEN.add(uid)
            return uid
    raise OSError("no free user id")


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _uid_of(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration, ValueError):
        return None


def _kill_user(uid):
    for _ in range(20):
        pids = [p for p in _pids() if _uid_of(p) == uid]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


class Sandbox:
    """One student file, loaded in a process of its own. `fn(name)` gives a callable that runs the
    student's function there; `cls(name)` one that makes an instance there. After each call,
    `last` holds what the call printed, its peak memory (when measured) and what it aliased."""

    def __init__(self, directory, file_name, deadline):
        self.file, self.deadline = file_name, deadline
        self.tmp = tempfile.mkdtemp(prefix="lora_np_grade_")
        os.chmod(self.tmp, 0o755)
        self.student_dir = os.path.join(self.tmp, "student")
        os.makedirs(self.student_dir)
        for name in os.listdir(directory):  # the submission's files: they may import each other
            src = os.path.join(directory, name)
            if name.endswith(".py") and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(self.student_dir, name))
        given.write(os.path.join(self.tmp, "given"))  # built once a run (given.build is cached)
        grader = os.path.join(self.tmp, "grader")
        os.makedirs(grader)
        for name in ("worker.py", "wire.py"):
            shutil.copyfile(os.path.join(HERE, name), os.path.join(grader, name))
        site = os.path.join(self.tmp, "site")  # NumPy alone from site-packages
        os.makedirs(site)
        np_dir = os.path.dirname(os.path.abspath(np.__file__))
        for d in (np_dir, np_dir + ".libs", os.path.join(os.path.dirname(np_dir), "numpy.libs")):
            if os.path.isdir(d) and not os.path.exists(os.path.join(site, os.path.basename(d))):
                os.symlink(d, os.path.join(site, os.path.basename(d)))
        for root, dirs, files in os.walk(self.tmp):  # readable by the student's user, writable by nobody
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        self.settings = {"path": [os.path.join(self.tmp, "given"), site]}
        if os.geteuid() == 0:
            self.settings.update(uid=_free_uid(), gid=65534, hide=_package_folders())
        self.proc, self.problem, self.ended, self.last, self.notes = None, None, None, {}, []
        self.ready, self.import_deadline = False, None

    # ----------------------------------------------------------------------------------------
    # the process

    def spawn(self, import_deadline=None):
        """Start the student's process; its import is awaited at the first call, until
        import_deadline (the exercise's deadline by default). The grader starts every exercise's
        process at once with one import deadline, so a sleep at import costs one time limit."""
        r_req, w_req = os.pipe()
        r_rep, w_rep = os.pipe()
        env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "HOME": self.student_dir, "LC_ALL": "C.UTF-8"}  # fmt: skip
        cmd = [sys.executable, "-I", "-S", os.path.join(self.tmp, "grader", "worker.py"), str(r_req), str(w_rep),
               self.student_dir, self.file, json.dumps(self.settings)]  # fmt: skip
        self.stderr = tempfile.TemporaryFile()  # the last lines go in the hint when the process dies
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self.stderr, pass_fds=(r_req, w_rep), env=env,
                                         cwd=self.student_dir, start_new_session=True)  # fmt: skip
        finally:
            os.close(r_req)
            os.close(w_rep)
        self.requests, self.replies = os.fdopen(w_req, "wb"), os.fdopen(r_rep, "rb", buffering=0)
        self.import_deadline = import_deadline

    def _hello(self):
        deadline = self.deadline
        if self.import_deadline is not None:
            deadline, self.import_deadline = self.import_deadline, None
        try:
            hello = self._read("the import of " + self.file, deadline)
        except TimeUp:
            self.problem = f"{self.file} did not finish importing within the time limit"
            raise
        if "import_error" in hello:
            e = hello["import_error"]
            self.problem = (f"{self.file} could not be imported: {e['type']} at line {e['line'] or '?'}: "
                            f"{self._plain(e['message'])}")  # fmt: skip
            if e["type"] == "ModuleNotFoundError" and self.settings.get("uid") is not None:
                self.problem += (" (the grader runs your code as a user of its own, who may not be able to read "
                                 "every module of this Python: the ones it loads first are listed in "
                                 "lora_np/course/worker.py, PRELOAD; COURSE.md says more)")  # fmt: skip
            if e["type"] == "ImportError" and "from 'lora_np" in e["message"]:
                self.problem += (" (the grader gives the student's code only the helpers the handout imports: "
                                 "the functions you write cannot come from lora_np)")  # fmt: skip
            self._stop()
        elif not hello.get("ready"):
            raise Failure(f"{self.file}: the grading process did not start")
        self.ready = True

    def _plain(self, text):
        """A message without the grader's temporary folders in it."""
        for sub in ("given", "student", "grader", ""):
            text = text.replace(os.path.join(self.tmp, sub) + os.sep, "")
        return text.replace(self.tmp, "<grader>")

    def _read(self, what, deadline=None):
        """One reply, within the deadline; a dead or lying process is a Failure, the deadline TimeUp."""
        try:
            return wire.read(_Reader(self.replies.fileno(), self, deadline or self.deadline), CLASSES)
        except EOFError:
            code = self.proc.wait(timeout=5) if self.proc else None
            self.stderr.seek(0)
            last = self.stderr.read()[-2000:].decode("utf-8", "replace").strip().splitlines()[-1:]
            self._stop()
            self.ended = f"the grading process ended with exit code {code}"
            said = f" ({self._plain(last[0])[:200]})" if last else ""
            raise Failure(f"{self.ended} during {what}{said}") from None
        except (wire.WireError, TypeError, ValueError) as e:
            self._stop()
            raise Failure(f"{what} sent back something the grader cannot read ({str(e)[:120]})") from None

    def _stop(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if "uid" in self.settings:
            _kill_user(self.settings["uid"])
        self.proc.wait()
        for f in (self.requests, self.replies, self.stderr):
            try:
                f.close()
            except OSError:  # a request left unsent to a process now dead
                pass
        self.proc = None

    def close(self):
        self._stop()
        _TAKEN.discard(self.settings.get("uid"))
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------------------------------
    # calls

    def _request(self, req, what, refs):
        if self.problem:
            raise Failure(self.problem)
        if self.proc is None:
            self.spawn()  # anew after a crash: the next check gets a fresh process
            self.ready = False
        if not self.ready:
            self._hello()
            if self.problem:
                raise Failure(self.problem)
        self._send(req)
        while True:
            reply = self._read(what)
            if "callback" not in reply:
                return reply
            name = reply["callback"]
            try:
                if name not in refs:
                    raise RuntimeError(f"{name} is not lent to {what}")
                out = {"result": refs[name](*reply["args"], **reply["kwargs"])}
            except Exception as e:
                out = {"error": {"type": type(e).__name__, "message": str(e)[:300]}}
            self._send(out)

    def _send(self, message):
        try:
            self.requests.write(wire.encode(message, CLASSES))
            self.requests.flush()
        except BrokenPipeError:  # it died: the read that follows says how
            pass

    def _call(self, op, name, args, kwargs, *, handle=None, measure=False, refs=None, shown=None, expect_error=False):
        shown = shown or name
        before = snapshot({"args": list(args), "kwargs": kwargs})
        req = {"op": op, "name": name, "args": tuple(args), "kwargs": kwargs, "measure": measure,
               "refs": sorted(refs or {})}  # fmt: skip
        if handle is not None:
            req["handle"] = handle
        reply = self._request(req, shown, refs or {})
        if reply.get("missing"):
            where = reply.get("from")
            if where:
                raise Failure(f"{shown} in {self.file} comes from {where}, not from {self.file}: write it there")
            kind = "class" if op == "new" else "function"
            raise Failure(f"{self.file} defines no {kind} {name}; keep the name and signature of the handout")
        self.last = reply
        if reply.get("n_printed"):
            self.notes.append(f"{shown} printed {reply['n_printed']} characters ({reply['printed'][:60]!r}): "
                              f"remove the debugging output (not graded)")  # fmt: skip
        if "unsendable" in reply:
            raise Failure(f"{shown} returned something the grader cannot read: {reply['unsendable']}")
        if "error" in reply:
            e = reply["error"]
            if e["blank"]:
                raise Failure(f"{shown} is not written yet (it raises NotImplementedError)")
            if expect_error:
                raise _Raised(e["type"])
            if e["type"] == "TypeError" and "argument" in e["message"] and e["line"] is None:
                raise Failure(f"{shown} does not take the handout's arguments ({e['message']}); keep its signature")
            where = f" (line {e['line']} of {self.file})" if e["line"] else ""
            raise Failure(f"{shown} raised {e['type']}: {self._plain(e['message'])[:200]}{where}")
        if op != "method":
            after = {"args": list(reply["args"]), "kwargs": reply["kwargs"]}
            changed = changed_path(before, after, "")
            if changed:
                raise Failure(f"{shown} changed its input {_name(changed, name)} in place; the caller still needs "
                              f"it: work on new arrays (x = x * m, not x *= m)")  # fmt: skip
        return reply.get("result")

    def fn(self, name, *, measure=False, refs=None):
        """The student's function `name`, run in the student's process. refs: {name: lora_np's
        function} lent to it in place of the student's own for the call (one mistake costs once)."""
        return lambda *args, **kwargs: self._call("call", name, args, kwargs, measure=measure, refs=refs)

    def raised(self, name, *args, **kwargs):
        """The name of the exception type the student's function raised on these arguments, or None
        when it returned: for the checks that bad arguments are refused."""
        try:
            self._call("call", name, args, kwargs, expect_error=True)
        except _Raised as e:
            return e.args[0]
        return None

    def cls(self, name):
        """The student's class `name`: calling it makes an instance in the student's process."""

        def make(*args, **kwargs):
            self._call("new", name, args, kwargs)
            return Remote(self, name, self.last["handle"], args, kwargs)

        return make


def _name(path, fn):
    """'[\"args\"][0]' -> 'args[0]' in a hint."""
    return path.replace("['args']", "args").replace("['kwargs']", "") or "arguments"


class _Reader:
    """A file-like read() on the reply pipe that gives up at the deadline."""

    def __init__(self, fd, box, deadline):
        self.fd, self.box, self.deadline = fd, box, deadline

    def read(self, n):
        out = bytearray()
        while len(out) < n:
            left = max(0.0, self.deadline - time.monotonic())  # past it, what is already there still counts
            if not select.select([self.fd], [], [], left)[0]:
                self.box._stop()
                raise TimeUp()
            chunk = os.read(self.fd, min(n - len(out), 1 << 20))
            if not chunk:
                return bytes(out)
            out += chunk
        return bytes(out)


class Remote:
    """An instance living in the student's process. Its methods run there; after each, the arrays
    given to the constructor are copied back here, as the student's code left them (an optimizer
    updates them in place; the grader sees it)."""

    def __init__(self, box, cls_name, handle, args, kwargs):
        self._box, self._cls, self._handle, self._given = box, cls_name, handle, (args, kwargs)

    def __getattr__(self, method):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args, **kwargs):
            out = self._box._call("method", method, args, kwargs, handle=self._handle, shown=f"{self._cls}.{method}")
            _copy_back(self._given, self._box.last.get("self_args"))
            return out

        return call


def _copy_back(mine, theirs):
    """Copy the arrays of `theirs` into the arrays at the same places in `mine`, where they fit."""
    if isinstance(mine, np.ndarray):
        if isinstance(theirs, np.ndarray) and theirs.shape == mine.shape and theirs.dtype == mine.dtype:
            np.copyto(mine, theirs)
    elif isinstance(mine, dict) and isinstance(theirs, dict):
        for k in mine:
            if k in theirs:
                _copy_back(mine[k], theirs[k])
    elif isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
        for a, b in zip(mine, theirs, strict=False):  # a list the student shortened: the rest stays
            _copy_back(a, b)
