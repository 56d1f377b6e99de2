"""What crosses between the grader and the student's process: data that executes nothing.

A message is a JSON header followed by NumPy arrays in .npy format, read back with
allow_pickle=False, each part preceded by its length. Objects are tagged in the JSON:

    {"$a": i}                       the i-th array
    {"$t": [...]}                   a tuple (lists, str, int, float, bool, None are JSON's own)
    {"$d": [[key, value], ...]}     a dict with keys that are not all str, or a subclass kept apart
    {"$s": dtype, "v": value}       a NumPy scalar (np.int64(3) is not the int 3)
    {"$o": class name, "f": {...}}  a registered dataclass (ModelConfig, LoraConfig), by its fields
    {"$p": {...}}                   a Params: config, arrays, merged_adapters
    {"$g": state}                   a np.random.Generator, by its bit generator's state

Decoding builds only these; anything else is refused (WireError). The grader's parent reads the
student's replies with it; the student's process reads the grader's requests with it. This file
imports NumPy and the standard library only: it is copied into the student's process, which
cannot import lora_np.
"""

import io
import json
import struct

import numpy as np

MAX_BYTES = 1 << 28  # one message; a reply larger than 256 MiB is refused, not read into memory
_LEN = struct.Struct("<Q")


class WireError(ValueError):
    """A message that is not one this format can carry, or that breaks it."""


class Encoder:
    def __init__(self, classes):
        self.classes = classes  # name -> dataclass; "Params" -> the Params class
        self.arrays = []

    def enc(self, v, depth=0):
        if depth > 50:
            raise WireError("nested more than 50 deep")
        if v is None or isinstance(v, (bool, str)) or type(v) in (int, float):
            return v
        if isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                raise WireError(f"an array of dtype {v.dtype} (objects) cannot be sent")
            self.arrays.append(np.ascontiguousarray(v.view(np.ndarray)))
            return {"$a": len(self.arrays) - 1}
        if isinstance(v, np.generic):
            if v.dtype.hasobject or v.dtype.kind not in "biufc":
                raise WireError(f"a NumPy scalar of dtype {v.dtype} cannot be sent")
            value = v.item()
            return {"$s": v.dtype.str, "v": [value.real, value.imag] if isinstance(value, complex) else value}
        if isinstance(v, (int, float)):  # a subclass of int or float: sent as the plain value
            return {"$s": "int" if isinstance(v, int) else "float", "v": int(v) if isinstance(v, int) else float(v)}
        params = self.classes.get("Params")
        if params is not None and isinstance(v, params):
            return {"$p": {"config": self.enc(v.config, depth + 1),
                           "arrays": self.enc(dict(v), depth + 1),
                           "merged": list(v.merged_adapters)}}  # fmt: skip
        if isinstance(v, tuple):
            return {"$t": [self.enc(x, depth + 1) for x in v]}
        if isinstance(v, list):
            return [self.enc(x, depth + 1) for x in v]
        if isinstance(v, dict):
            return {"$d": [[self.enc(k, depth + 1), self.enc(x, depth + 1)] for k, x in v.items()]}
        if isinstance(v, np.random.Generator):
            return {"$g": v.bit_generator.state}
        name = type(v).__name__
        if self.classes.get(name) is type(v):
            return {"$o": name, "f": {f: self.enc(getattr(v, f), depth + 1)
                                      for f in type(v).__dataclass_fields__}}  # fmt: skip
        raise WireError(f"a {name} cannot be sent; only arrays, numbers, str, None, tuples, lists, dicts and "
                        f"lora_np's configs and Params")  # fmt: skip


def encode(value, classes):
    """The bytes of one message carrying `value`."""
    e = Encoder(classes)
    header = json.dumps(e.enc(value), allow_nan=True).encode("utf-8")
    out = io.BytesIO()
    out.write(_LEN.pack(len(header)) + _LEN.pack(len(e.arrays)) + header)
    for a in e.arrays:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, a, allow_pickle=False)
        out.write(_LEN.pack(buf.tell()) + buf.getvalue())
    return out.getvalue()


def _dec(v, arrays, classes, depth=0):
    if depth > 60:
        raise WireError("nested too deep")
    if v is None or isinstance(v, (bool, str, int, float)):
        return v
    if isinstance(v, list):
        return [_dec(x, arrays, classes, depth + 1) for x in v]
    if not (isinstance(v, dict) and len(v) in (1, 2)):
        raise WireError("a malformed value")
    (tag, body), rest = next(iter(v.items())), v
    d = lambda x: _dec(x, arrays, classes, depth + 1)  # noqa: E731
    if tag == "$a" and type(body) is int and 0 <= body < len(arrays):
        return arrays[body]
    if tag == "$t" and isinstance(body, list):
        return tuple(d(x) for x in body)
    if tag == "$d" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
        out = {}
        for k, x in body:
            k = d(k)
            if not isinstance(k, (str, int, float, tuple, type(None))) or isinstance(k, tuple) and not all(
                isinstance(i, (str, int)) for i in k
            ):
                raise WireError("a dict key that is not a str, a number or a tuple of them")
            out[k] = d(x)
        return out
    if tag == "$s" and isinstance(body, str):
        value = rest.get("v")
        if body == "int" and type(value) is int:
            return value
        if body == "float" and isinstance(value, (int, float)):
            return float(value)
        dtype = np.dtype(body)
        if dtype.kind not in "biufc":
            raise WireError(f"a scalar of dtype {body}")
        return dtype.type(complex(*value) if dtype.kind == "c" else value)
    if tag == "$o" and isinstance(body, str) and body in classes and body != "Params":
        fields = rest.get("f")
        if not isinstance(fields, dict):
            raise WireError("a malformed object")
        return classes[body](**{k: d(x) for k, x in fields.items()})
    if tag == "$p" and isinstance(body, dict) and "Params" in classes:
        arrays_ = d(body.get("arrays"))
        merged = body.get("merged")
        if not (isinstance(arrays_, dict) and isinstance(merged, list) and all(isinstance(m, str) for m in merged)):
            raise WireError("a malformed Params")
        return classes["Params"](d(body.get("config")), arrays_, tuple(merged))
    if tag == "$g" and isinstance(body, dict) and body.get("bit_generator") == "PCG64":
        g = np.random.Generator(np.random.PCG64())
        g.bit_generator.state = body
        return g
    raise WireError(f"an unknown value {tag!r}")


def _read_exactly(f, n):
    data = f.read(n)
    if data is None or len(data) != n:
        raise EOFError("the other side closed the channel")
    return data


def read(f, classes):
    """One message from the binary file f; EOFError when the channel is closed, WireError when it is not ours."""
    head = _read_exactly(f, 16)
    n_header, n_arrays = _LEN.unpack(head[:8])[0], _LEN.unpack(head[8:])[0]
    if n_header > MAX_BYTES or n_arrays > 100_000:
        raise WireError(f"a message of {n_header} bytes and {n_arrays} arrays is too large")
    try:
        value = json.loads(_read_exactly(f, n_header).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError(f"a header that is not JSON ({type(e).__name__})") from None
    arrays, total = [], n_header
    for _ in range(n_arrays):
        n = _LEN.unpack(_read_exactly(f, 8))[0]
        total += n
        if total > MAX_BYTES:
            raise WireError(f"a message larger than {MAX_BYTES} bytes")
        try:
            arrays.append(np.lib.format.read_array(io.BytesIO(_read_exactly(f, n)), allow_pickle=False))
        except (ValueError, OSError) as e:
            raise WireError(f"an array that is not .npy ({e})") from None
    try:
        return _dec(value, arrays, classes)
    except RecursionError:
        raise WireError("nested too deep") from None
    except (TypeError, KeyError) as e:
        raise WireError(f"a malformed value ({type(e).__name__}: {e})") from None
