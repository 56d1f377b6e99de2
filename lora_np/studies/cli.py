"""What every `python -m lora_np ...` command shares: one-line errors, and output paths checked
before any work.

A misuse of the command line is one line on stderr and exit status 2, never a traceback, and it
is found before anything is trained or written: an output path that cannot be written is
refused up front, not after minutes of training.
"""

import argparse
import os
import sys
from pathlib import Path

from ..training.runset import LockedFile, OutputRefused
from ..training.threads import add_threads_flag, apply_threads
from .results import check_command


class Parser(argparse.ArgumentParser):
    """argparse, but a misuse is one line on stderr (the usage is what --help is for)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog, message):
    """One line on stderr, exit status 2: for a misuse found after parsing."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _writable_folder(flag, given, folder, create):
    # The nearest folder that exists must be a writable folder: it is where the output (or the
    # folders leading to it, when `create`) will be made. os.access is True for root everywhere;
    # a path below a regular file is refused for everyone.
    ancestor = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if ancestor != folder and not create:
        raise ValueError(f"{flag} {given!r}: the folder {str(folder)!r} does not exist")
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {given!r}: {str(ancestor)!r} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {given!r}: the folder {str(ancestor)!r} is not writable")


def check_out_file(flag, path, create_parents=False):
    """ValueError unless `path` names a file that can be written: not empty, not a folder, in an
    existing writable folder (or, with create_parents, below the nearest existing one)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{flag} must be a file path, got {path!r}")
    p = Path(path).absolute()
    if p.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; it must be a file path")
    _writable_folder(flag, str(path), p.parent, create_parents)
    return Path(path)


def check_out_dir(flag, path):
    """ValueError unless `path` names a folder that exists and is writable, or can be created
    below the nearest existing folder. An empty path is refused: it would silently mean '.'."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{flag} must be a folder path, got {path!r}")
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; it must be a folder")
    _writable_folder(flag, str(path), p, create=True)
    return Path(path)


def results_command(argv, prog, description, *, default_out, default_cache, check, run, d_model):
    """The command of a study that trains for minutes and writes the results file a notebook reads
    (experiments, successors, fullrank): --out FILE, --cache-dir DIR (the pretrained base's cache),
    --check (only check that the file fits the code), --threads N. Both paths are checked before any
    training.

    Inputs:
    - argv: the arguments after the command's name (None: sys.argv[1:])
    - check: check(path) raises ValueError, saying why, unless the file at path fits the code
    - run: run(cache_dir, out) trains, writes the file `out`, and returns the line to print
    - d_model: the study's model width, for the thread policy (lora_np.training.threads)

    Returns the exit status: 0, or 1 when --check finds the file does not fit.
    """
    p = Parser(prog=prog, description=description)
    p.add_argument("--out", default=str(default_out), help=f"results file (default {default_out})")
    p.add_argument("--cache-dir", default=default_cache, help=f"the pretrained base's cache (default {default_cache})")
    p.add_argument("--check", action="store_true", help="only check that the results file fits the code")
    add_threads_flag(p)
    a = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if a.check:
        return check_command(a.out, check)
    try:  # before minutes of training, not after
        out = check_out_file("--out", a.out)
        check_out_dir("--cache-dir", a.cache_dir)
    except ValueError as e:
        fail(prog, str(e))
    apply_threads(a.threads, d_model)
    with lock_output(prog, out):  # another run writing the same file is refused, not silently replaced
        print(run(a.cache_dir, out))
    return 0


def lock_output(prog, path):
    """The lock of the results file `path` (lora_np.training.runset.LockedFile), held by a with-block;
    another run holding it is one line on stderr and exit status 2, before any work."""
    try:
        return LockedFile(path)
    except OutputRefused as e:
        fail(prog, str(e))
