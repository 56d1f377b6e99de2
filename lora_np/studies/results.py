"""Results files: what a study writes and a notebook reads, written atomically and read back checked.

A results file is JSON with a "format_version" and the "config" it was computed with; a reader
refuses a file of another version or configuration, saying which command regenerates it.
"""

import json
import sys
from pathlib import Path

from ..training.checkpoint import write_atomic


def rounded(x, digits):
    # significant digits, not decimals: a projection norm can be 1e-3 and must keep its digits
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def save_results(results, path, digits=6, grid_digits=4, grid_sections=()):
    """Write results as JSON, atomically (tmp + rename). Floats keep `digits` significant digits,
    the sections named in grid_sections `grid_digits` (a heatmap cannot show more, and the file stays a
    few hundred kB)."""
    path = Path(path)
    kept = {k: rounded(v, grid_digits if k in grid_sections else digits) for k, v in results.items()}
    text = (json.dumps(kept, separators=(",", ":")) + "\n").encode()
    write_atomic(path, lambda f: f.write(text))
    return path


def read_json_object(path, fix):
    """The JSON object in the results file `path`, or ValueError saying what is there instead and
    `fix`, the advice to follow. A folder, a FIFO or a device is refused without opening it (a
    FIFO would block the read forever)."""
    path = Path(path)
    if not path.exists():  # a relative path is the current folder's: say which, as a study may run anywhere
        where = "" if path.is_absolute() else f" (in {Path.cwd()})"
        raise ValueError(f"no results file at {path}{where}; {fix}, or name the file with --out")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a results file; {fix}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file (a FIFO, a socket or a device?); {fix}")
    try:
        results = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a file cut short or edited by hand
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds a JSON {type(results).__name__}, not a results object; {fix}")
    return results


def read_checked(path, config, version, command):
    """A cached results file, after checking its format version and that its "config" is `config`
    (a JSON-ready dict). Raises ValueError saying what does not match and the command that
    regenerates the file. Returns (results, the advice to print with any later complaint)."""
    fix = f"regenerate it with `{command}`"
    results = read_json_object(path, fix)
    if results.get("format_version") != version:
        raise ValueError(f"{path} has format_version {results.get('format_version')!r}, the code reads "
                         f"{version}; {fix}")  # fmt: skip
    got = results.get("config")
    if got != config:
        got = got if isinstance(got, dict) else {}
        diff = sorted(k for k in set(config) | set(got) if got.get(k) != config.get(k))
        raise ValueError(f"{path} was computed with another configuration (differs in {diff}); {fix}")
    return results, fix


def check_command(path, load):
    """What a study's --check does: load(path) checks the results file; one line says whether it fits.
    Returns the exit status, 0 when it fits, 1 when it does not (the line on stderr says why)."""
    try:
        load(path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{path} fits the code's configuration")
    return 0
