"""Base parameters and adapters on disk: one .npz per file, validated before anything is used.

A file holds its arrays and one extra entry, "__meta__", the UTF-8 bytes of a JSON object:
the format version, what the file holds ("params" or "adapters"), the ModelConfig, the
fingerprint of its own arrays, and for adapters the LoraConfig (scaling convention included)
and the fingerprint of the base weights the adapter was trained on. Loading uses allow_pickle=False and never executes
anything from the file; every way a file can fail to fit raises CheckpointError (a
ValueError) that names the file and what does not fit.

Writes are atomic: the file is written under a temporary name in the same folder, flushed to
disk, then renamed over the target, so a crash mid-write leaves the previous file intact.
"""

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .config import LoraConfig, ModelConfig
from .lora import adapter_names, check_adapters, check_rank
from .nf4 import NF4Tensor
from .params import Params, check_params, param_shapes

FORMAT_VERSION = 1
META = "__meta__"
MAX_ARRAYS = 100_000  # far beyond any model this package trains; bounds the work of a hostile config


class CheckpointError(ValueError):
    """A file that cannot be loaded as what was asked for; the message names the file."""


def fingerprint(params):
    """SHA-256 of every parameter's name, shape and values, as a hex string.

    Values are hashed as little-endian float64, so a float32 base and its (exact) float64
    copy share a fingerprint; any change to any weight changes it.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        a = params[name]
        a = a.dequantize() if isinstance(a, NF4Tensor) else a  # a 4-bit base: the weights it computes with
        a = np.ascontiguousarray(a, dtype="<f8")
        h.update(f"{name}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_atomic(path, write):
    """Create or replace the file `path` atomically: `write(f)` fills a temporary file in the same
    folder (f is a binary file object), which is flushed to disk and then renamed over `path`.
    Readers see the old file or the new one, never half of one; if `write` fails, the old file is
    untouched and the temporary file is removed. The new file gets the usual permissions (0o666
    minus the umask), not mkstemp's private 0o600. Used for every file the package writes.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path's folder {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _write_npz(path, arrays, meta):
    if Path(path).suffix != ".npz":
        raise ValueError(f"path must end in .npz, got {str(path)!r}")
    payload = dict(arrays)
    payload[META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    return write_atomic(path, lambda f: np.savez(f, **payload))


def _check_finite(name, arrays):
    bad = [k for k, a in arrays.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"{name} hold non-finite values in {bad[:4]}; refusing to save them")


def save_params(path, params):
    """Write a Params (its arrays and ModelConfig) to `path` (.npz), atomically."""
    check_params(params)  # a file its own loader would refuse is never written
    _check_finite("params", params)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "params",
        "model_config": vars(params.config),
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
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported (this is version {FORMAT_VERSION})"
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
    params = Params(cfg, arrays)
    if meta.get("fingerprint") != fingerprint(params):
        raise CheckpointError(f"{path}: the weights do not match the fingerprint stored with them")
    return params


def load_adapters(path, base_params=None):
    """Adapters and their LoraConfig, saved by save_adapters, validated.

    With base_params, also checks that they are the weights the adapter was trained on
    (same config, same fingerprint): an adapter applied to another base is meaningless. The
    adapters are then returned in the base's dtype (model_forward requires one dtype).

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
        if meta.get("base_fingerprint") != fingerprint(base_params):
            raise CheckpointError(
                f"{path}: adapter was trained on base weights with fingerprint "
                f"{str(meta.get('base_fingerprint'))[:12]}..., these have {fingerprint(base_params)[:12]}...; "
                f"it belongs to a different base model"
            )
        if next(iter(arrays.values())).dtype != base_params["W_e"].dtype:
            arrays = {k: v.astype(base_params["W_e"].dtype) for k, v in arrays.items()}
    return arrays, lora
