"""A run's outputs as one set: locked while the run works, then replacing the previous set whole.

A command that writes several files (the demo: base.npz, full_finetuned.npz, adapter.npz,
results.json; `gpt2`: adapter.npz, peft/, results.json) must never leave half a new run beside half
of an old one, and two runs on the same --out must never mix or silently replace each other's
files. A study's single results file is the same problem with one member.

1. Lock. A run takes an exclusive flock (checkpoint.flock) on a lock file (OUT/.lock for a folder,
   .NAME.lock beside a file) before any work and holds it to the end. A second run on the same
   output is refused at once, naming the first one's process id. The kernel drops the lock when
   its holder dies, however it dies, so a lock file nobody holds is a leftover, never a run.
2. Stage. The new set is written into OUT/.staging/. Only the lock's holder writes there, so a
   .staging/ it finds is a killed run's partial set, removed at once.
3. Commit. .staging/COMMIT, naming the new set's members, is written last: the commit point.
   Then each member moves into OUT by a rename, and each member the new set lacks (the peft/ of
   a run that adapted W_q, after one that adapted W_1) is removed. Ctrl-C is held back for those
   few renames; a writer killed during them leaves COMMIT, and the next run (holding the lock)
   finishes the renames before anything else. Before COMMIT, the previous set is untouched.

Files outside the members (the demo's cache/, a user's notes) are never touched. Readers of one
file (results.json) always see a whole file: every move is a rename.
"""

import contextlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path

from .checkpoint import OPEN_FLAGS, flock

STAGING = ".staging"
COMMIT = "COMMIT"


class OutputRefused(ValueError):
    """An output a run cannot write: refused before any work, one line naming it."""


class OutputBusy(OutputRefused):
    """Another live process holds the lock of this output."""


def lock_file(path, what):
    """Take an exclusive flock on the file `path` (created if missing) without waiting.

    Returns the open file descriptor; `unlock(path, fd)` releases it. Raises OutputBusy naming
    `what` and the holder's process id when a live process holds it. The holder's pid is written
    into the file; releasing unlinks it, so no lock file stays behind after a clean exit.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o644)
        try:
            flock(fd, wait=False)
        except BlockingIOError:
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            holder = f" (process {holder})" if holder.isdigit() else ""
            raise OutputBusy(f"{what} is in use by another run{holder}; wait for it to finish, or choose "
                             f"another output") from None  # fmt: skip
        if os.fstat(fd).st_nlink:  # 0: a holder unlinked it while we waited for it; lock the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def unlock(path, fd):
    """Release a lock from lock_file: unlinked while still held, so a waiter sees it is gone."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def _sigint_held():
    """Ctrl-C delivered only after the block (on the main thread; elsewhere there is no handler to hold)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def make_folder(out, flag="--out"):
    """Create the output folder `out` (and its parents) if missing; OutputRefused, one line, if it
    cannot be (a path under /proc, a read-only file system: os.access cannot tell in advance)."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputRefused(f"{flag} {str(out)!r}: the folder cannot be created ({e.strerror or e})") from None


class RunSet:
    """The output folder of a run, locked from the start; its files staged, then committed as one set.

        with RunSet(out, {"adapter.npz": "file", "peft": "folder", "results.json": "file"}, "--out") as run:
            ... minutes of work ...
            save_adapters(run.stage / "adapter.npz", ...)     # every member written into run.stage
            run.commit()                                       # the set replaces the previous one

    Leaving the block without commit() (an exception, Ctrl-C) removes the staged files and leaves
    the previous set as it was. Creating the RunSet checks, before any work, that out can be
    created and that no member's name is taken by the wrong kind of entry (a folder where a file
    goes, or the reverse): OutputRefused (a ValueError), naming it; entering it, that no other live
    run holds out (OutputBusy).

    Inputs:
    - out: the output folder (created if missing)
    - members: {name: "file" | "folder"}, every name the run may write; a member the new set lacks
      is removed from out at commit
    - flag: how messages name out (e.g. "--out")
    """

    def __init__(self, out, members, flag="--out"):
        self.out, self.members, self.flag = Path(out), dict(members), flag
        self.stage = self.out / STAGING
        self._fd = None
        make_folder(self.out, flag)
        for name, kind in self.members.items():
            p = self.out / name
            if (kind == "file" and p.is_dir()) or (kind == "folder" and p.exists() and not p.is_dir()):
                other = "a folder" if kind == "file" else "a file"
                raise OutputRefused(f"{flag} {str(out)!r}: {str(p)!r} is {other}, where the run writes its {name} "
                                 f"{kind}; move it away first")  # fmt: skip

    def __enter__(self):
        self._lock = self.out / ".lock"
        try:
            self._fd = lock_file(self._lock, f"{self.flag} {str(self.out)!r}")
        except OSError as e:
            raise OutputRefused(f"{self.flag} {str(self.out)!r}: cannot lock it ({e.strerror or e})") from None
        try:
            if (self.stage / COMMIT).is_file():  # a run killed while committing: finish its renames
                self._apply()
            _remove(self.stage)  # any other .staging is a killed run's partial set
            self.stage.mkdir()
        except BaseException:
            unlock(self._lock, self._fd)
            raise
        return self

    def commit(self):
        """Replace the previous set by the staged one: COMMIT written last, then the renames.
        Returns the members the previous set held (empty for a first run), for the run to say so."""
        replaced = sorted(n for n in self.members if (self.out / n).exists() or (self.out / n).is_symlink())
        new = sorted(n for n in self.members if (self.stage / n).exists())
        text = json.dumps({"members": sorted(self.members), "new": new}).encode()
        tmp = self.stage / (COMMIT + ".tmp")
        with open(tmp, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        with _sigint_held():
            os.replace(tmp, self.stage / COMMIT)  # the commit point
            self._apply()
        return replaced

    def _apply(self):
        """The renames COMMIT describes; idempotent, so a run killed halfway can be finished."""
        plan = json.loads((self.stage / COMMIT).read_text())
        old = self.stage / ".old"
        old.mkdir(exist_ok=True)
        for name in plan["members"]:
            staged, target = self.stage / name, self.out / name
            if name in plan["new"] and not staged.exists():
                continue  # moved in already
            if target.is_dir() and not target.is_symlink():  # a folder cannot be renamed over: move it aside
                os.replace(target, old / name)
            if name in plan["new"]:
                os.replace(staged, target)
            elif target.exists() or target.is_symlink():
                os.replace(target, old / name)
        _remove(self.stage)

    def __exit__(self, *exc):
        try:
            with contextlib.suppress(OSError):
                if not (self.stage / COMMIT).is_file():  # not committed: the previous set stays as it was
                    _remove(self.stage)
        finally:
            unlock(self._lock, self._fd)
        return False


class LockedFile:
    """The lock of the single output file `path` (.NAME.lock beside it), taken at once and held until
    the with-block ends: `lock = LockedFile(out)` before any work, then `with lock: ... write ...`.

    The file itself is replaced with checkpoint.write_atomic, one rename: a set of one member.
    Raises OutputBusy when another run holds it, OutputRefused when its folder cannot take the lock.
    """

    def __init__(self, path, flag="--out"):
        path = Path(path)
        self._lock = path.parent / f".{path.name}.lock"
        try:
            self._fd = lock_file(self._lock, f"{flag} {str(path)!r}")
        except OSError as e:
            raise OutputRefused(f"{flag} {str(path)!r}: cannot lock it in its folder ({e.strerror or e})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        unlock(self._lock, self._fd)
        return False
