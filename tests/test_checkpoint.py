"""Files on disk: round trips, every invalid file's error, random bytes, interrupted writes."""

import fcntl
import io
import json
import os
import re
import zipfile

import lora_np.checkpoint as ckpt
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lora_np.checkpoint import CheckpointError, load_adapters, load_params, save_adapters, save_params

from lora_np import LoraConfig, ModelConfig, cast, init_lora, init_params, merge, model_forward, unmerge

CFG = ModelConfig(vocab_size=7, context_length=6, d_model=8, n_heads=2, n_layers=1, d_mlp=12)
LORA = LoraConfig(r=2, alpha=3.0, targets=("W_q", "W_1"), rslora=True)
TOKENS = np.array([[1, 2, 3, 4, 5]])


@pytest.fixture
def saved(tmp_path):
    params = init_params(CFG, 0)
    adapters = init_lora(CFG, LORA, 1)
    for k in adapters:
        adapters[k] = adapters[k] + 0.1  # non-zero B, so the adapter changes the logits
    save_params(tmp_path / "base.npz", params)
    save_adapters(tmp_path / "adapter.npz", adapters, LORA, params)
    return tmp_path, params, adapters


def test_round_trip_gives_identical_logits(saved):
    d, params, adapters = saved
    p2 = load_params(d / "base.npz")
    a2, lora2 = load_adapters(d / "adapter.npz", p2)
    assert lora2 == LORA and lora2.scaling == LORA.scaling  # rsLoRA convention kept
    np.testing.assert_array_equal(
        model_forward(p2, TOKENS, a2, lora2)[0], model_forward(params, TOKENS, adapters, LORA)[0]
    )


def test_float32_round_trip(tmp_path):
    params = cast(init_params(CFG, 0), np.float32)
    save_params(tmp_path / "p.npz", params)
    p2 = load_params(tmp_path / "p.npz")
    assert p2["W_e"].dtype == np.float32
    np.testing.assert_array_equal(model_forward(p2, TOKENS)[0], model_forward(params, TOKENS)[0])


def _rewrite(path, mutate):
    """Load a file's raw entries, let `mutate` change them, write them back (bypassing the saver).

    The metadata's fingerprint is recomputed after the edit (a forgery, which anyone can make), so
    that the checks behind it are exercised; tests/test_hostile_files.py edits without it.
    """
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("__meta__").tobytes())
    mutate(arrays, meta)
    meta = ckpt.sign(meta)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_adapter_for_a_different_base(saved):
    d, params, _ = saved
    other = init_params(CFG, 1)
    with pytest.raises(CheckpointError, match=r"adapter\.npz: adapter was trained on base weights with fingerprint"):
        load_adapters(d / "adapter.npz", other)
    bigger = init_params(ModelConfig(7, 6, 8, 2, 2, 12), 0)
    with pytest.raises(CheckpointError, match=r"adapter is for ModelConfig\(.*n_layers=1.*base model is .*n_layers=2"):
        load_adapters(d / "adapter.npz", bigger)


def test_different_rank_or_shape(saved):
    d, _, _ = saved
    _rewrite(d / "adapter.npz", lambda a, m: m["lora_config"].update(r=3, scaling=3.0 / 3**0.5))
    with pytest.raises(CheckpointError, match=r"array blocks\.0\.W_q\.A has shape \(2, 8\), expected \(3, 8\)"):
        load_adapters(d / "adapter.npz")


def test_missing_or_extra_array(saved):
    d, _, _ = saved
    _rewrite(d / "base.npz", lambda a, m: a.pop("blocks.0.W_q"))
    with pytest.raises(CheckpointError, match=r"base\.npz: missing arrays \['blocks\.0\.W_q'\]"):
        load_params(d / "base.npz")
    _rewrite(d / "adapter.npz", lambda a, m: a.update({"blocks.0.W_k.A": np.zeros((2, 8))}))
    with pytest.raises(CheckpointError, match=r"unexpected arrays \['blocks\.0\.W_k\.A'\]"):
        load_adapters(d / "adapter.npz")


def test_unknown_format_version(saved):
    d, _, _ = saved
    _rewrite(d / "base.npz", lambda a, m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match=r"base\.npz: format_version 99 is not supported \(this is version 2\)"):
        load_params(d / "base.npz")


def test_wrong_kind(saved):
    d, _, _ = saved
    with pytest.raises(CheckpointError, match=r"holds 'adapters', expected 'params'"):
        load_params(d / "adapter.npz")


def test_tampered_weights_fail_the_fingerprint(saved):
    d, _, _ = saved
    _rewrite(d / "base.npz", lambda a, m: a["W_u"].__setitem__((0, 0), 1.0))
    with pytest.raises(CheckpointError, match=r"the weights do not match the fingerprint"):
        load_params(d / "base.npz")


def test_bad_config_or_values_in_the_file(saved):
    d, _, _ = saved
    _rewrite(d / "adapter.npz", lambda a, m: m["lora_config"].update(targets=["W_x"]))
    with pytest.raises(CheckpointError, match=r"invalid LoraConfig in metadata: unknown LoRA target 'W_x'"):
        load_adapters(d / "adapter.npz")
    _rewrite(d / "base.npz", lambda a, m: a["W_e"].__setitem__((0, 0), np.nan))
    with pytest.raises(CheckpointError, match=r"array W_e holds non-finite values"):
        load_params(d / "base.npz")


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, __meta__=np.array([{"kind": "params"}], dtype=object))
    with pytest.raises(CheckpointError, match=r"evil\.npz: .*object"):
        load_params(path)


def test_truncated_and_corrupted_files(saved):
    d, _, _ = saved
    raw = (d / "base.npz").read_bytes()
    for i, data in enumerate((raw[: len(raw) // 2], raw[:-30], raw[:100] + b"\x00" * 50 + raw[150:], b"")):
        path = d / f"broken{i}.npz"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"broken{i}\.npz"):
            load_params(path)
    with pytest.raises(CheckpointError, match=r"nothere\.npz: no such file"):
        load_params(d / "nothere.npz")


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_and_truncated_bytes_give_only_the_documented_error(saved, data):
    d, _, _ = saved
    raw = (d / "adapter.npz").read_bytes()
    choice = data.draw(st.sampled_from(["random", "truncated", "flipped"]))
    if choice == "random":
        blob = data.draw(st.binary(max_size=400))
    elif choice == "truncated":
        blob = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        blob = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1 :]
    path = d / "fuzz.npz"
    path.write_bytes(blob)
    try:
        load_adapters(path)
    except CheckpointError:
        pass  # the documented error; anything else fails the test
    # a flipped byte may land where it changes nothing that is checked (e.g. a zip timestamp)


def test_interrupted_write_leaves_the_previous_file_intact(saved, monkeypatch):
    d, params, _ = saved
    before = (d / "base.npz").read_bytes()

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_params(d / "base.npz", init_params(CFG, 5))
    assert (d / "base.npz").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["adapter.npz", "base.npz"]  # no temporary left behind


def test_bad_paths_raise_before_writing(tmp_path):
    params = init_params(CFG, 0)
    with pytest.raises(ValueError, match=r"path must end in \.npz, got"):
        save_params(tmp_path / "base.pt", params)
    with pytest.raises(ValueError, match=r"path's folder .* does not exist"):
        save_params(tmp_path / "no" / "base.npz", params)
    assert list(tmp_path.iterdir()) == []


def test_the_file_is_a_plain_zip_of_npy_arrays(saved):
    """What a student finds when they unzip it: one .npy per array and the JSON metadata."""
    d, params, _ = saved
    names = zipfile.ZipFile(d / "base.npz").namelist()
    assert sorted(names) == sorted([f"{k}.npy" for k in params] + ["__meta__.npy"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["model_config", "lora_config", "format_version", "kind"]),
    value=json_values,
    key=st.sampled_from(["r", "alpha", "targets", "dropout", "init", "rslora", "scaling", "d_model", "n_layers"]),
)
def test_well_formed_archives_with_hostile_metadata_give_only_the_documented_error(saved, field, value, key):
    """A valid zip of valid .npy files whose JSON says anything at all: CheckpointError or a clean load."""
    d, _, _ = saved

    def mutate(arrays, meta):
        if isinstance(meta.get(field), dict):
            meta[field][key] = value  # one field of a config
        else:
            meta[field] = value

    _rewrite(d / "adapter.npz", mutate)
    try:
        load_adapters(d / "adapter.npz")
    except CheckpointError:
        pass


def test_hostile_array_headers_and_members(saved):
    d, _, _ = saved
    # an array whose header claims 10^14 numbers: refused from the header, nothing allocated
    path = d / "huge.npz"
    with zipfile.ZipFile(d / "adapter.npz") as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "blocks.0.W_q.A.npy":
                header = {"descr": "<f8", "fortran_order": False, "shape": (10**7, 10**7)}
                buf = io.BytesIO()
                np.lib.format.write_array_header_1_0(buf, header)
                data = buf.getvalue() + b"\0" * 64  # magic and header, then far too little data
            dst.writestr(name, data)
    with pytest.raises(CheckpointError, match=r"array blocks\.0\.W_q\.A has shape \(10000000, 10000000\)"):
        load_adapters(path)
    # integer arrays, and a member that is not an .npy array
    _rewrite(d / "base.npz", lambda a, m: a.update({"W_u": a["W_u"].astype(np.int64)}))
    with pytest.raises(CheckpointError, match=r"array W_u has dtype int64; allowed: float32, float64"):
        load_params(d / "base.npz")
    with zipfile.ZipFile(d / "adapter.npz", "a") as z:
        z.writestr("notes.txt", b"hello")
    with pytest.raises(CheckpointError, match=r"every member of a lora_np archive is an \.npy array"):
        load_adapters(d / "adapter.npz")


def test_a_config_claiming_a_billion_layers_is_refused_at_once(saved):
    d, _, _ = saved
    _rewrite(d / "base.npz", lambda a, m: m["model_config"].update(n_layers=10**9))
    with pytest.raises(CheckpointError, match=r"its config needs 16,000,000,005 arrays; this format allows 100,000"):
        load_params(d / "base.npz")


def test_stored_scaling_must_match_the_config(saved):
    d, _, _ = saved
    _rewrite(d / "adapter.npz", lambda a, m: m["lora_config"].update(scaling=1.5))
    with pytest.raises(CheckpointError, match=r"stored scaling 1\.5 does not match"):
        load_adapters(d / "adapter.npz")


def test_adapters_follow_the_base_dtype_on_load(saved):
    """A float32 base and its exact float64 copy share a fingerprint; the adapters follow the base."""
    d, _, adapters = saved
    p32 = cast(init_params(CFG, 0), np.float32)
    a32 = cast(adapters, np.float32)
    save_adapters(d / "a32.npz", a32, LORA, p32)
    loaded, _ = load_adapters(d / "a32.npz", cast(p32, np.float64))
    assert all(v.dtype == np.float64 for v in loaded.values())
    np.testing.assert_array_equal(loaded["blocks.0.W_q.A"], a32["blocks.0.W_q.A"].astype(np.float64))


def test_savers_refuse_what_the_loaders_would_refuse_before_writing(tmp_path):
    params = init_params(CFG, 0)
    adapters = init_lora(CFG, LORA, 0)
    bad = params.copy()
    bad["W_e"] = np.full_like(params["W_e"], np.nan)
    with pytest.raises(ValueError, match=r"params hold non-finite values in \['W_e'\]"):
        save_params(tmp_path / "p.npz", bad)
    wrong = dict(adapters)
    wrong["blocks.0.W_q.A"] = np.zeros((3, 8))
    with pytest.raises(ValueError, match=r"adapter blocks\.0\.W_q\.A must have shape \(2, 8\)"):
        save_adapters(tmp_path / "a.npz", wrong, LORA, params)
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_ordinary_permissions(saved):
    import os

    d, _, _ = saved
    umask = os.umask(0)
    os.umask(umask)
    assert (d / "base.npz").stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------
# saving: temporary files, interrupted saves, long names, permissions (issue 12, item 4)


def _temp_names(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _capture_temp_name(monkeypatch, target):
    """The name of the temporary file a save of `target` writes to."""
    seen, before = [], set(os.listdir(target.parent))
    real = ckpt.np.savez

    def spy(f, **arrays):
        seen.extend(set(os.listdir(target.parent)) - before)  # the file being written
        real(f, **arrays)

    monkeypatch.setattr(ckpt.np, "savez", spy)
    save_params(target, init_params(CFG, 0))
    monkeypatch.setattr(ckpt.np, "savez", real)
    assert len(seen) == 1, seen
    return seen[0]


def test_the_temporary_name_is_short_and_names_its_target(tmp_path, monkeypatch):
    target = tmp_path / ("b" * 200 + ".npz")
    name = _capture_temp_name(monkeypatch, target)
    assert name.startswith("." + "b" * 40 + ".") and name.endswith(".tmp") and len(name) <= 80, name
    assert _capture_temp_name(monkeypatch, tmp_path / "base.npz").startswith(".base.npz.")


def test_a_250_byte_file_name_can_be_saved(tmp_path):
    path = tmp_path / ("x" * 246 + ".npz")  # 250 bytes, legal under NAME_MAX = 255
    save_params(path, init_params(CFG, 0))
    load_params(path)
    assert _temp_names(tmp_path) == []


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, MemoryError])
def test_an_interrupt_during_the_write_removes_the_temporary_file(saved, monkeypatch, interrupt):
    d, _, _ = saved
    before = (d / "base.npz").read_bytes()

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise interrupt("stop")

    monkeypatch.setattr(ckpt.np, "savez", crash)
    with pytest.raises(interrupt):
        save_params(d / "base.npz", init_params(CFG, 5))
    assert (d / "base.npz").read_bytes() == before
    assert _temp_names(d) == []


def test_a_killed_saves_temporary_is_removed_at_once_and_a_live_ones_kept(tmp_path, monkeypatch):
    """A save killed by SIGKILL leaves its temporary file; the next save of the same target removes
    it at once, however young, because no live process holds its flock. A temporary file whose flock
    is held is a save in progress and stays; another target's temporaries and look-alikes too."""
    name = _capture_temp_name(monkeypatch, tmp_path / "base.npz")
    other = _capture_temp_name(monkeypatch, tmp_path / "other.npz")
    killed = tmp_path / (name[:-12] + "killed01.tmp")  # written a moment ago: no hour to wait
    running = tmp_path / (name[:-12] + "running1.tmp")
    killed_other = tmp_path / (other[:-12] + "killed02.tmp")
    lookalike = tmp_path / ".base.npz.tmp"  # not of lora_np's pattern: never ours to remove
    for p in (killed, running, killed_other, lookalike):
        p.write_bytes(b"half a save")
    held = os.open(running, os.O_RDONLY)  # another open file: flock sees it as another writer
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        save_params(tmp_path / "base.npz", init_params(CFG, 0))
    finally:
        os.close(held)
    assert _temp_names(tmp_path) == sorted([running.name, killed_other.name, lookalike.name])


def test_write_atomic_onto_a_folder_is_a_value_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        ckpt.write_atomic(tmp_path / "d", lambda f: f.write(b"x"))
    assert _temp_names(tmp_path) == []


def test_resaving_keeps_the_permission_bits_of_the_existing_file(saved):
    d, params, _ = saved
    os.chmod(d / "base.npz", 0o600)
    save_params(d / "base.npz", params)
    assert (d / "base.npz").stat().st_mode & 0o777 == 0o600
    os.chmod(d / "base.npz", 0o640)
    save_params(d / "base.npz", params)
    assert (d / "base.npz").stat().st_mode & 0o777 == 0o640


def test_a_folder_that_refuses_new_files_is_named_with_the_target(tmp_path, monkeypatch):
    """As root, permissions are not enforced; mkstemp's PermissionError is simulated."""

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".base.npz.abcdefgh.tmp"))

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", refuse)
    target = tmp_path / "base.npz"
    with pytest.raises(
        PermissionError,
        match=rf"cannot save {re.escape(str(target))!s}: no new file can be created "
        rf"in its folder {re.escape(str(tmp_path))}.*Permission denied",
    ):
        save_params(target, init_params(CFG, 0))


# ----------------------------------------------------------------------------
# a float32 cast of the base the adapter was trained on (issue 12, item 5)


def test_adapters_trained_in_float64_load_on_the_float32_cast_of_their_base(saved):
    d, params, adapters = saved
    p32 = cast(params, np.float32)
    loaded, lora = load_adapters(d / "adapter.npz", p32)
    assert all(v.dtype == np.float32 for v in loaded.values())
    np.testing.assert_array_equal(loaded["blocks.0.W_q.B"], adapters["blocks.0.W_q.B"].astype(np.float32))
    with pytest.raises(CheckpointError, match=r"it belongs to a different base model"):
        load_adapters(d / "adapter.npz", cast(init_params(CFG, 1), np.float32))


def test_adapters_trained_on_a_float32_cast_load_on_its_float64_original(saved):
    d, params, adapters = saved
    p32 = cast(params, np.float32)  # float32(x) != x: not the same values as params
    assert not np.array_equal(p32["W_e"].astype(np.float64), params["W_e"])
    save_adapters(d / "a32.npz", cast(adapters, np.float32), LORA, p32)
    loaded, _ = load_adapters(d / "a32.npz", params)
    assert all(v.dtype == np.float64 for v in loaded.values())
    with pytest.raises(CheckpointError, match=r"it belongs to a different base model"):
        load_adapters(d / "a32.npz", init_params(CFG, 1))
    nudged = params.copy()
    nudged["W_e"] = params["W_e"] + 1e-3  # more than float32 rounding: another base
    with pytest.raises(CheckpointError, match=r"it belongs to a different base model"):
        load_adapters(d / "a32.npz", nudged)


# ----------------------------------------------------------------------------
# merged params on disk (issue 12, item 6): the record of what was merged is saved with them


def test_merged_params_keep_their_record_through_a_save(saved):
    d, params, adapters = saved
    merged = merge(params, adapters, LORA)
    save_params(d / "merged.npz", merged)
    loaded = load_params(d / "merged.npz")
    assert loaded.merged_adapters == merged.merged_adapters and len(loaded.merged_adapters) == 1
    with pytest.raises(ValueError, match=r"already merged"):
        merge(loaded, adapters, LORA)
    back = unmerge(loaded, adapters, LORA)
    np.testing.assert_allclose(back["blocks.0.W_q"], params["blocks.0.W_q"], rtol=0, atol=1e-15)
    assert load_params(d / "base.npz").merged_adapters == ()


# ----------------------------------------------------------------------------
# the fingerprint itself (issue 21): what it must and must not depend on, each checked on
# arrays made here, not on another fingerprint computed the same way


def test_the_fingerprint_does_not_depend_on_dict_order(saved):
    d, params, adapters = saved
    backwards = dict(reversed(list(adapters.items())))
    assert list(backwards) != list(adapters)
    assert ckpt.fingerprint(backwards) == ckpt.fingerprint(adapters)
    save_adapters(d / "backwards.npz", backwards, LORA, params)  # the loader reads the arrays in its own order
    loaded, _ = load_adapters(d / "backwards.npz", params)
    assert all(np.array_equal(loaded[k], adapters[k]) for k in adapters)


def test_the_fingerprint_hashes_names_and_shapes_not_only_the_values():
    x = np.arange(6.0)
    same_bytes = [
        {"a": x},
        {"b": x},  # another name
        {"a": x.reshape(2, 3)},  # another shape
        {"a": x.reshape(3, 2)},
        {"a": x[:2], "b": x[2:]},  # the same values cut elsewhere
        {"a": x[:4], "b": x[4:]},
    ]
    assert len({ckpt.fingerprint(p) for p in same_bytes}) == len(same_bytes)


def test_the_fingerprint_sees_a_change_below_float32_precision_and_the_float32_one_does_not():
    rng = np.random.default_rng(0)
    w = {"W": rng.normal(size=(3, 4))}  # float64
    nudged = {"W": w["W"] + 1e-12 * (np.arange(12).reshape(3, 4) == 5)}  # one weight, far below float32's 6e-8
    assert not np.array_equal(nudged["W"], w["W"]) and np.array_equal(nudged["W"].astype(np.float32),
                                                                      w["W"].astype(np.float32))  # fmt: skip
    assert ckpt.fingerprint(nudged) != ckpt.fingerprint(w)  # float64 values, hashed as they are
    assert ckpt.fingerprint(nudged, round_to_float32=True) == ckpt.fingerprint(w, round_to_float32=True)
    # a float32 array and its exact float64 copy share both; a float64 array and its float32 cast
    # share only the rounded one (the cast is not the same values)
    w32 = {"W": w["W"].astype(np.float32)}
    assert ckpt.fingerprint(w32) == ckpt.fingerprint({"W": w32["W"].astype(np.float64)}) != ckpt.fingerprint(w)
    assert ckpt.fingerprint(w32, round_to_float32=True) == ckpt.fingerprint(w, round_to_float32=True)
    assert ckpt.fingerprint({"W": w["W"] + 1e-3}, round_to_float32=True) != ckpt.fingerprint(w, round_to_float32=True)


def test_a_float64_weight_nudged_by_1e_12_does_not_load(saved):
    d, _, _ = saved
    _rewrite(d / "base.npz", lambda a, m: a["W_u"].__setitem__((0, 0), a["W_u"][0, 0] + 1e-12))
    with pytest.raises(CheckpointError, match=r"the weights do not match the fingerprint"):
        load_params(d / "base.npz")


def test_a_float64_file_holding_one_float32_array_is_refused(saved):
    d, _, _ = saved

    def one_float32(arrays, meta):  # a forgery consistent in everything but the mixed dtypes
        arrays["W_u"] = arrays["W_u"].astype(np.float32)
        meta["fingerprint"] = ckpt.fingerprint(arrays)

    _rewrite(d / "base.npz", one_float32)
    with pytest.raises(CheckpointError, match=r"base\.npz: arrays must all be float32 or all float64, got "
                       r"\['float32', 'float64'\]"):  # fmt: skip
        load_params(d / "base.npz")
