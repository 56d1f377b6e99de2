"""Base parameters and adapters on disk: one .npz per file, validated before anything is used.

A file holds its arrays and one extra entry, "__meta__", the UTF-8 bytes of a JSON object:
the format version, what the file holds ("params" or "adapters"), the ModelConfig, and for
adapters the LoraConfig (scaling convention included) and the fingerprint of the base
weights the adapter was trained on. Loading uses allow_pickle=False and never executes
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
from .lora import adapter_names, check_rank
from .params import Params, param_shapes

FORMAT_VERSION = 1
META = "__meta__"


class CheckpointError(ValueError):
    """A file that cannot be loaded as what was asked for; the message names the file."""


def fingerprint(params):
    """SHA-256 of every parameter's name, shape and values, as a hex string.

    Values are hashed as little-endian float64, so a float32 base and its (exact) float64
    copy share a fingerprint; any change to any weight changes it.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name], dtype="<f8")
        h.update(f"{name}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_atomic(path, arrays, meta):
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path must end in .npz, got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path's folder {str(path.parent)!r} does not exist")
    payload = dict(arrays)
    payload[META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see old or new, never half
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_params(path, params):
    """Write a Params (its arrays and ModelConfig) to `path` (.npz), atomically."""
    if not isinstance(params, Params):
        raise TypeError(f"params must be a lora_np Params, got {type(params).__name__}")
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "params",
        "model_config": vars(params.config),
        "fingerprint": fingerprint(params),  # checked on load: the weights are the ones saved
    }
    return _write_atomic(path, params, meta)


def save_adapters(path, adapters, lora, base_params):
    """Write adapters with their LoraConfig and the fingerprint of `base_params`, atomically."""
    if not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a LoraConfig, got {type(lora).__name__}")
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "adapters",
        "model_config": vars(base_params.config),
        "lora_config": {**vars(lora), "targets": list(lora.targets), "scaling": lora.scaling},
        "base_fingerprint": fingerprint(base_params),
    }
    return _write_atomic(path, adapters, meta)


# ----------------------------------------------------------------------------
# loading: read everything, check everything, then hand it out


def _read(path, kind):
    """Arrays and metadata of a file, or CheckpointError. Nothing from the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    # Everything a damaged archive can raise while being read; allow_pickle=False turns an
    # object array (the only way an .npz could carry code) into a ValueError.
    damaged = (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, KeyError)
    damaged += (NotImplementedError, RuntimeError, UnicodeDecodeError)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: a single .npy array, not an .npz archive")
        with z:
            arrays = {name: z[name] for name in z.files}
    except damaged as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable .npz file (truncated or corrupted?): {e!r:.200}") from None
    if META not in arrays:
        raise CheckpointError(f"{path}: no {META} entry; not a lora_np file")
    try:
        meta = json.loads(arrays.pop(META).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported (this is version {FORMAT_VERSION})"
        )
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: holds {meta.get('kind')!r}, expected {kind!r}")
    return path, arrays, meta


def _config(path, cls, fields):
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: {cls.__name__} metadata must be an object, got {fields!r:.80}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {cls.__name__} in metadata: {e}") from None


def _check_arrays(path, arrays, shapes):
    missing = sorted(set(shapes) - set(arrays))
    extra = sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"{path}: missing arrays {missing[:4]}, unexpected arrays {extra[:4]}")
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) != 1 or dtypes.pop() not in (np.float32, np.float64):
        raise CheckpointError(f"{path}: arrays must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    for name, shape in shapes.items():
        if arrays[name].shape != tuple(shape):
            raise CheckpointError(f"{path}: array {name} has shape {arrays[name].shape}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arrays[name])):
            raise CheckpointError(f"{path}: array {name} holds non-finite values")


def load_params(path):
    """A Params saved by save_params, validated: config, names, shapes, dtype, finite values."""
    path, arrays, meta = _read(path, "params")
    cfg = _config(path, ModelConfig, meta.get("model_config"))
    _check_arrays(path, arrays, param_shapes(cfg))
    params = Params(cfg, arrays)
    if meta.get("fingerprint") != fingerprint(params):
        raise CheckpointError(f"{path}: the weights do not match the fingerprint stored with them")
    return params


def load_adapters(path, base_params=None):
    """Adapters and their LoraConfig, saved by save_adapters, validated.

    With base_params, also checks that they are the weights the adapter was trained on
    (same config, same fingerprint): an adapter applied to another base is meaningless.

    Returns:
    - adapters: dict name -> array
    - lora: LoraConfig
    """
    path, arrays, meta = _read(path, "adapters")
    cfg = _config(path, ModelConfig, meta.get("model_config"))
    fields = dict(meta.get("lora_config") or {})
    stored_scaling = fields.pop("scaling", None)
    lora = _config(path, LoraConfig, fields)
    if stored_scaling != lora.scaling:
        raise CheckpointError(f"{path}: stored scaling {stored_scaling!r} does not match {lora} ({lora.scaling})")
    try:
        check_rank(cfg, lora)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    _check_arrays(path, arrays, adapter_names(cfg, lora))
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
