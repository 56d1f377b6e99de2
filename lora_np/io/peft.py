"""lora_np's adapters in PEFT's format and back, for GPT-2 (Hugging Face's PEFT library).

PEFT saves a LoRA adapter as two files in a folder:

    adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r', "lora_alpha": α',
                                "target_modules": ["c_attn"], "fan_in_fan_out": true, "use_rslora": ..., ...}
    adapter_model.safetensors  base_model.model.transformer.h.{l}.attn.c_attn.lora_A.weight   (r', D)
                               base_model.model.transformer.h.{l}.attn.c_attn.lora_B.weight   (3D, r')

PEFT's lora_A and lora_B are linear layers, weights (out, in) like lora_np's, so its update of
a module is ΔW = (α'/r')·B'·A' (α'/√r' with use_rslora) in (out, in) orientation;
fan_in_fan_out = true says that GPT-2's Conv1D stores its weight as (in, out), so PEFT adds
ΔWᵀ to it. The paper's method, the paper's orientation: only the packaging differs.

The packaging differs because GPT-2 fuses q, k and v into one projection, c_attn (D -> 3D).
Adapters of rank r on, say, W_q and W_v become ONE adapter of rank r' = 2r on c_attn:

    A' = [A_q; A_v]                          (2r, D)    the A's stacked
    B' = [[B_q, 0], [0, 0], [0, B_v]]        (3D, 2r)   each B in its own output block and column block

so that B'·A' = [B_q·A_q; 0; B_v·A_v]: ΔW_q, no change to W_k, ΔW_v, stacked as c_attn stacks
its outputs. "q and v only" becomes a block structure on the fused projection; PEFT cannot say
"rows 0:D and 2D:3D of c_attn" any other way. lora_alpha is chosen so that PEFT's scaling
equals lora_np's s: α' = s·r' (α' = s·√r' with rsLoRA).

Import goes the other way, exactly: a c_attn adapter of rank r' is adapters on W_q, W_k, W_v
sharing A = A', with B_q, B_k, B_v the three row blocks of B' and the same r' and α':
s·B_q·A is rows 0:D of s·B'·A', and so on. A block of B' that is zero in every layer adapts its
matrix by exactly nothing, so its target is left out (an adapter exported from q and v comes
back on q and v, and further training leaves W_k alone). Adapters whose targets share one A in
every layer, as imported ones do, export at their own rank r, with B' the B's stacked, instead
of n·r: a round trip does not grow the rank.

Dimension legend: D model width, r lora_np's rank, r' PEFT's rank, L layers.
"""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from ..core.config import LoraConfig, ModelConfig
from ..core.lora import adapter_names
from ..training.checkpoint import CheckpointError, write_atomic
from .safetensors import read_safetensors, write_safetensors

QKV = ("W_q", "W_k", "W_v")  # c_attn's three output blocks, in its order
KEY = "base_model.model.transformer.h.{l}.attn.c_attn.lora_{f}.weight"


def export_peft(adapters, lora, cfg, path, base_model="gpt2"):
    """Write adapters on (some of) W_q, W_k, W_v as a PEFT LoRA adapter of GPT-2's c_attn.

    Inputs:
    - adapters: dict from init_lora (trained); names "blocks.{l}.W_q.A" (r, D), ".B" (D, r), ...
    - lora: their LoraConfig; targets must be among W_q, W_k, W_v (c_attn's parts)
    - cfg: the ModelConfig of the GPT-2 they adapt
    - path: folder to write adapter_config.json and adapter_model.safetensors into (created if missing)
    - base_model: written as base_model_name_or_path, the model PEFT will look for

    Returns:
    - path, as a Path
    """
    if not isinstance(lora, LoraConfig) or not isinstance(cfg, ModelConfig):
        raise TypeError("lora must be a LoraConfig and cfg a ModelConfig")
    others = [t for t in lora.targets if t not in QKV]
    if others:
        raise ValueError(f"lora.targets must be among {QKV} (GPT-2's fused c_attn) to export to PEFT, "
                         f"got {lora.targets}; {others} would need PEFT modules of another rank")  # fmt: skip
    expected = adapter_names(cfg, lora)
    if set(adapters) != set(expected) or any(adapters[n].shape != s for n, s in expected.items()):
        raise ValueError(f"adapters do not fit {cfg} and {lora}: expected names and shapes {list(expected)[:2]}...")
    D, r = cfg.d_model, lora.r
    targets = [t for t in QKV if t in lora.targets]  # in c_attn's order, whatever the order of lora.targets
    layers = range(cfg.n_layers)
    shared = all(np.array_equal(adapters[f"blocks.{l}.{t}.A"], adapters[f"blocks.{l}.{targets[0]}.A"])
                 for l in layers for t in targets)  # fmt: skip
    r_peft = r if shared else r * len(targets)
    arrays = {}
    for l in layers:
        dtype = adapters[f"blocks.{l}.{targets[0]}.A"].dtype
        if shared:  # one A for all: B'·A = [B_q·A; B_k·A; B_v·A]
            A = adapters[f"blocks.{l}.{targets[0]}.A"]  # (r, D)
        else:
            A = np.concatenate([adapters[f"blocks.{l}.{t}.A"] for t in targets])  # (r', D): the A's stacked
        B = np.zeros((3 * D, r_peft), dtype=dtype)  # (3D, r')
        for j, t in enumerate(targets):
            i = QKV.index(t)
            cols = slice(0, r) if shared else slice(j * r, (j + 1) * r)
            B[i * D : (i + 1) * D, cols] = adapters[f"blocks.{l}.{t}.B"]  # its output block
        arrays[KEY.format(l=l, f="A")], arrays[KEY.format(l=l, f="B")] = A, B
    # PEFT's scaling is α'/r' (α'/√r' with rsLoRA): choose α' so that it is lora_np's s
    alpha = lora.scaling * (math.sqrt(r_peft) if lora.rslora else r_peft)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r_peft, "lora_alpha": alpha, "use_rslora": lora.rslora, "lora_dropout": lora.dropout,
        "target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "none",
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False,
    }  # fmt: skip
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "adapter_model.safetensors", arrays, {"format": "pt"})
    write_atomic(path / "adapter_config.json", lambda f: f.write(json.dumps(config, indent=2).encode("utf-8")))
    return path


# adapter_config.json, field by field. Each field is checked by its JSON type as well as its
# value: "false" in quotes is a string, which Python would call true, and true is 1 to Python.
# The fields, their types and their defaults (used for a field that is absent) are PEFT's
# LoraConfig (peft/tuners/lora/config.py; PEFT 0.21.2 writes every one of them).

# Fields that must say "plain LoRA" for the adapter to mean W + s·B'·A' on the published
# weights, which is all lora_np computes: field -> (the values allowed, why).
# (fan_in_fan_out may say false: PEFT sets it true for a Conv1D such as c_attn whatever it says.)
MUST_BE = {
    "peft_type": (("LORA",), "lora_np imports LoRA adapters only"),
    "bias": (("none",), "PEFT would also have trained biases, which the adapter file does not hold"),
    "lora_bias": ((False,), "lora_B would have a bias, which lora_np's LoRA has not"),
    "use_dora": ((False,), "DoRA rescales each column of the adapted weight, which plain LoRA does not"),
    "layers_to_transform": ((None,), "lora_np imports an adapter on every layer's c_attn"),
    "rank_pattern": (({}, None), "lora_np imports one rank r for every layer"),
    "alpha_pattern": (({}, None), "lora_np imports one lora_alpha for every layer"),
    "modules_to_save": ((None, []), "PEFT saved whole trained copies of those modules beside the adapter, which "
                        "lora_np does not load, so the model would not be the one PEFT fine-tuned"),
    "layer_replication": ((None,), "PEFT would stack copies of layers: another model"),
    "trainable_token_indices": ((None,), "PEFT would also have trained some rows of the embedding"),
    "target_parameters": ((None, []), "lora_np imports adapters of the module c_attn only"),
    "alora_invocation_tokens": ((None,), "Activated LoRA applies the adapter only after some tokens"),
    "use_qalora": ((False,), "QA-LoRA pools the adapter's input"),
    **{variant: ((None,), "a LoRA variant with a forward pass of its own")
       for variant in ("velora_config", "use_bdlora", "arrow_config", "kasa_config", "monteclora_config")},
}  # fmt: skip

# init_lora_weights values whose saved adapter still means W + s·B'·A' on the published weights:
# they choose the starting A and B alone. PiSSA ("pissa", "pissa_niter_K"), OLoRA, CorDA, LoftQ
# and LoRA-GA also change the base weights when the adapter is made (the saved A and B apply to
# weights lora_np does not have), and MiCA is a LoRA variant.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _json(value):
    """A value as it reads in the JSON file, with its JSON type: '"false" (a string)'."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}  # fmt: skip
    return f"{json.dumps(value)} ({kind[type(value)]})"


def _one_of(value, allowed):
    """value is one of allowed, type and all (False is not 0, and 1 is not true)."""
    return any(type(value) is type(a) and value == a for a in allowed)


def _read_config(file):
    """adapter_config.json, checked field by field: (r, lora_alpha, use_rslora, lora_dropout).
    Raises CheckpointError naming the file, the field, what it holds and what is allowed."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: must hold a JSON object")

    def refuse(field, allowed, why=""):
        raise CheckpointError(f"{file}: {field} = {_json(config[field])}; allowed: {allowed}" + (why and f"; {why}"))

    for field, (allowed, why) in MUST_BE.items():
        if field in config and not _one_of(config[field], allowed):
            refuse(field, " or ".join(json.dumps(a) for a in allowed), why)
    if not _targets_c_attn_only(config.get("target_modules", None)):
        raise CheckpointError(f"{file}: target_modules = {_json(config.get('target_modules'))}; allowed: "
                              f'["c_attn"], or a regular expression that matches GPT-2\'s c_attn modules and no other '
                              f"(PEFT matches a string against each module's whole name; lora_np imports adapters of "
                              f"c_attn only)")  # fmt: skip
    init = config.get("init_lora_weights", True)
    if not _one_of(init, PLAIN_INITS):
        plain = ", ".join(json.dumps(a) for a in PLAIN_INITS) + " (they choose the starting A and B alone)"
        if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
            refuse("init_lora_weights", plain, "this one also changed the base weights when the adapter was made, so "
                   "its A and B apply to weights lora_np does not have; PEFT saves it as plain LoRA with "
                   "save_pretrained(..., path_initial_model_for_weight_conversion=...)")  # fmt: skip
        refuse("init_lora_weights", plain, "MiCA is a LoRA variant" if init == "mica" else "")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise CheckpointError(f"{file}: has no field {field}; PEFT always writes it, a JSON number")
    r, alpha = config["r"], config["lora_alpha"]
    if not (type(r) is int and r >= 1):
        refuse("r", "a JSON integer >= 1", "the rank r' of lora_A (r', in) and lora_B (out, r')")
    if not (type(alpha) in (int, float) and 0 < alpha <= sys.float_info.max):  # not NaN, inf or an int past float
        refuse("lora_alpha", "a finite JSON number > 0", "PEFT's scaling is lora_alpha / r")
    rslora = config.get("use_rslora", False)
    if type(rslora) is not bool:
        refuse("use_rslora", "true or false (JSON booleans)", "the scaling is lora_alpha / √r with true, "
               "lora_alpha / r with false")  # fmt: skip
    dropout = config.get("lora_dropout", 0.0)
    if not (type(dropout) in (int, float) and 0 <= dropout < 1):
        refuse("lora_dropout", "a JSON number in [0, 1)")
    if "fan_in_fan_out" in config and type(config["fan_in_fan_out"]) is not bool:
        refuse("fan_in_fan_out", "true or false (JSON booleans)")
    return r, float(alpha), rslora, float(dropout)


# GPT-2's module names as PEFT sees them (model.named_modules()), one block's worth: what a string
# target_modules, a regular expression, is matched against
GPT2_MODULES = ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                "transformer.h.0.mlp.c_proj", "transformer.wte", "transformer.wpe", "lm_head")  # fmt: skip


def _targets_c_attn_only(targets):
    """True for ["c_attn"], or for a string that PEFT's re.fullmatch on a module's name would match for
    c_attn and for nothing else (PEFT reads a list as name suffixes, a string as a regular expression)."""
    if targets == ["c_attn"]:
        return True
    if not isinstance(targets, str):
        return False
    try:
        pattern = re.compile(targets)
    except re.error:
        return False
    return [bool(pattern.fullmatch(name)) for name in GPT2_MODULES] == [True] + [False] * (len(GPT2_MODULES) - 1)


def import_peft(path, cfg):
    """A PEFT LoRA adapter of GPT-2's c_attn as lora_np adapters on W_q, W_k, W_v sharing A.

    Inputs:
    - path: folder holding adapter_config.json and adapter_model.safetensors
    - cfg: the ModelConfig of the GPT-2 it adapts

    Returns:
    - adapters: dict name -> array (as stored, float32 for a float32 model), on W_q, W_k, W_v
      but those whose block of B' is zero in every layer
    - lora: LoraConfig(r=r', alpha=α', targets=those, rslora=use_rslora)

    Raises CheckpointError (a ValueError) naming the file and the field or tensor, what it holds
    and what is allowed, before any array is used: a field of the wrong JSON type ("use_rslora":
    "false", "lora_alpha": true, "r": true), a PEFT feature lora_np does not compute (MUST_BE,
    PLAIN_INITS), a tensor missing, of another shape, not floating point, or holding NaN or inf.
    """
    path = Path(path)
    file = path / "adapter_config.json"
    r, alpha, rslora, dropout = _read_config(file)
    weights_file = path / "adapter_model.safetensors"
    arrays, _ = read_safetensors(weights_file)
    D = cfg.d_model
    shapes = {"A": (r, D), "B": (3 * D, r)}
    expected = {KEY.format(l=l, f=f): shape for l in range(cfg.n_layers) for f, shape in shapes.items()}
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{weights_file}: does not fit r = {r} on {cfg.n_layers} layers: missing {missing[:2]}, "
                              f"unexpected {extra[:2]}")  # fmt: skip
    for name, shape in expected.items():
        a = arrays[name]
        if a.shape != shape:
            raise CheckpointError(f"{weights_file}: {name} has shape {a.shape}, expected {shape}")
        # F16 and BF16 come back widened to float32; an integer or boolean tensor is refused, not
        # converted: integer LoRA weights would need a quantization scale that the file does not hold
        if a.dtype.kind != "f":
            raise CheckpointError(f"{weights_file}: {name} is stored as {a.dtype}; allowed: floating point "
                                  "(F16, BF16, F32 or F64)")  # fmt: skip
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            where = np.unravel_index(bad[0], shape)
            raise CheckpointError(f"{weights_file}: {name} has {bad.size} of its {a.size} values NaN or inf, the "
                                  f"first {a[where]} at {tuple(map(int, where))}; allowed: finite values")  # fmt: skip

    def block(l, i):  # (D, r'): the rows of B' that write c_attn's i-th output, q, k or v
        return arrays[KEY.format(l=l, f="B")][i * D : (i + 1) * D]

    used = [t for i, t in enumerate(QKV) if any(np.any(block(l, i)) for l in range(cfg.n_layers))]
    try:
        lora = LoraConfig(r=r, alpha=alpha, targets=tuple(used or QKV),  # all zero (untrained): all three
                          rslora=rslora, dropout=dropout)  # fmt: skip
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    adapters = {}
    for l in range(cfg.n_layers):
        for i, t in enumerate(QKV):
            if t in lora.targets:
                adapters[f"blocks.{l}.{t}.A"] = np.array(arrays[KEY.format(l=l, f="A")])  # each its own copy
                adapters[f"blocks.{l}.{t}.B"] = np.array(block(l, i))
    return adapters, lora
