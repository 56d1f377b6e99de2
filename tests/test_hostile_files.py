"""Hostile files, one row each: how the file was damaged or edited, and the CheckpointError it must give.

Every row starts from a valid pair of files (a base and an adapter trained on it), changes one
thing the way a careless edit, a bad disk or a hostile sender would, and loads it. "edited"
rows change the JSON metadata and leave its fingerprint as it was (what a hand edit does);
"forged" rows also recompute the fingerprint, which anyone can (it guards against accidents,
not against forgery), so that the checks behind it are still exercised.
"""

import json
import zipfile

import lora_np.checkpoint as ckpt
import numpy as np
import pytest
from lora_np.checkpoint import CheckpointError, load_adapters, load_params, save_adapters, save_params

from lora_np import LoraConfig, ModelConfig, init_lora, init_params

CFG = ModelConfig(vocab_size=7, context_length=6, d_model=8, n_heads=2, n_layers=1, d_mlp=12)
LORA = LoraConfig(r=2, alpha=3.0, targets=("W_q", "W_1"), rslora=True)


def rewrite(path, mutate, sign=False, compressed=False):
    """Load a file's raw entries, let `mutate(arrays, meta)` change them, write them back with
    np.savez (bypassing the saver); `sign` recomputes the metadata's fingerprint after the edit."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("__meta__").tobytes())
    mutate(arrays, meta)
    if sign:
        meta = ckpt.sign(meta)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)


def edit_meta(**changes):
    """A mutation that sets meta[section][key] = value for each section__key=value (meta[key] for key=value)."""

    def mutate(arrays, meta):
        for dotted, value in changes.items():
            *section, key = dotted.split("__")
            (meta[section[0]] if section else meta)[key] = value

    return mutate


def set_value(name, index, value):
    return lambda arrays, meta: arrays[name].__setitem__(index, value)


def unchanged(arrays, meta):
    pass


# (id, file, mutation, rewrite options, expected message)
CASES = [
    # the metadata is covered by its fingerprint: edits that change the math are refused
    (
        "edited n_heads",
        "base",
        edit_meta(model_config__n_heads=1),
        {},
        r"base\.npz: the metadata do not match the fingerprint stored with them",
    ),
    (
        "edited alpha",
        "adapter",
        edit_meta(lora_config__alpha=30.0),
        {},
        r"adapter\.npz: the metadata do not match the fingerprint stored with them",
    ),
    (
        "edited alpha and scaling",
        "adapter",
        edit_meta(lora_config__alpha=30.0, lora_config__scaling=30 / 2**0.5),
        {},
        r"the metadata do not match the fingerprint",
    ),
    (
        "edited rslora",
        "adapter",
        edit_meta(lora_config__rslora=False),
        {},
        r"the metadata do not match the fingerprint",
    ),
    (
        "edited base fingerprint",
        "adapter",
        edit_meta(base_fingerprint="0" * 64),
        {},
        r"the metadata do not match the fingerprint",
    ),
    (
        "edited merged_adapters",
        "base",
        edit_meta(merged_adapters=["0" * 64]),
        {},
        r"the metadata do not match the fingerprint",
    ),
    (
        "fingerprint removed",
        "base",
        lambda a, m: m.pop("meta_fingerprint"),
        {},
        r"base\.npz: the metadata do not match the fingerprint stored with them \(stored None",
    ),
    # format versions
    (
        "version 1 file",
        "base",
        edit_meta(format_version=1),
        {},
        r"base\.npz: format_version 1 is not supported \(this is version 2\): version 1 did not fingerprint its "
        r"metadata; load it with lora_np 1\.x",
    ),
    (
        "unknown version",
        "adapter",
        edit_meta(format_version=99),
        {},
        r"adapter\.npz: format_version 99 is not supported \(this is version 2\)",
    ),
    # compressed members: refused before any data is read
    (
        "compressed (np.savez_compressed)",
        "base",
        unchanged,
        {"compressed": True},
        r"base\.npz: member W_e\.npy is compressed \(deflated\); lora_np files store their arrays uncompressed",
    ),
    (
        "compressed and signed",
        "adapter",
        unchanged,
        {"compressed": True, "sign": True},
        r"adapter\.npz: member .*\.npy is compressed",
    ),
    # the arrays are covered by their own fingerprint
    (
        "tampered weight",
        "base",
        set_value("W_u", (0, 0), 1.0),
        {},
        r"base\.npz: the weights do not match the fingerprint stored with them",
    ),
    (
        "tampered adapter",
        "adapter",
        set_value("blocks.0.W_q.B", (0, 0), 5.0),
        {},
        r"adapter\.npz: the adapter arrays do not match the fingerprint stored with them",
    ),
    ("non-finite weight", "base", set_value("W_e", (0, 0), np.nan), {}, r"array W_e holds non-finite values"),
    (
        "integer weights",
        "base",
        lambda a, m: a.update(W_u=a["W_u"].astype(np.int64)),
        {},
        r"array W_u has dtype int64; allowed: float32, float64",
    ),
    ("missing array", "base", lambda a, m: a.pop("blocks.0.W_q"), {}, r"missing arrays \['blocks\.0\.W_q'\]"),
    (
        "extra array",
        "adapter",
        lambda a, m: a.update({"blocks.0.W_k.A": np.zeros((2, 8))}),
        {},
        r"unexpected arrays \['blocks\.0\.W_k\.A'\]",
    ),
    # forged metadata (fingerprint recomputed): the checks behind the fingerprint still hold
    (
        "forged rank",
        "adapter",
        edit_meta(lora_config__r=3, lora_config__scaling=3.0 / 3**0.5),
        {"sign": True},
        r"array blocks\.0\.W_q\.A has shape \(2, 8\), expected \(3, 8\)",
    ),
    (
        "forged scaling",
        "adapter",
        edit_meta(lora_config__scaling=1.5),
        {"sign": True},
        r"stored scaling 1\.5 does not match",
    ),
    (
        "forged target",
        "adapter",
        edit_meta(lora_config__targets=["W_x"]),
        {"sign": True},
        r"invalid LoraConfig in metadata: unknown LoRA target 'W_x'",
    ),
    (
        "forged billion layers",
        "base",
        edit_meta(model_config__n_layers=10**9),
        {"sign": True},
        r"its config needs 16,000,000,005 arrays; this format allows 100,000",
    ),
    ("forged kind", "base", edit_meta(kind="adapters"), {"sign": True}, r"holds 'adapters', expected 'params'"),
]


@pytest.fixture
def files(tmp_path):
    params = init_params(CFG, 0)
    adapters = {k: v + 0.1 for k, v in init_lora(CFG, LORA, 1).items()}  # non-zero B
    save_params(tmp_path / "base.npz", params)
    save_adapters(tmp_path / "adapter.npz", adapters, LORA, params)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_file_gives_its_checkpoint_error(files, case):
    _, which, mutate, options, message = case
    path = files / f"{which}.npz"
    rewrite(path, mutate, **options)
    with pytest.raises(CheckpointError, match=message):
        load_params(path) if which == "base" else load_adapters(path)


def test_every_row_starts_from_files_that_load(files):
    """The table's baseline: rewritten through np.savez without a change, both files load."""
    for which in ("base", "adapter"):
        rewrite(files / f"{which}.npz", unchanged)
    load_params(files / "base.npz")
    load_adapters(files / "adapter.npz", load_params(files / "base.npz"))


def test_a_compressed_member_is_refused_before_any_data_is_read(files, monkeypatch):
    rewrite(files / "base.npz", unchanged, compressed=True)
    with zipfile.ZipFile(files / "base.npz") as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())

    def no_reading(*args, **kwargs):
        raise AssertionError("a member was opened for reading")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_reading)
    with pytest.raises(CheckpointError, match=r"is compressed \(deflated\)"):
        load_params(files / "base.npz")


def test_write_safetensors_onto_a_folder_raises_the_documented_value_error(tmp_path):
    """Issue 21, item 8: a folder where the file goes is a bad path, a ValueError naming it, and nothing is written."""
    from lora_np.io.safetensors import write_safetensors

    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(ValueError, match="model.safetensors' is a folder"):
        write_safetensors(tmp_path / "model.safetensors", {"a": np.zeros(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
