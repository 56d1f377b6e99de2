"""PEFT import refuses what it cannot read as plain LoRA, field by field and tensor by tensor.

(The round trips and the logits PEFT would give are in test_gpt2.py.) Each adapter here is a
small folder written by the test: the adapter_config.json that PEFT 0.21.2 writes for
LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
task_type="CAUSAL_LM") on a 2-layer GPT-2 of width 16, copied below from a real
save_pretrained, then one field or one tensor changed.
"""

import json

import numpy as np
import pytest
from lora_np.checkpoint import CheckpointError
from lora_np.peft import KEY, import_peft
from lora_np.safetensors import write_safetensors

from lora_np import ModelConfig

D, L, R = 16, 2, 4
CFG = ModelConfig(vocab_size=50, context_length=32, d_model=D, n_heads=2, n_layers=L, d_mlp=4 * D)

# adapter_config.json as PEFT 0.21.2's save_pretrained wrote it (keys sorted, as it writes them)
PEFT_CONFIG = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": True, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 4,
    "rank_pattern": {}, "revision": None, "target_modules": ["c_attn"], "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}  # fmt: skip


def arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    out = {}
    for l in range(L):
        out[KEY.format(l=l, f="A")] = rng.normal(size=(R, D)).astype(dtype)  # (r', D)
        out[KEY.format(l=l, f="B")] = rng.normal(size=(3 * D, R)).astype(dtype)  # (3D, r')
    return out


def adapter(tmp_path, weights=None, **changes):
    """A PEFT adapter folder: PEFT_CONFIG with `changes` (None is written as JSON null), without
    the fields listed in `drop`, and `weights` (default: arrays())."""
    drop = changes.pop("drop", ())
    config = {k: v for k, v in {**PEFT_CONFIG, **changes}.items() if k not in drop}
    path = tmp_path / "adapter"
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))  # NaN is written as the literal NaN
    write_safetensors(path / "adapter_model.safetensors", arrays() if weights is None else weights)
    return path


def test_what_peft_writes_is_imported(tmp_path):
    adapters, lora = import_peft(adapter(tmp_path), CFG)
    assert (lora.r, lora.alpha, lora.rslora, lora.scaling) == (4, 8.0, False, 2.0)
    assert all(a.dtype == np.float32 for a in adapters.values())
    # every field with a default in PEFT's LoraConfig may be left out (target_modules's default
    # depends on the model: PEFT writes what it chose)
    needed = ("r", "lora_alpha", "target_modules")
    _, lora = import_peft(adapter(tmp_path, drop=[k for k in PEFT_CONFIG if k not in needed]), CFG)
    assert (lora.r, lora.alpha, lora.rslora, lora.dropout) == (4, 8.0, False, 0.0)


@pytest.mark.parametrize("rslora, scaling", [(True, 8 / 4**0.5), (False, 8 / 4)])
def test_use_rslora_true_or_false_sets_the_scaling(tmp_path, rslora, scaling):
    assert import_peft(adapter(tmp_path, use_rslora=rslora), CFG)[1].scaling == scaling


# field, value written, what the message must say about it
BAD_FIELDS = [
    # "false" is a non-empty string: read as true, the scale was α/√r instead of α/r, silently
    ("use_rslora", "false", r'use_rslora = "false" \(a string\); allowed: true or false'),
    ("use_rslora", 0, r"use_rslora = 0 \(an integer\); allowed: true or false"),
    ("use_rslora", None, r"use_rslora = null \(null\); allowed: true or false"),
    ("lora_alpha", True, r"lora_alpha = true \(a boolean\); allowed: a finite JSON number > 0"),  # was alpha = 1.0
    ("lora_alpha", "8", r'lora_alpha = "8" \(a string\)'),
    ("lora_alpha", float("nan"), r"lora_alpha = NaN \(a number\)"),
    ("lora_alpha", 10**400, r"lora_alpha = 1000.* \(an integer\); allowed: a finite JSON number > 0"),
    ("r", True, r"r = true \(a boolean\); allowed: a JSON integer >= 1"),  # was "expected (True, 16)"
    ("r", 4.0, r"r = 4.0 \(a number\); allowed: a JSON integer >= 1"),
    ("r", 0, r"r = 0 \(an integer\); allowed: a JSON integer >= 1"),
    ("lora_dropout", "0.1", r'lora_dropout = "0.1" \(a string\); allowed: a JSON number in \[0, 1\)'),
    ("lora_dropout", True, r"lora_dropout = true \(a boolean\)"),
    ("fan_in_fan_out", "yes", r'fan_in_fan_out = "yes" \(a string\); allowed: true or false'),
    ("use_dora", 0, r"use_dora = 0 \(an integer\); allowed: false"),  # 0 == False in Python
    ("bias", "all", r'bias = "all" \(a string\); allowed: "none"'),
    ("peft_type", "LOHA", r'peft_type = "LOHA" \(a string\); allowed: "LORA"'),
    ("modules_to_save", ["lm_head"], r'modules_to_save = \["lm_head"\] \(an array\); allowed: null or \[\]; PEFT'),
    ("lora_bias", True, r"lora_bias = true \(a boolean\); allowed: false"),
    ("rank_pattern", {"c_attn": 8}, r"rank_pattern = .*; allowed: \{\} or null"),
    ("layer_replication", [[0, 2], [1, 2]], r"layer_replication = .*; allowed: null"),
    ("trainable_token_indices", [3], r"trainable_token_indices = \[3\] \(an array\); allowed: null"),
    ("alora_invocation_tokens", [3], r"alora_invocation_tokens = \[3\]"),
    ("use_qalora", True, r"use_qalora = true"),
    ("velora_config", {"rank": 2}, r"velora_config = .*; allowed: null; a LoRA variant"),
]


@pytest.mark.parametrize(
    "field, value, message", BAD_FIELDS, ids=[f"{f}={json.dumps(v)[:12]}" for f, v, _ in BAD_FIELDS]
)
def test_a_field_of_the_wrong_type_or_value_is_refused_naming_it(tmp_path, field, value, message):
    path = adapter(tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=message) as e:
        import_peft(path, CFG)
    assert str(path / "adapter_config.json") in str(e.value)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_an_initialization_that_changed_the_base_weights_is_refused(tmp_path, init):
    with pytest.raises(CheckpointError, match=rf'init_lora_weights = "{init}" \(a string\); allowed: true, false, '
                       r'"gaussian", "orthogonal", "eva" .*changed the base weights.*path_initial_model'):  # fmt: skip
        import_peft(adapter(tmp_path, init_lora_weights=init), CFG)


@pytest.mark.parametrize("init", ["mica", "bogus", 1, None])
def test_an_initialization_lora_np_does_not_know_is_refused(tmp_path, init):
    with pytest.raises(CheckpointError, match=r"init_lora_weights = .*; allowed: true, false, "):
        import_peft(adapter(tmp_path, init_lora_weights=init), CFG)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "eva"])
def test_an_initialization_of_a_and_b_alone_is_imported(tmp_path, init):
    assert import_peft(adapter(tmp_path, init_lora_weights=init), CFG)[1].r == R


@pytest.mark.parametrize("field, value", [("modules_to_save", []), ("rank_pattern", None), ("target_parameters", [])])
def test_an_empty_list_or_null_says_nothing_and_is_imported(tmp_path, field, value):
    assert import_peft(adapter(tmp_path, **{field: value}), CFG)[1].r == R


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.bool_])
def test_integer_tensors_are_refused_not_returned_as_integers(tmp_path, dtype):
    path = adapter(tmp_path, weights={k: (10 * v).astype(dtype) for k, v in arrays().items()})
    name = KEY.format(l=0, f="A")
    with pytest.raises(CheckpointError, match=rf"adapter_model.safetensors: {name} is stored as {np.dtype(dtype)}; "
                       r"allowed: floating point \(F16, BF16, F32 or F64\)"):  # fmt: skip
        import_peft(path, CFG)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_tensors_are_imported_f16_widened(tmp_path, dtype):
    expected = np.float32 if dtype == np.float16 else dtype  # NumPy computes in float16 slowly and imprecisely
    adapters, _ = import_peft(adapter(tmp_path, weights=arrays(dtype)), CFG)
    assert {a.dtype for a in adapters.values()} == {np.dtype(expected)}


@pytest.mark.parametrize("f, l, value", [("A", 1, np.nan), ("B", 0, np.inf), ("B", 1, -np.inf)])
def test_nan_or_inf_in_a_tensor_is_refused_naming_the_tensor(tmp_path, f, l, value):
    weights = arrays()
    name = KEY.format(l=l, f=f)
    weights[name][2, 3] = value
    with pytest.raises(CheckpointError, match=rf"{name} has 1 of its {weights[name].size} values NaN or inf, the "
                       rf"first {value} at \(2, 3\); allowed: finite values"):  # fmt: skip
        import_peft(adapter(tmp_path, weights=weights), CFG)


# PEFT reads a string target_modules as a regular expression, matched with re.fullmatch against each module's
# whole name (peft/tuners/tuners_utils.py, check_target_module_exists); a list, as names or name suffixes.
@pytest.mark.parametrize("targets, imported", [
    (["c_attn"], True),
    (r".*\.c_attn", True),
    (r"transformer\.h\.\d+\.attn\.c_attn", True),
    ("c_attn", False),  # matches no module's whole name: PEFT would have adapted nothing
    (r".*c_.*", False),  # c_proj and c_fc too
    ("[", False),  # not a regular expression
    (["c_attn", "c_proj"], False),
])  # fmt: skip
def test_target_modules_as_peft_reads_them(tmp_path, targets, imported):
    path = adapter(tmp_path, target_modules=targets)
    if imported:
        assert import_peft(path, CFG)[1].r == R
    else:
        with pytest.raises(CheckpointError, match=r"target_modules = .*; allowed: \[\"c_attn\"\], or a regular"):
            import_peft(path, CFG)
