"""The safetensors format, read and written with NumPy alone.

safetensors is Hugging Face's format for published weights (GPT-2's model.safetensors among
them). A file is three parts, as its README ("Format") and reference implementation specify
(github.com/huggingface/safetensors: README.md, safetensors/src/tensor.rs):

    8 bytes     N, the header's length, an unsigned 64-bit little-endian integer
    N bytes     the header, UTF-8 JSON: an object mapping each tensor's name to
                {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, plus an
                optional "__metadata__" object of str -> str
    the rest    the data buffer: each tensor's raw bytes, little-endian, C (row-major) order,
                at [begin, end) counted from the buffer's first byte (byte 8 + N of the file)

The README's Format section names the field "data_offsets" (since PR #282, June 2023, which
replaced the older example's "offsets"), calls N "an unsigned little-endian 64-bit integer", and
lets the header be padded at its end with spaces (0x20), a rule PR #306 wrote down in August 2023.
The reference reader refuses a header over 100_000_000 bytes (MAX_HEADER_SIZE in tensor.rs),
duplicate keys (README), and a buffer that the tensors do not cover exactly, with no holes and no
overlaps (Metadata::validate). Writers use that padding to make the header's length a multiple of
8, so the buffer starts 8-byte aligned. 0-d tensors (shape []) and zero-size ones (a 0 in the
shape) are allowed.

Why NumPy and nothing else: the format is a length, a JSON header and raw bytes. Python's json
parses the header and np.frombuffer over a read-only mmap turns a byte range into an array;
the safetensors package would add a compiled dependency to do the same.

What is a view and what is a copy. read_safetensors maps the file and returns F32, F64,
integer and BOOL tensors as read-only views into the map: nothing is read until an element
is used, and a 500 MB file costs no 500 MB of memory. NumPy has no bfloat16, and float16 is
too slow and too imprecise to compute with, so F16 and BF16 tensors are widened to float32:
a copy, made only for the tensors asked for. Every header is checked whole before any tensor
is touched; anything malformed raises CheckpointError naming the file and the problem.

Writes go through lora_np.checkpoint.write_atomic: a crash leaves the old file or the new one.
"""

import json
import math
import mmap
import os
from pathlib import Path

import numpy as np

from ..training.checkpoint import CheckpointError, write_atomic

# Every dtype this module reads, as named by the spec, and the NumPy dtype of its bytes.
SAFETENSORS_DTYPES = {
    "BOOL": np.dtype("|b1"),
    "U8": np.dtype("|u1"),
    "I8": np.dtype("|i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # NumPy has no bfloat16: read as the raw 16 bits, then widened
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
# In the spec but not in NumPy: such a tensor is checked like any other and refused only if asked for.
UNREADABLE_ITEMSIZE = {"F8_E5M2": 1, "F8_E4M3": 1}

# What write_safetensors writes: each NumPy dtype (any byte order) and its name in the file.
WRITABLE = {np.dtype(t): name for t, name in [
    (np.float64, "F64"), (np.float32, "F32"), (np.float16, "F16"),
    (np.int64, "I64"), (np.int32, "I32"), (np.int16, "I16"), (np.int8, "I8"),
    (np.uint8, "U8"), (np.bool_, "BOOL"),
]}  # fmt: skip

METADATA = "__metadata__"
MAX_HEADER = 100_000_000  # the reference's MAX_HEADER_SIZE: parsing is bounded before it starts
MAX_NDIM = 32  # NumPy 1.x's limit (2.x allows 64); no real tensor comes close
ALIGN = 8  # the buffer starts 8-byte aligned, as the reference writer pads it
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


# ----------------------------------------------------------------------------
# reading: the length, the header, each entry, the layout of the buffer; then the arrays


def read_safetensors(path, names=None):
    """The tensors and metadata of a safetensors file, mapped rather than read.

    Inputs:
    - path: the file
    - names: None for every tensor, or an iterable of the names wanted; the others are
      checked in the header but their bytes are never touched

    Returns:
    - arrays: dict name -> np.ndarray, in the order of their bytes in the file (for files
      written here or by Hugging Face's library, also the header's order). F32, F64, integer
      and BOOL arrays are read-only views into the mapped file; F16 and BF16 become float32.
    - metadata: the "__metadata__" dict, or {} if the file has none

    Raises CheckpointError (a ValueError) naming the file and what is wrong with it.
    """
    path = Path(path)
    wanted = _wanted_names(names)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, data_start = _read_header(path, f, size)
        buffer_size = size - data_start
        metadata = _check_metadata(path, header.pop(METADATA, {}))
        entries = {name: _check_entry(path, name, entry, buffer_size) for name, entry in header.items()}
        order = _check_layout(path, entries, buffer_size)
        if wanted is not None:
            _check_wanted(path, wanted, entries)
            order = [name for name in order if name in wanted]
        # Mapped only now that every number in the header is known to fit the file. The map
        # outlives the file object (mmap keeps its own handle) and lives as long as an array
        # uses it.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    arrays = {name: _array(path, mm, data_start, name, *entries[name]) for name in order}
    return arrays, metadata


def _wanted_names(names):
    if names is None:
        return None
    if isinstance(names, (str, bytes)):  # a bare name would be split into letters
        raise TypeError(f"names must be an iterable of tensor names or None, got {names!r}")
    return set(names)


def _open(path):
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened: {e}") from None


def _read_header(path, f, size):
    """The header as a dict (duplicate keys refused) and the offset of the data buffer.

    The length is checked against the file and MAX_HEADER before a byte of the header is read,
    so a corrupted length cannot make us allocate gigabytes.
    """
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, shorter than the 8-byte header length; not a safetensors file")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER:
        raise CheckpointError(f"{path}: header length {n:,} bytes is over the limit of {MAX_HEADER:,}")
    if n > size - 8:
        raise CheckpointError(f"{path}: header length {n:,} bytes is more than the {size - 8:,} bytes after it")
    try:
        text = f.read(n).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: the header has the key {e.key!r} twice; the spec forbids duplicates") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the header is not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: the header is not JSON: {e!r:.200}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n


class _DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs):
    """json's object_pairs_hook: a dict, or _DuplicateKey (json.loads would keep the last silently)."""
    d = {}
    for key, value in pairs:
        if key in d:
            raise _DuplicateKey(key)
        d[key] = value
    return d


def _check_metadata(path, metadata):
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: {METADATA} must be an object of str -> str, got {metadata!r:.100}")
    return metadata  # JSON object keys are always str


def _check_entry(path, name, entry, buffer_size):
    """(dtype name, shape, begin, end) of one header entry, each checked against the buffer."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise CheckpointError(f"{where}: must be an object with exactly the keys {sorted(ENTRY_KEYS)}, got {got}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or (dtype not in SAFETENSORS_DTYPES and dtype not in UNREADABLE_ITEMSIZE):
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(map(_is_u64, shape)):
        raise CheckpointError(
            f"{where}: shape must be a list of at most {MAX_NDIM} ints in [0, 2**64), got {shape!r:.100}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise CheckpointError(f"{where}: data_offsets must be two ints [begin, end], got {offsets!r:.100}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] must have 0 <= begin <= end")
    if end > buffer_size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] end beyond the data buffer of {buffer_size:,} bytes (truncated?)"
        )
    itemsize = SAFETENSORS_DTYPES[dtype].itemsize if dtype in SAFETENSORS_DTYPES else UNREADABLE_ITEMSIZE[dtype]
    nbytes = math.prod(shape) * itemsize  # at most 32 factors below 2**64: exact and cheap
    if nbytes != end - begin:
        needs = f"{nbytes:,}" if nbytes < 2**64 else "more than 2**64"
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin:,} bytes, "
            f"but shape {shape!r:.100} of {dtype} ({itemsize} bytes each) needs {needs}"
        )
    return dtype, tuple(shape), begin, end


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true would otherwise pass as 1


def _is_u64(x):
    # the reference reads dimensions as usize; the bound also keeps prod(shape) a small integer
    return _is_int(x) and 0 <= x < 2**64


def _check_layout(path, entries, buffer_size):
    """The names in the order of their bytes, once the tensors are known to tile the buffer
    exactly: no overlap (two arrays sharing bytes) and no hole (bytes no tensor owns)."""
    order = sorted(entries, key=lambda name: entries[name][2:])  # by (begin, end); stable for ties
    pos, previous = 0, None
    for name in order:
        begin, end = entries[name][2:]
        if begin < pos:
            raise CheckpointError(
                f"{path}: tensors {previous!r} and {name!r} overlap: {name!r} starts at byte {begin:,}, "
                f"before {previous!r} ends at byte {pos:,}"
            )
        if begin > pos:
            after = f"after {previous!r}" if previous is not None else "at its start"
            raise CheckpointError(
                f"{path}: hole in the data buffer: bytes [{pos:,}, {begin:,}) {after} belong to no tensor"
            )
        pos, previous = end, name
    if pos != buffer_size:
        raise CheckpointError(
            f"{path}: the data buffer holds {buffer_size:,} bytes but the tensors end at byte {pos:,}: "
            f"{buffer_size - pos:,} trailing bytes belong to no tensor"
        )
    return order


def _check_wanted(path, wanted, entries):
    missing = sorted((n for n in wanted if n not in entries), key=repr)
    if missing:
        more = f" and {len(entries) - 5:,} more" if len(entries) > 5 else ""
        raise CheckpointError(f"{path}: no tensor named {missing[0]!r}; the file has {list(entries)[:5]}{more}")


def _array(path, mm, data_start, name, dtype, shape, begin, end):
    """One tensor: a read-only view into the map, or a float32 copy for F16 and BF16."""
    if dtype in UNREADABLE_ITEMSIZE:
        raise CheckpointError(f"{path}: tensor {name!r} is {dtype}, which NumPy cannot represent; skip it with names=")
    stored = SAFETENSORS_DTYPES[dtype]
    raw = np.frombuffer(mm, stored, count=(end - begin) // stored.itemsize, offset=data_start + begin)
    if dtype == "F16":
        return raw.astype(np.float32).reshape(shape)
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: put its 16 bits there, zeros below
        bits = raw.astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32).reshape(shape)
    return raw.reshape(shape)  # a view: reshape of a contiguous array never copies


# ----------------------------------------------------------------------------
# writing: check every name, array and metadata entry, then write array by array


def write_safetensors(path, arrays, metadata=None):
    """Write a dict name -> np.ndarray as a safetensors file at `path`, atomically.

    Inputs:
    - path: the file to create or replace (its folder must exist; a folder at path is a ValueError)
    - arrays: dict name -> np.ndarray of float64/32/16, int64/32/16/8, uint8 or bool, written
      in the dict's order as C-order little-endian bytes
    - metadata: None or a dict str -> str, stored as "__metadata__"

    Everything is checked before the file is created: a name that is not a non-empty str, or
    is "__metadata__", or an unsupported dtype raises an error naming it and nothing is written.
    Arrays are converted (byte order, contiguity) and written one at a time, so at most one
    array's copy exists at once. Returns the path.
    """
    plan = [(name, array, _dtype_name(name, array)) for name, array in _check_arrays(arrays)]
    header = {}
    if metadata is not None:
        header[METADATA] = _check_write_metadata(metadata)
    begin = 0
    for name, array, dtype in plan:
        end = begin + array.nbytes
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [begin, end]}
        begin = end
    # compact JSON, as the reference writes it; spaces pad it so the buffer starts 8-byte aligned
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % ALIGN)
    if len(text) > MAX_HEADER:
        raise ValueError(f"the header would be {len(text):,} bytes; readers refuse more than {MAX_HEADER:,}")

    def write(f):
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, array, dtype in plan:
            a = np.ascontiguousarray(array, dtype=SAFETENSORS_DTYPES[dtype])  # a copy only if needed
            f.write(a.reshape(-1).view(np.uint8))  # its bytes, without a copy through Python bytes

    return write_atomic(path, write)


def _check_arrays(arrays):
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict name -> np.ndarray, got {type(arrays).__name__}")
    for name, array in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array names must be str, got {name!r} ({type(name).__name__})")
        if name in ("", METADATA):
            raise ValueError(f"array name {name!r} is not allowed: names must be non-empty and not {METADATA!r}")
        _check_utf8("array name", name)
        if not isinstance(array, np.ndarray):
            raise TypeError(f"array {name!r} must be a np.ndarray, got {type(array).__name__}")
    return list(arrays.items())


def _dtype_name(name, array):
    dtype = array.dtype.newbyteorder("=")  # either byte order is fine: the bytes are written little-endian
    if dtype not in WRITABLE:
        allowed = ", ".join(str(t) for t in WRITABLE)
        raise ValueError(f"array {name!r} has dtype {array.dtype}, which this writer does not take; allowed: {allowed}")
    return WRITABLE[dtype]


def _check_write_metadata(metadata):
    if not (isinstance(metadata, dict) and all(isinstance(x, str) for item in metadata.items() for x in item)):
        raise ValueError(f"metadata must be a dict str -> str or None, got {metadata!r:.100}")
    for k, v in metadata.items():
        _check_utf8("metadata key", k)
        _check_utf8(f"metadata value of {k!r}", v)
    return dict(metadata)


def _check_utf8(what, s):
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: Python allows it in a str, UTF-8 does not
        raise ValueError(f"{what} {s!r} cannot be encoded as UTF-8") from None
