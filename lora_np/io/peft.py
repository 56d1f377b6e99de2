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


# What an imported adapter_config.json must say for the adapter to mean what lora_np computes.
# (fan_in_fan_out may say false: PEFT sets it true for a Conv1D such as c_attn whatever it says.)
MUST_BE = {"peft_type": "LORA", "bias": "none", "use_dora": False,
           "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}  # fmt: skip


def import_peft(path, cfg):
    """A PEFT LoRA adapter of GPT-2's c_attn as lora_np adapters on W_q, W_k, W_v sharing A.

    Inputs:
    - path: folder holding adapter_config.json and adapter_model.safetensors
    - cfg: the ModelConfig of the GPT-2 it adapts

    Returns:
    - adapters: dict name -> array (as stored, float32 for a float32 model), on W_q, W_k, W_v
      but those whose block of B' is zero in every layer
    - lora: LoraConfig(r=r', alpha=α', targets=those, rslora=use_rslora)
    """
    path = Path(path)
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'adapter_config.json'}: cannot be read as JSON ({e})") from None
    file = path / "adapter_config.json"
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: must hold a JSON object")
    for field, value in MUST_BE.items():
        if config.get(field, value) != value:
            raise CheckpointError(f"{file}: {field} = {config.get(field)!r}; lora_np imports plain LoRA on GPT-2's "
                                  f"Conv1D modules, which needs {value!r}")  # fmt: skip
    targets = config.get("target_modules")
    if targets not in (["c_attn"], "c_attn"):
        raise CheckpointError(f"{file}: target_modules = {targets!r}; lora_np imports adapters of c_attn only")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(r, int) and r >= 1 and isinstance(alpha, (int, float)) and alpha > 0):
        raise CheckpointError(f"{file}: r must be an int >= 1 and lora_alpha a number > 0, got {r!r}, {alpha!r}")
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
        if arrays[name].shape != shape:
            raise CheckpointError(f"{weights_file}: {name} has shape {arrays[name].shape}, expected {shape}")
    def block(l, i):  # (D, r'): the rows of B' that write c_attn's i-th output, q, k or v
        return arrays[KEY.format(l=l, f="B")][i * D : (i + 1) * D]

    used = [t for i, t in enumerate(QKV) if any(np.any(block(l, i)) for l in range(cfg.n_layers))]
    try:
        lora = LoraConfig(r=r, alpha=float(alpha), targets=tuple(used or QKV),  # all zero (untrained): all three
                          rslora=bool(config.get("use_rslora", False)),
                          dropout=float(config.get("lora_dropout", 0.0) or 0.0))  # fmt: skip
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    adapters = {}
    for l in range(cfg.n_layers):
        for i, t in enumerate(QKV):
            if t in lora.targets:
                adapters[f"blocks.{l}.{t}.A"] = np.array(arrays[KEY.format(l=l, f="A")])  # each its own copy
                adapters[f"blocks.{l}.{t}.B"] = np.array(block(l, i))
    return adapters, lora
