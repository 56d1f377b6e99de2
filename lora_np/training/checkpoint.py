"""Base parameters and adapters on disk: one .npz per file, validated before anything is used.

A file holds its arrays and one extra entry, "__meta__", the UTF-8 bytes of a JSON object:
the format version, what the file holds ("params" or "adapters"), the ModelConfig, the
fingerprint of its own arrays, for params the record of adapters merged into them
(Params.merged_adapters), and for adapters the LoraConfig (scaling convention included) and the
fingerprints of the base weights the adapter was trained on. "meta_fingerprint" covers all the
rest of the metadata (config, LoraConfig, version, the array fingerprints), so an edit to
n_heads or alpha is refused rather than silently changing the math. Both fingerprints guard
against accidents (a hand edit, a bad disk), not forgery: anyone can recompute them.

Loading uses allow_pickle=False, refuses compressed members (np.savez stores them; a deflated
member of 260 KiB can expand to 560 MB) and never executes anything from the file; every way a
file can fail to fit raises CheckpointError (a ValueError) that names the file and what does
not fit. Version 1 files, whose metadata was not fingerprinted, are refused, not trusted.

Writes are atomic: the file is written under a temporary name in the same folder, flushed to
disk, then renamed over the target, so a crash mid-write leaves the previous file intact.
"""

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows has no flock: there saves and runs go unlocked (README, "Files on disk")
    fcntl = None

from ..core.config import LoraConfig, ModelConfig
from ..core.lora import adapter_names, check_adapters, check_rank
from ..core.params import Params, check_params, param_shapes
from ..methods.nf4 import NF4Tensor

FORMAT_VERSION = 2  # 2: the metadata is fingerprinted too, and adapters carry base_fingerprint_f32
META = "__meta__"
_COMPRESSION = {zipfile.ZIP_DEFLATED: "deflated", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}
MAX_ARRAYS = 100_000  # far beyond any model this package trains; bounds the work of a hostile config


class CheckpointError(ValueError):
    """A file that cannot be loaded as what was asked for; the message names the file."""


def fingerprint(params, round_to_float32=False):
    """SHA-256 of every parameter's name, shape and values, as a hex string.

    Values are hashed as little-endian float64, so a float32 base and its (exact) float64
    copy share a fingerprint; any change to any weight changes it. With round_to_float32, each
    value is first rounded to float32: a float64 base and its float32 cast then share one.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        a = params[name]
        a = a.dequantize() if isinstance(a, NF4Tensor) else a  # a 4-bit base: the weights it computes with
        a = np.asarray(a, dtype="<f4") if round_to_float32 else a
        a = np.ascontiguousarray(a, dtype="<f8")
        h.update(f"{name}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _temp_prefix(path):
    """The prefix ".{name}.{hash}." of the temporary files of `path`: at most 51 characters whatever the
    length of the name (NAME_MAX is 255), recognizable by eye, and distinct for each target."""
    return f".{path.name[:40]}.{hashlib.sha256(path.name.encode()).hexdigest()[:8]}."


# open() flags that only POSIX systems have; 0 (no flag) elsewhere
OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def flock(fd, wait=True):
    """An exclusive lock on the open file `fd`, held until it is closed or its process dies (the kernel
    drops it then). wait=False raises BlockingIOError at once if another process holds it. Where the
    system has no flock (Windows), nothing is locked."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)


def _remove_stale_temporaries(path):
    """Remove the temporary files of `path` left by saves that were killed (SIGKILL, a power cut:
    nothing runs to clean up). A save holds an flock on its temporary file while it writes, and the
    kernel drops it when the process dies: a temporary file that can be locked has no live writer and
    goes at once; a locked one is a save in progress and is left alone. Only `path`'s own (prefix,
    8 random characters, ".tmp")."""
    prefix = _temp_prefix(path)
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for e in entries:
            if e.name.startswith(prefix) and e.name.endswith(".tmp") and len(e.name) == len(prefix) + 12:
                with contextlib.suppress(OSError):
                    fd = os.open(e.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | OPEN_FLAGS)
                    try:
                        flock(fd, wait=False)  # BlockingIOError: a live writer
                        os.unlink(e.path)  # while locked: the writer's own check below sees it
                    finally:
                        os.close(fd)


def _locked_temporary(path):
    """A new temporary file beside `path`, created and flock-ed: (fd, name)."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
        flock(fd)
        if os.fstat(fd).st_nlink:  # 0: another save's cleanup removed it before we locked it
            return fd, tmp
        os.close(fd)


def write_atomic(path, write):
    """Create or replace the file `path` atomically: `write(f)` fills a temporary file in the same
    folder (f is a binary file object), which is flushed to disk and then renamed over `path`.
    Readers see the old file or the new one, never half of one. If `write` fails or is
    interrupted (an exception, KeyboardInterrupt, SystemExit), the old file is untouched and the
    temporary file is removed; a process killed outright (SIGKILL) leaves its temporary file,
    ".{name}.{hash}.{random}.tmp", which the next save of the same path removes at once: the
    writer holds an flock on it, which dies with the writer. A replaced file keeps its permission
    bits; a new one gets the usual permissions (0o666 minus the umask), not mkstemp's private
    0o600. Used for every file the package writes. ValueError if `path` is a folder.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path's folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; a file cannot replace it")
    _remove_stale_temporaries(path)
    try:
        fd, tmp = _locked_temporary(path)
    except OSError as e:  # its message would name the temporary file, which the caller never chose
        message = f"cannot save {path}: no new file can be created in its folder {path.parent} ({e.strerror or e})"
        raise (type(e)(e.errno, message) if e.errno else type(e)(message)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, _mode_for(path))
            os.replace(tmp, path)  # atomic on POSIX; the lock goes when f closes
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _mode_for(path):
    """The permission bits of the file `path` replaces, or 0o666 minus the umask for a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _meta_digest(meta):
    """SHA-256 of the metadata's canonical JSON (sorted keys), "meta_fingerprint" itself left out."""
    rest = {k: v for k, v in meta.items() if k != "meta_fingerprint"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def sign(meta):
    """The metadata with its "meta_fingerprint" (re)computed."""
    return {**meta, "meta_fingerprint": _meta_digest(meta)}


def _write_npz(path, arrays, meta):
    if Path(path).suffix != ".npz":
        raise ValueError(f"path must end in .npz, got {str(path)!r}")
    payload = dict(arrays)
    payload[META] = np.frombuffer(json.dumps(sign(meta), sort_keys=True).encode(), dtype=np.uint8)
    return write_atomic(path, lambda f: np.savez(f, **payload))


def _check_finite(name, arrays):
    bad = [k for k, a in arrays.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"{name} hold non-finite values in {bad[:4]}; refusing to save them")


def save_params(path, params):
    """Write a Params (its arrays, ModelConfig and merged_adapters) to `path` (.npz), atomically.

    Merged params are saved as they are, with the record of the adapters merged into them, so
    that after load_params, merging those adapters again is still refused and unmerging them
    still works.
    """
    check_params(params)  # a file its own loader would refuse is never written
    _check_finite("params", params)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "params",
        "model_config": vars(params.config),
        "merged_adapters": list(params.merged_adapters),
        "fingerprint": fingerprint(params),  # checked on load: the weights are the ones saved
    }
    return _write_npz(path, params, meta)


def save_adapters(path, adapters, lora, base_params):
    """Write adapters with their LoraConfig and the fingerprint of `base_params`, atomically."""
    check_params(base_params)
    check_adapters(base_params, adapters, lora)  # names, shapes and dtype fit the base
    _check_finite("adapters", adapters)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "adapters",
        "model_config": vars(base_params.config),
        "lora_config": {**vars(lora), "targets": list(lora.targets), "scaling": lora.scaling},
        "fingerprint": fingerprint(adapters),  # checked on load: the arrays are the ones saved
        "base_fingerprint": fingerprint(base_params),
        # the same base in float32 (or in float64, trained in float32) is accepted: see load_adapters
        "base_fingerprint_f32": fingerprint(base_params, round_to_float32=True),
    }
    return _write_npz(path, adapters, meta)


# ----------------------------------------------------------------------------
# loading: check the metadata, then each array's header, then read and check the data


# Everything a damaged archive can raise while being read. allow_pickle=False turns an object
# array (the only way an .npz could carry code) into a ValueError.
DAMAGED = (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, KeyError, NotImplementedError)
DAMAGED += (RuntimeError, UnicodeDecodeError, MemoryError, OverflowError)


def _open(path, kind):
    """The metadata of a lora_np archive, or CheckpointError. Reads nothing but the metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: a single .npy array, not an .npz archive")
        with z:
            for info in z.zip.infolist():  # before any member is read
                if info.compress_type != zipfile.ZIP_STORED:
                    method = _COMPRESSION.get(info.compress_type, f"method {info.compress_type}")
                    raise CheckpointError(
                        f"{path}: member {info.filename} is compressed ({method}); lora_np files store their "
                        f"arrays uncompressed (np.savez), and a compressed member can expand to any size"
                    )
            members = z.zip.namelist()
            if sorted(members) != sorted(name + ".npy" for name in z.files):
                raise CheckpointError(f"{path}: every member of a lora_np archive is an .npy array, got {members[:4]}")
            if META not in z.files:
                raise CheckpointError(f"{path}: no {META} entry; not a lora_np file")
            shape, dtype = _header(z, META)
            if dtype != np.uint8 or len(shape) != 1 or shape[0] > 1_000_000:
                raise CheckpointError(f"{path}: {META} must be at most 1 MB of UTF-8 bytes, got {dtype} {shape}")
            meta = json.loads(z[META].tobytes().decode())
    except CheckpointError:
        raise
    except (*DAMAGED, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: not a readable lora_np .npz file (truncated or corrupted?): {e!r:.200}"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version")
        why = ": version 1 did not fingerprint its metadata; load it with lora_np 1.x and save it again"
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported (this is version {FORMAT_VERSION})"
            + (why if version == 1 else "")
        )
    if meta.get("meta_fingerprint") != _meta_digest(meta):
        raise CheckpointError(
            f"{path}: the metadata do not match the fingerprint stored with them (stored "
            f"{str(meta.get('meta_fingerprint'))[:12]!s}, computed {_meta_digest(meta)[:12]}): edited by hand?"
        )
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: holds {meta.get('kind')!r}, expected {kind!r}")
    return path, meta


def _header(z, name):
    """(shape, dtype) from the .npy header of one member, without reading its data."""
    with z.zip.open(name + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _config(path, cls, fields):
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: {cls.__name__} metadata must be a JSON object, got {fields!r:.80}")
    try:
        return cls(**fields)
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: invalid {cls.__name__} in metadata: {e}") from None


def _read_arrays(path, expected_count, shapes_fn):
    """Read the arrays of an archive once their names, shapes and dtypes are known to fit.

    expected_count is checked before shapes_fn() builds the expected names, so a config that
    claims a billion layers is refused at once; each array's .npy header is read and checked
    before its data, so a header that claims a huge shape never allocates it.
    """
    if expected_count > MAX_ARRAYS:
        raise CheckpointError(f"{path}: its config needs {expected_count:,} arrays; this format allows {MAX_ARRAYS:,}")
    shapes = shapes_fn()
    arrays, dtypes = {}, set()
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [n for n in z.files if n != META]
            missing, extra = sorted(set(shapes) - set(names)), sorted(set(names) - set(shapes))
            if missing or extra:
                raise CheckpointError(f"{path}: missing arrays {missing[:4]}, unexpected arrays {extra[:4]}")
            for name, shape in shapes.items():
                got_shape, dtype = _header(z, name)
                if dtype not in (np.dtype("<f4"), np.dtype("<f8")):
                    raise CheckpointError(f"{path}: array {name} has dtype {dtype}; allowed: float32, float64")
                if got_shape != tuple(shape):
                    raise CheckpointError(f"{path}: array {name} has shape {got_shape}, expected {tuple(shape)}")
                dtypes.add(dtype)
                arrays[name] = z[name]
    except CheckpointError:
        raise
    except DAMAGED as e:
        raise CheckpointError(
            f"{path}: not a readable lora_np .npz file (truncated or corrupted?): {e!r:.200}"
        ) from None
    if len(dtypes) > 1:
        raise CheckpointError(f"{path}: arrays must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    for name, a in arrays.items():
        if not np.all(np.isfinite(a)):
            raise CheckpointError(f"{path}: array {name} holds non-finite values")
    return arrays


def load_params(path):
    """A Params saved by save_params, validated: config, names, shapes, dtype, finite values."""
    path, meta = _open(path, "params")
    cfg = _config(path, ModelConfig, meta.get("model_config"))
    # W_e, W_p, ln_f.gamma, ln_f.beta, W_u, and 16 arrays a block
    arrays = _read_arrays(path, 5 + 16 * cfg.n_layers, lambda: param_shapes(cfg))
    merged = meta.get("merged_adapters")
    if not isinstance(merged, list) or not all(isinstance(k, str) for k in merged):
        raise CheckpointError(f"{path}: merged_adapters must be a list of fingerprints, got {merged!r:.80}")
    params = Params(cfg, arrays, merged)
    if meta.get("fingerprint") != fingerprint(params):
        raise CheckpointError(f"{path}: the weights do not match the fingerprint stored with them")
    return params


def load_adapters(path, base_params=None):
    """Adapters and their LoraConfig, saved by save_adapters, validated.

    With base_params, also checks that they are the weights the adapter was trained on
    (same config, same fingerprint): an adapter applied to another base is meaningless. The
    same base in another precision is the same base: base_params is accepted when its values
    rounded to float32 equal the training base's rounded to float32 (a float64 base and its
    float32 cast, either way round; two float64 bases that differ only below float32's
    precision pass too). The adapters are then returned in the base's dtype (model_forward
    requires one dtype).

    Returns:
    - adapters: dict name -> array
    - lora: LoraConfig
    """
    if base_params is not None and not isinstance(base_params, Params):
        raise TypeError(f"base_params must be a lora_np Params or None, got {type(base_params).__name__}")
    path, meta = _open(path, "adapters")
    cfg = _config(path, ModelConfig, meta.get("model_config"))
    fields = meta.get("lora_config")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: LoraConfig metadata must be a JSON object, got {fields!r:.80}")
    fields = dict(fields)
    stored_scaling = fields.pop("scaling", None)
    lora = _config(path, LoraConfig, fields)
    if stored_scaling != lora.scaling:
        raise CheckpointError(f"{path}: stored scaling {stored_scaling!r} does not match {lora} ({lora.scaling})")
    try:
        check_rank(cfg, lora)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    # an A and a B for every target of every block
    arrays = _read_arrays(path, 2 * cfg.n_layers * len(lora.targets), lambda: adapter_names(cfg, lora))
    if meta.get("fingerprint") != fingerprint(arrays):
        raise CheckpointError(f"{path}: the adapter arrays do not match the fingerprint stored with them")
    if base_params is not None:
        if base_params.config != cfg:
            raise CheckpointError(f"{path}: adapter is for {cfg}, but the base model is {base_params.config}")
        same = meta.get("base_fingerprint") == fingerprint(base_params)
        if not same and meta.get("base_fingerprint_f32") != fingerprint(base_params, round_to_float32=True):
            raise CheckpointError(
                f"{path}: adapter was trained on base weights with fingerprint "
                f"{str(meta.get('base_fingerprint'))[:12]}..., these have {fingerprint(base_params)[:12]}...; "
                f"it belongs to a different base model"
            )
        if next(iter(arrays.values())).dtype != base_params["W_e"].dtype:
            arrays = {k: v.astype(base_params["W_e"].dtype) for k, v in arrays.items()}
    return arrays, lora
