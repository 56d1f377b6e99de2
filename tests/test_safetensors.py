"""safetensors files: hand-built bytes read as the spec says, round trips bit for bit, mapped
views, every malformed file refused by name, bad input to the writer refused before writing.

Files the reader is tested on are built here with struct and json, never with the writer, so
a bug shared by both cannot hide; the writer is checked byte for byte against the reference
implementation's own test vectors (huggingface/safetensors, safetensors/src/tensor.rs).
"""

import json
import mmap
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from lora_np.checkpoint import CheckpointError
from lora_np.safetensors import MAX_HEADER, read_safetensors, write_safetensors

WRITABLE = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]


def _bytes(header, data=b""):
    """A safetensors file: the header (a dict, dumped here, or raw bytes) after its length."""
    if not isinstance(header, bytes):
        header = json.dumps(header).encode()
    return struct.pack("<Q", len(header)) + header + data


def _write(tmp_path, content, name="t.safetensors"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _mapped(a):
    """True if a's memory belongs to a memory map of a file (walking the chain of bases)."""
    while isinstance(a, np.ndarray) and not isinstance(a, np.memmap):
        a = a.base
    if isinstance(a, memoryview):
        a = a.obj
    return isinstance(a, (mmap.mmap, np.memmap))


# ----------------------------------------------------------------------------
# reading files built by hand


def test_hand_built_file_reads_as_the_spec_says(tmp_path):
    # No padding: the buffer starts unaligned, which the spec allows (and some writers do)
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "h": {"dtype": "F16", "shape": [2], "data_offsets": [24, 28]},
        "n": {"dtype": "I64", "shape": [], "data_offsets": [28, 36]},
        "e": {"dtype": "F64", "shape": [0, 4], "data_offsets": [36, 36]},
        "m": {"dtype": "BOOL", "shape": [3], "data_offsets": [36, 39]},
    }
    data = struct.pack("<6f", 0, 1, 2, 3, 4, 5) + struct.pack("<2e", 1.5, -0.25) + struct.pack("<q", -7)
    data += bytes([1, 0, 1])
    arrays, metadata = read_safetensors(_write(tmp_path, _bytes(header, data)))
    assert metadata == {"format": "pt"}
    assert list(arrays) == ["w", "h", "n", "e", "m"]
    np.testing.assert_array_equal(arrays["w"], [[0, 1, 2], [3, 4, 5]])
    assert arrays["w"].dtype == np.float32
    assert arrays["h"].dtype == np.float32 and arrays["h"].tolist() == [1.5, -0.25]
    assert arrays["n"].shape == () and arrays["n"].dtype == np.int64 and arrays["n"] == -7
    assert arrays["e"].shape == (0, 4) and arrays["e"].dtype == np.float64
    assert arrays["m"].dtype == np.bool_ and arrays["m"].tolist() == [True, False, True]


def test_arrays_come_in_the_order_of_their_bytes(tmp_path):
    header = {
        "b": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]},
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
    }
    arrays, metadata = read_safetensors(_write(tmp_path, _bytes(header, b"\x05\x06")))
    assert list(arrays) == ["a", "b"] and arrays["a"][0] == 5 and arrays["b"][0] == 6
    assert metadata == {}


def test_bf16_is_the_top_half_of_a_float32(tmp_path):
    # known bit patterns: 1.0 = 0x3F80, -2.0 = 0xC000, 3.140625 = 0x4049, inf = 0x7F80
    known = np.array([1.0, -2.0, 3.140625, 0.0, -0.0, np.inf, -np.inf], np.float32)
    # and every one of the 65536 bfloat16s, as the float32 with those high bits and zeros below
    every = (np.arange(2**16, dtype=np.uint32) << 16).view(np.float32)
    values = np.concatenate([known, every])
    bits = values.view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)
    data = (bits >> 16).astype("<u2").tobytes()
    header = {"x": {"dtype": "BF16", "shape": [len(values)], "data_offsets": [0, len(data)]}}
    x = read_safetensors(_write(tmp_path, _bytes(header, data)))[0]["x"]
    assert x.dtype == np.float32
    assert x[:7].tolist() == [1.0, -2.0, 3.140625, 0.0, -0.0, float("inf"), float("-inf")]
    assert np.array_equal(x.view(np.uint32), bits)  # bit for bit, NaN payloads and -0.0 included


def test_float32_and_integer_arrays_are_read_only_views_of_the_map(tmp_path):
    header = {
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "d": {"dtype": "F64", "shape": [], "data_offsets": [8, 16]},
        "i": {"dtype": "I32", "shape": [2], "data_offsets": [16, 24]},
        "h": {"dtype": "F16", "shape": [2], "data_offsets": [24, 28]},
    }
    arrays = read_safetensors(_write(tmp_path, _bytes(header, bytes(28))))[0]
    for name in "fdi":
        a = arrays[name]
        assert not a.flags.owndata and not a.flags.writeable and _mapped(a), name
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 1
    assert arrays["h"].flags.owndata or not _mapped(arrays["h"])  # widened: a copy of its own


def test_names_returns_only_those(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]},
        "c": {"dtype": "I8", "shape": [4], "data_offsets": [8, 12]},
    }
    path = _write(tmp_path, _bytes(header, bytes(12)))
    assert list(read_safetensors(path, names=["c", "a"])[0]) == ["a", "c"]
    assert read_safetensors(path, names=[])[0] == {}
    with pytest.raises(CheckpointError, match=r"t\.safetensors: no tensor named 'x'; the file has \['a', 'b', 'c'\]"):
        read_safetensors(path, names=["a", "x"])
    with pytest.raises(TypeError, match=r"names must be an iterable of tensor names or None, got 'abc'"):
        read_safetensors(path, names="abc")


def test_a_tensor_numpy_cannot_hold_is_refused_only_if_asked_for(tmp_path):
    header = {
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "q": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [4, 8]},
    }
    path = _write(tmp_path, _bytes(header, bytes(8)))
    assert list(read_safetensors(path, names=["w"])[0]) == ["w"]
    with pytest.raises(CheckpointError, match=r"tensor 'q' is F8_E4M3, which NumPy cannot represent"):
        read_safetensors(path)


# ----------------------------------------------------------------------------
# malformed files: each built by hand, each refused with a message naming the problem

F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def _one(data=bytes(4), **change):
    """A file with one tensor 'a', F32_1 with some fields changed."""
    return _bytes({"a": {**F32_1, **change}}, data)


def _f32(begin, end):
    """An F32 entry spanning [begin, end)."""
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


A = "tensor 'a': "
MALFORMED = {
    "shorter than 8 bytes": (b"\x01\x02\x03", r"3 bytes, shorter than the 8-byte header length"),
    "header longer than the file": (struct.pack("<Q", 1000) + b"{}", r"header length 1,000 bytes is more than the 2"),
    "header over the limit": (struct.pack("<Q", MAX_HEADER + 1) + b"{}", r"header length 100,000,001 bytes is over"),
    "header not UTF-8": (_bytes(b'{"\xff": 1}'), r"the header is not UTF-8"),
    "header not JSON": (_bytes(b"{nope"), r"the header is not JSON"),
    "header not an object": (_bytes(b"[1, 2]"), r"the header must be a JSON object, got list"),
    "duplicate tensor": (
        _bytes(b'{"a": %s, "a": %s}' % (json.dumps(F32_1).encode(), json.dumps(F32_1).encode()), bytes(4)),
        r"the header has the key 'a' twice",
    ),
    "duplicate field": (
        _bytes(b'{"a": {"dtype": "F32", "dtype": "F64", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
        r"the header has the key 'dtype' twice",
    ),
    "entry not an object": (_bytes({"a": [0, 4]}), A + r"must be an object with exactly the keys.*got list"),
    "entry missing a key": (
        _bytes({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)),
        A + r"must be an object with exactly the keys \['data_offsets', 'dtype', 'shape'\], got \['dtype', 'shape'\]",
    ),
    "entry with an extra key": (_one(offsets=[0, 4]), A + r"must be an object with exactly the keys .*'offsets'"),
    "unknown dtype": (_one(dtype="F128"), A + r"unknown dtype 'F128'; known: BOOL, U8"),
    "dtype not a string": (_one(dtype=4), A + r"unknown dtype 4"),
    "dtype a list": (_one(dtype=["F32"]), A + r"unknown dtype \['F32'\]"),
    "shape not a list": (_one(shape=1), A + r"shape must be a list of at most 32 ints in \[0, 2\*\*64\), got 1"),
    "negative dimension": (_one(shape=[-1]), A + r"shape must be a list .* got \[-1\]"),
    "float dimension": (_one(shape=[1.0]), A + r"shape must be a list .* got \[1\.0\]"),
    "bool dimension": (_one(shape=[True]), A + r"shape must be a list .* got \[True\]"),
    "dimension of 2**64": (_one(shape=[2**64]), A + r"shape must be a list .* got \[18446744073709551616\]"),
    "33 dimensions": (_one(shape=[1] * 33), A + r"shape must be a list of at most 32 ints"),
    "one offset": (_one(data_offsets=[4]), A + r"data_offsets must be two ints \[begin, end\], got \[4\]"),
    "three offsets": (_one(data_offsets=[0, 4, 4]), A + r"data_offsets must be two ints .* got \[0, 4, 4\]"),
    "string offset": (_one(data_offsets=["0", 4]), A + r"data_offsets must be two ints .* got \['0', 4\]"),
    "float offset": (_one(data_offsets=[0, 4.0]), A + r"data_offsets must be two ints .* got \[0, 4\.0\]"),
    "negative begin": (_one(data_offsets=[-4, 0]), A + r"data_offsets \[-4, 0\] must have 0 <= begin <= end"),
    "begin after end": (_one(data_offsets=[4, 0]), A + r"data_offsets \[4, 0\] must have 0 <= begin <= end"),
    "end beyond the buffer": (
        _one(data=bytes(3)),
        A + r"data_offsets \[0, 4\] end beyond the data buffer of 3 bytes \(truncated\?\)",
    ),
    "size not shape times itemsize": (
        _one(data=bytes(8), shape=[3], data_offsets=[0, 8]),
        A + r"data_offsets \[0, 8\] span 8 bytes, but shape \[3\] of F32 \(4 bytes each\) needs 12",
    ),
    "huge shape": (
        _one(data=bytes(8), shape=[2**63] * 32, data_offsets=[0, 8]),
        A + r"data_offsets \[0, 8\] span 8 bytes, but shape .* needs more than 2\*\*64",
    ),
    "overlap": (
        _bytes({"a": F32_1, "b": _f32(2, 10)}, bytes(10)),
        r"tensors 'a' and 'b' overlap: 'b' starts at byte 2, before 'a' ends at byte 4",
    ),
    "empty tensor inside another": (
        _bytes({"a": _f32(0, 8), "z": _f32(4, 4)}, bytes(8)),
        r"tensors 'a' and 'z' overlap",
    ),
    "hole": (
        _bytes({"a": F32_1, "b": _f32(6, 10)}, bytes(10)),
        r"hole in the data buffer: bytes \[4, 6\) after 'a' belong to no tensor",
    ),
    "hole at the start": (
        _one(data=bytes(6), data_offsets=[2, 6]),
        r"hole in the data buffer: bytes \[0, 2\) at its start belong to no tensor",
    ),
    "trailing bytes": (
        _one(data=bytes(7)),
        r"the data buffer holds 7 bytes but the tensors end at byte 4: 3 trailing bytes belong to no tensor",
    ),
    "data but no tensors": (_bytes({}, bytes(2)), r"the data buffer holds 2 bytes but the tensors end at byte 0"),
    "metadata not an object": (
        _bytes({"__metadata__": ["pt"], "a": F32_1}, bytes(4)),
        r"__metadata__ must be an object of str -> str, got \['pt'\]",
    ),
    "metadata value not a string": (
        _bytes({"__metadata__": {"step": 3}, "a": F32_1}, bytes(4)),
        r"__metadata__ must be an object of str -> str, got \{'step': 3\}",
    ),
}


@pytest.mark.parametrize("content, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_is_refused_by_name(tmp_path, content, message):
    path = _write(tmp_path, content, "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: " + message):
        read_safetensors(path)


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match=r"no such file"):
        read_safetensors(tmp_path)


# ----------------------------------------------------------------------------
# writing


def _text(min_size=0):
    return st.text(st.characters(exclude_categories=("Cs",)), min_size=min_size, max_size=6)  # Cs: lone surrogates


def _names():
    return _text(min_size=1).filter(lambda s: s != "__metadata__")


def _array():
    return st.sampled_from(WRITABLE).flatmap(
        lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    )


def _bits(a):
    return a.dtype.str, a.shape, a.tobytes()


@given(
    arrays=st.dictionaries(_names(), _array(), max_size=5),
    metadata=st.none() | st.dictionaries(_text(), _text(), max_size=3),
)
def test_round_trip_bit_for_bit(arrays, metadata):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.safetensors"
        write_safetensors(path, arrays, metadata)
        back, meta = read_safetensors(path)
        assert meta == (metadata or {})
        assert list(back) == list(arrays)
        for name, a in arrays.items():
            expected = a.astype(np.float32) if a.dtype == np.float16 else a  # F16 is widened on reading
            assert _bits(back[name]) == _bits(np.ascontiguousarray(expected).reshape(a.shape)), name
        del back  # the map must go before the folder (Windows cannot delete a mapped file)


@pytest.mark.parametrize("dtype", WRITABLE, ids=lambda t: np.dtype(t).name)
def test_every_dtype_round_trips_0d_zero_size_and_nd(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arrays = {
        "scalar": np.array(rng.integers(0, 2), dtype),
        "empty": np.zeros((2, 0, 3), dtype),
        "nd": (rng.standard_normal((2, 3, 4)) * 50).astype(dtype),
    }
    back = read_safetensors(write_safetensors(tmp_path / "t.safetensors", arrays))[0]
    for name, a in arrays.items():
        expected = a.astype(np.float32) if a.dtype == np.float16 else a
        assert _bits(back[name]) == _bits(expected), name


def test_writer_matches_the_reference_implementation_byte_for_byte(tmp_path):
    # The expected files are the test vectors of safetensors/src/tensor.rs (test_serialization,
    # test_serialization_forced_alignement, test_empty), spelled out here.
    data = struct.pack("<6f", 0, 1, 2, 3, 4, 5)
    cases = [
        ({"attn.0": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}, None,
         b'{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}', data),
        ({"attn0": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)}, None,
         b'{"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}}' + b" " * 7, data),
        ({}, None, b"{}      ", b""),
        ({}, {"framework": "pt"}, b'{"__metadata__":{"framework":"pt"}}     ', b""),
    ]  # fmt: skip
    for arrays, metadata, header, data in cases:
        path = write_safetensors(tmp_path / "t.safetensors", arrays, metadata)
        assert path.read_bytes() == struct.pack("<Q", len(header)) + header + data


def test_header_is_padded_so_the_data_starts_8_byte_aligned(tmp_path):
    for length in range(1, 12):
        a = np.arange(3, dtype=np.float64)
        path = write_safetensors(tmp_path / "t.safetensors", {"x" * length: a})
        content = path.read_bytes()
        (n,) = struct.unpack("<Q", content[:8])
        assert n % 8 == 0 and len(content) == 8 + n + 24
        assert content[8 : 8 + n].rstrip(b" ").endswith(b"}")
        assert content[8 + n :] == a.tobytes()


def test_big_endian_and_strided_arrays_are_written_little_endian_c_order(tmp_path):
    a = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian and not C-contiguous
    back = read_safetensors(write_safetensors(tmp_path / "t.safetensors", {"a": a}))[0]["a"]
    assert back.dtype == np.dtype("<f4") and back.shape == (3, 2)
    np.testing.assert_array_equal(back, a)


BAD_INPUT = {
    "arrays not a dict": ([("a", np.zeros(1))], None, TypeError, r"arrays must be a dict name -> np\.ndarray, got"),
    "name not a str": ({1: np.zeros(1)}, None, TypeError, r"array names must be str, got 1 \(int\)"),
    "empty name": ({"": np.zeros(1)}, None, ValueError, r"array name '' is not allowed"),
    "reserved name": ({"__metadata__": np.zeros(1)}, None, ValueError, r"array name '__metadata__' is not allowed"),
    "surrogate name": ({"a\ud800": np.zeros(1)}, None, ValueError, r"array name 'a\\ud800' cannot be encoded as UTF-8"),
    "not an array": ({"a": [1.0]}, None, TypeError, r"array 'a' must be a np\.ndarray, got list"),
    "complex": ({"a": np.zeros(1, complex)}, None, ValueError, r"array 'a' has dtype complex128.*allowed: float64"),
    "uint16": ({"a": np.zeros(1, np.uint16)}, None, ValueError, r"array 'a' has dtype uint16"),
    "object": ({"a": np.array([None])}, None, ValueError, r"array 'a' has dtype object"),
    "structured": ({"a": np.zeros(1, [("x", "f4")])}, None, ValueError, r"array 'a' has dtype"),
    "metadata not a dict": ({}, [("k", "v")], ValueError, r"metadata must be a dict str -> str or None"),
    "metadata value not str": ({}, {"step": 3}, ValueError, r"metadata must be a dict str -> str or None"),
    "metadata key not str": ({}, {3: "x"}, ValueError, r"metadata must be a dict str -> str or None"),
    "metadata surrogate": ({}, {"k": "\udfff"}, ValueError, r"metadata value of 'k' .* cannot be encoded as UTF-8"),
}


@pytest.mark.parametrize("arrays, metadata, error, message", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_writer_refuses_bad_input_and_writes_nothing(tmp_path, arrays, metadata, error, message):
    good = {"w": np.ones(2, np.float32)} | ({"z": np.zeros(1)} if isinstance(arrays, dict) else {})
    bad = {**good, **arrays} if isinstance(arrays, dict) else arrays
    with pytest.raises(error, match=message):
        write_safetensors(tmp_path / "new.safetensors", bad, metadata)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary file
    old = write_safetensors(tmp_path / "old.safetensors", good).read_bytes()
    with pytest.raises(error, match=message):
        write_safetensors(tmp_path / "old.safetensors", bad, metadata)
    assert [p.name for p in tmp_path.iterdir()] == ["old.safetensors"]
    assert (tmp_path / "old.safetensors").read_bytes() == old  # the old file untouched


# ----------------------------------------------------------------------------
# memory: reading maps the file, it does not copy it


def test_reading_a_large_file_does_not_copy_it(tmp_path):
    pytest.importorskip("resource")  # POSIX only
    size = 50 * 2**20
    path = write_safetensors(tmp_path / "big.safetensors", {"w": np.zeros(size // 4, np.float32)})
    # A fresh process, so the peak RSS before the read is its current RSS, not an earlier peak.
    code = textwrap.dedent(f"""
        import resource, sys
        from lora_np.safetensors import read_safetensors
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        arrays, _ = read_safetensors(sys.argv[1])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert arrays["w"].shape == ({size // 4},)
        print((after - before) * (1 if sys.platform == "darwin" else 1024))  # ru_maxrss: KiB on Linux
    """)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    grown = int(out.stdout)
    assert grown < 0.1 * size, f"reading a {size:,}-byte file grew the peak RSS by {grown:,} bytes"


# ----------------------------------------------------------------------------
# issue 21: two checks a planted bug got past


def test_every_integer_dtype_reads_with_its_sign_and_width(tmp_path):
    # values at the top and bottom of each range, packed with struct's own format letters
    cases = {  # dtype: (struct letter, numpy dtype, values)
        "U8": ("B", np.uint8, [255, 128, 0]), "I8": ("b", np.int8, [-128, 127, -1]),
        "U16": ("H", np.uint16, [65535, 40000, 1]), "I16": ("h", np.int16, [-32768, 32767, -1]),
        "U32": ("I", np.uint32, [2**32 - 1, 2**31, 1]), "I32": ("i", np.int32, [-(2**31), 2**31 - 1, -1]),
        "U64": ("Q", np.uint64, [2**64 - 1, 2**63, 1]), "I64": ("q", np.int64, [-(2**63), 2**63 - 1, -1]),
    }  # fmt: skip
    header, data = {}, b""
    for name, (letter, _, values) in cases.items():
        packed = struct.pack(f"<3{letter}", *values)
        header[name] = {"dtype": name, "shape": [3], "data_offsets": [len(data), len(data) + len(packed)]}
        data += packed
    arrays, _ = read_safetensors(_write(tmp_path, _bytes(header, data)))
    for name, (_, dtype, values) in cases.items():
        assert arrays[name].dtype == dtype, name
        assert arrays[name].tolist() == values, name


def test_the_header_length_is_checked_against_the_bytes_after_the_length_field(tmp_path):
    # a 10-byte file: the 8-byte length, then 2 bytes. A header of 2 bytes fits; one of 3 does
    # not, though 3 is less than the file's 10 bytes
    assert read_safetensors(_write(tmp_path, struct.pack("<Q", 2) + b"{}")) == ({}, {})
    path = _write(tmp_path, struct.pack("<Q", 3) + b"{}", "bad.safetensors")
    with pytest.raises(
        CheckpointError, match=r"bad\.safetensors: header length 3 bytes is more than the 2 bytes after"
    ):
        read_safetensors(path)
