"""GPT-2's published weights in lora_np's model: load_gpt2 and its inverse, save_gpt2.

lora_np's tiny GPT already has GPT-2's architecture (Radford et al. 2019, Section 2.3: LayerNorm
at the input of each sub-block and after the last one; the released code, model.py: learned
positions, biases on every projection, the tanh GELU, LayerNorm eps 1e-5), so the published
checkpoint is a renaming of arrays, not a new model.
A folder laid out as GPT-2 is published on the Hugging Face hub holds

    config.json          n_layer, n_embd, n_head, n_positions, vocab_size, activation, eps, ...
    model.safetensors    the weights (names with or without the prefix "transformer.")
    vocab.json, merges.txt   the byte-level BPE tokenizer (lora_np.bpe)

and the names map as follows. GPT-2 stores its projections as Conv1D modules, whose weight is
(in, out), the transpose of lora_np's (d_out, d_in); its q, k and v are one fused projection:

    wte.weight (V, D)                    -> W_e, and W_u too: GPT-2 ties the head to the embedding
    wpe.weight (n_positions, D)          -> W_p
    h.{l}.ln_1.weight, .bias             -> blocks.{l}.ln1.gamma, ln1.beta        (ln_2 alike)
    h.{l}.attn.c_attn.weight (D, 3D)     -> W_q, W_k, W_v = its column blocks [0:D], [D:2D], [2D:3D], transposed
    h.{l}.attn.c_attn.bias (3D,)         -> b_q, b_k, b_v
    h.{l}.attn.c_proj.weight (D, D)      -> W_o transposed;  .bias -> b_o
    h.{l}.mlp.c_fc.weight (D, M)         -> W_1 transposed;  .bias -> b_1
    h.{l}.mlp.c_proj.weight (M, D)       -> W_2 transposed;  .bias -> b_2
    ln_f.weight, .bias                   -> ln_f.gamma, ln_f.beta
    lm_head.weight (V, D)                -> W_u, only when the head is not tied
    h.{l}.attn.bias, .masked_bias        ignored: stored causal-mask buffers, not weights

Loading maps the file: every weight of a float32 checkpoint is a read-only view into it
(transposes and column blocks are views too), so loading 124M parameters costs no copy.
That suits LoRA, which never writes a base weight. Loading does read every page once, to refuse a
weight holding NaN or infinity by its name (check_finite=False skips that, for a measurement of the
mapping alone). Full fine-tuning writes every weight and
has no tie in lora_np's model: `untie` gives it writable copies of every array, W_u a copy of
W_e of its own, trained as its own matrix; save_gpt2 then writes it as lm_head.weight with the
tie turned off.

Dimension legend: V vocabulary, D model width, M MLP width (n_inner, 4·D by default), L layers.
"""

import json
import os
from pathlib import Path

import numpy as np

from ..core.config import ModelConfig
from ..core.params import Params, check_params, param_shapes
from ..training.checkpoint import CheckpointError, write_atomic
from .bpe import GPT2Tokenizer
from .safetensors import read_safetensors, write_safetensors

# config.json values lora_np's model computes as GPT-2 does; anything else is another model.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
REQUIRED = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
MUST_BE = {  # field: (the value GPT-2 has, what another value would change)
    "layer_norm_epsilon": (1e-5, "LayerNorm's eps"),
    "scale_attn_weights": (True, "the 1/√(head size) scaling of attention scores"),
    "scale_attn_by_inverse_layer_idx": (False, "an extra 1/(layer + 1) on attention scores"),
    "reorder_and_upcast_attn": (False, "the order of attention's products"),
    "add_cross_attention": (False, "cross-attention blocks (an encoder-decoder)"),
}
FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")  # the published layout
PREFIX = "transformer."
BUFFERS = ("attn.bias", "attn.masked_bias")


def model_config(cfg_json, path="config.json"):
    """The ModelConfig of a GPT-2 config.json (a dict), or CheckpointError naming the field that
    makes it another architecture. Returns (ModelConfig, tied) with tied the head's tie."""

    def bad(field, why):
        return CheckpointError(f"{path}: {field} = {cfg_json.get(field)!r}: {why}")

    if not isinstance(cfg_json, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(cfg_json).__name__}")
    if cfg_json.get("model_type", "gpt2") != "gpt2":
        raise bad("model_type", "lora_np loads GPT-2 checkpoints only (model_type 'gpt2')")
    for field in REQUIRED:  # JSON's true is a Python int too: refused by name, not by a TypeError later
        if not (_is_int(cfg_json.get(field)) and cfg_json[field] >= 1):
            raise bad(field, "must be an integer >= 1")
    act = cfg_json.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise bad("activation_function", f"lora_np computes GPT-2's tanh GELU, one of {TANH_GELUS}")
    for field, (value, what) in MUST_BE.items():
        got = cfg_json.get(field, value)
        if got != value or type(got) is not type(value):
            raise bad(field, f"GPT-2 has {value!r}; another value changes {what}")
    n_inner = cfg_json.get("n_inner")
    if n_inner is not None and not (_is_int(n_inner) and n_inner >= 1):
        raise bad("n_inner", "must be null (4·n_embd) or an integer >= 1")
    tied = cfg_json.get("tie_word_embeddings", True)
    if not isinstance(tied, bool):
        raise bad("tie_word_embeddings", "must be true or false")
    D = cfg_json["n_embd"]
    try:
        cfg = ModelConfig(vocab_size=cfg_json["vocab_size"], context_length=cfg_json["n_positions"], d_model=D,
                          n_heads=cfg_json["n_head"], n_layers=cfg_json["n_layer"], d_mlp=n_inner or 4 * D)  # fmt: skip
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, tied


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _published_names(cfg, tied):
    """{published name: shape} of every weight, in lora_np's (d_out, d_in) terms where they differ."""
    D, M, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    shapes = {"wte.weight": (V, D), "wpe.weight": (cfg.context_length, D)}
    for l in range(cfg.n_layers):
        h = f"h.{l}."
        shapes.update({
            h + "ln_1.weight": (D,), h + "ln_1.bias": (D,),
            h + "attn.c_attn.weight": (D, 3 * D), h + "attn.c_attn.bias": (3 * D,),
            h + "attn.c_proj.weight": (D, D), h + "attn.c_proj.bias": (D,),
            h + "ln_2.weight": (D,), h + "ln_2.bias": (D,),
            h + "mlp.c_fc.weight": (D, M), h + "mlp.c_fc.bias": (M,),
            h + "mlp.c_proj.weight": (M, D), h + "mlp.c_proj.bias": (D,),
        })  # fmt: skip
    shapes.update({"ln_f.weight": (D,), "ln_f.bias": (D,)})
    if not tied:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def from_published(cfg, w, tied):
    """lora_np's Params from a dict of published-layout arrays (views where possible, never copies)."""
    D = cfg.d_model
    p = {"W_e": w["wte.weight"], "W_p": w["wpe.weight"]}
    for l in range(cfg.n_layers):
        h, b = f"h.{l}.", f"blocks.{l}."
        c_attn, c_attn_b = w[h + "attn.c_attn.weight"], w[h + "attn.c_attn.bias"]  # (D, 3D), (3D,)
        p[b + "ln1.gamma"], p[b + "ln1.beta"] = w[h + "ln_1.weight"], w[h + "ln_1.bias"]
        for i, name in enumerate("qkv"):
            # Conv1D: out = x @ weight + bias, weight (in, out); lora_np's W is (out, in)
            p[b + f"W_{name}"] = c_attn[:, i * D : (i + 1) * D].T  # (D, D)
            p[b + f"b_{name}"] = c_attn_b[i * D : (i + 1) * D]
        p[b + "W_o"], p[b + "b_o"] = w[h + "attn.c_proj.weight"].T, w[h + "attn.c_proj.bias"]
        p[b + "ln2.gamma"], p[b + "ln2.beta"] = w[h + "ln_2.weight"], w[h + "ln_2.bias"]
        p[b + "W_1"], p[b + "b_1"] = w[h + "mlp.c_fc.weight"].T, w[h + "mlp.c_fc.bias"]  # (M, D)
        p[b + "W_2"], p[b + "b_2"] = w[h + "mlp.c_proj.weight"].T, w[h + "mlp.c_proj.bias"]  # (D, M)
    p["ln_f.gamma"], p["ln_f.beta"] = w["ln_f.weight"], w["ln_f.bias"]
    p["W_u"] = w["wte.weight"] if tied else w["lm_head.weight"]  # tied: the very same array
    return Params(cfg, {name: p[name] for name in param_shapes(cfg)})


def to_published(params):
    """The published-layout arrays of a Params, and whether its head is tied (W_u equal to W_e)."""
    cfg = params.config
    w = {"wte.weight": params["W_e"], "wpe.weight": params["W_p"]}
    for l in range(cfg.n_layers):
        h, b = f"h.{l}.", f"blocks.{l}."
        w[h + "ln_1.weight"], w[h + "ln_1.bias"] = params[b + "ln1.gamma"], params[b + "ln1.beta"]
        w[h + "attn.c_attn.weight"] = np.concatenate([params[b + f"W_{n}"].T for n in "qkv"], axis=1)  # (D, 3D)
        w[h + "attn.c_attn.bias"] = np.concatenate([params[b + f"b_{n}"] for n in "qkv"])
        w[h + "attn.c_proj.weight"], w[h + "attn.c_proj.bias"] = params[b + "W_o"].T, params[b + "b_o"]
        w[h + "ln_2.weight"], w[h + "ln_2.bias"] = params[b + "ln2.gamma"], params[b + "ln2.beta"]
        w[h + "mlp.c_fc.weight"], w[h + "mlp.c_fc.bias"] = params[b + "W_1"].T, params[b + "b_1"]
        w[h + "mlp.c_proj.weight"], w[h + "mlp.c_proj.bias"] = params[b + "W_2"].T, params[b + "b_2"]
    w["ln_f.weight"], w["ln_f.bias"] = params["ln_f.gamma"], params["ln_f.beta"]
    tied = params["W_u"] is params["W_e"] or np.array_equal(params["W_u"], params["W_e"])
    if not tied:
        w["lm_head.weight"] = params["W_u"]
    return w, tied


def _weights(path, cfg, tied, check_finite=True):
    """The published weights of model.safetensors, checked against cfg (and, with check_finite, for
    NaN and infinities: that reads every page of the file once), with the prefix dropped."""
    file = path / "model.safetensors"
    expected = _published_names(cfg, tied)
    arrays, _ = read_safetensors(file)  # mapped, not read: a buffer skipped below costs nothing
    weights = {}
    for name, a in arrays.items():
        short = name[len(PREFIX) :] if name.startswith(PREFIX) else name
        if short.endswith(BUFFERS) and short not in expected:
            continue  # the causal mask GPT-2's code stored as a buffer; lora_np builds its own
        if short in weights:
            raise CheckpointError(f"{file}: {short} is stored twice (with and without {PREFIX!r})")
        weights[short] = a
    if tied and "lm_head.weight" in weights:
        if not np.array_equal(weights.pop("lm_head.weight"), weights.get("wte.weight")):
            raise CheckpointError(f"{file}: config.json ties the head to wte, but lm_head.weight differs from it")
    missing = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected]
    if missing or extra:
        why = " (config.json unties the head: tie_word_embeddings false)" if "lm_head.weight" in missing else ""
        raise CheckpointError(f"{file}: does not fit config.json: missing {missing[:3]}{why}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        a = weights[name]
        if a.shape != shape:
            raise CheckpointError(f"{file}: {name} has shape {a.shape}, config.json says {shape}")
        if a.dtype not in (np.float32, np.float64):
            raise CheckpointError(f"{file}: {name} has dtype {a.dtype}; weights must be floating point")
        finite = np.isfinite(a) if check_finite else True  # reads the mapped file once; training would too
        if not np.all(finite):
            bad = np.flatnonzero(~finite)
            raise CheckpointError(f"{file}: {name} holds {bad.size:,} NaN or infinite values (the first at flat "
                                  f"index {bad[0]}: {a.reshape(-1)[bad[0]]}); the weights are damaged")  # fmt: skip
    dtypes = {weights[n].dtype for n in expected}
    if len(dtypes) > 1:  # F16/BF16 arrive widened to float32; mixing F32 and F64 is not a GPT-2 file
        raise CheckpointError(f"{file}: weights mix dtypes {sorted(map(str, dtypes))}")
    return weights


def check_folder(path):
    """The folder of a published GPT-2, checked: it can be entered and holds the four files, each a
    readable file. CheckpointError naming the folder or the file otherwise. Returns a Path."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; point at the folder holding GPT-2's config.json, "
                              f"model.safetensors, vocab.json and merges.txt")  # fmt: skip
    try:
        missing = [f for f in FILES if not (path / f).is_file()]
    except OSError as e:  # a folder without the x bit: its entries cannot even be looked at
        raise CheckpointError(f"{path}: the folder cannot be entered ({e.strerror or e})") from None
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)} (GPT-2's published layout)")
    for f in FILES:  # os.access is True for root everywhere: opening is the test that holds for everyone
        try:
            open(path / f, "rb").close()
        except OSError as e:
            raise CheckpointError(f"{path / f}: cannot be read ({e.strerror or e})") from None
    return path


def load_config(path):
    """(ModelConfig, tied) from the config.json of a checked folder (check_folder)."""
    file = Path(path) / "config.json"
    try:
        cfg_json = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    return model_config(cfg_json, file)


def load_tokenizer(path, cfg):
    """The GPT2Tokenizer of vocab.json and merges.txt in a checked folder, for a model of config cfg."""
    path = Path(path)
    try:
        tokenizer = GPT2Tokenizer.from_files(path / "vocab.json", path / "merges.txt")
    except OSError as e:
        raise CheckpointError(f"{e.filename or path}: cannot be read ({e.strerror or e})") from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{path}: vocab.json has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size {cfg.vocab_size}")  # fmt: skip
    return tokenizer


def load_weights(path, cfg, tied, check_finite=True):
    """The Params of model.safetensors in a checked folder, for config cfg (load_config): every
    weight checked for name, shape, dtype and (unless check_finite is False: the check reads the
    whole file, which a measurement of the mapping alone must not) finite values, CheckpointError
    naming the tensor."""
    try:
        weights = _weights(Path(path), cfg, tied, check_finite)
    except OSError as e:
        raise CheckpointError(f"{e.filename or Path(path) / 'model.safetensors'}: cannot be read "
                              f"({e.strerror or e})") from None  # fmt: skip
    return from_published(cfg, weights, tied)


def load_gpt2(path, check_finite=True):
    """GPT-2 from a folder laid out as it is published: (Params, GPT2Tokenizer).

    Inputs:
    - path: the folder holding config.json, model.safetensors, vocab.json and merges.txt
      (any of GPT-2's sizes: 124M, 355M, 774M, 1.5B)
    - check_finite: refuse a weight holding NaN or infinity, naming it (reads every page once)

    Returns:
    - params: Params, float32 (the file's dtype; F16 and BF16 are widened to float32), its
      arrays read-only views into the mapped file; W_u is W_e (the tie), unless the file
      holds an untied lm_head.weight
    - tokenizer: GPT2Tokenizer from vocab.json and merges.txt

    Every way the folder can fail (a file missing, unreadable, malformed; a weight NaN or
    infinite) is a CheckpointError naming the file, and the tensor where there is one. The steps,
    check_folder, load_config, load_tokenizer and load_weights, are public for a caller that needs
    the tokenizer before the weights (the gpt2 command tokenizes its data first).
    """
    path = check_folder(path)
    cfg, tied = load_config(path)
    params = load_weights(path, cfg, tied, check_finite)
    return params, load_tokenizer(path, cfg)


def untie(params):
    """Writable copies of every array, for full fine-tuning: W_u becomes its own copy of W_e (lora_np's
    model trains W_u and W_e as two matrices; GPT-2 ties them). Costs a copy of the whole model."""
    check_params(params)
    return Params(params.config, {name: np.array(a) for name, a in params.items()})  # np.array copies


def save_gpt2(params, path, tokenizer=None):
    """Write a Params in GPT-2's published layout: config.json and model.safetensors, and
    vocab.json and merges.txt when a tokenizer is given. The folder is created if missing.

    The head is written tied (no lm_head.weight, tie_word_embeddings true) when W_u equals W_e,
    and untied otherwise. Each file is written atomically.
    """
    check_params(params)
    cfg = params.config
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path {str(path)!r} exists and is not a folder")
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r}: its parent folder does not exist")
    weights, tied = to_published(params)
    cfg_json = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
        "n_layer": cfg.n_layers, "n_embd": cfg.d_model, "n_head": cfg.n_heads, "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length, "vocab_size": cfg.vocab_size,
        "n_inner": None if cfg.d_mlp == 4 * cfg.d_model else cfg.d_mlp,
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": tied,
        **{field: value for field, (value, _) in MUST_BE.items()},
    }  # fmt: skip
    os.makedirs(path, exist_ok=True)
    write_atomic(path / "config.json", lambda f: f.write(json.dumps(cfg_json, indent=2).encode("utf-8")))
    write_safetensors(path / "model.safetensors", weights, {"format": "pt"})
    if tokenizer is not None:  # vocab.json and merges.txt as GPT-2 publishes them
        vocab = json.dumps(tokenizer.encoder, ensure_ascii=False)
        merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)  # highest priority first
        text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        write_atomic(path / "vocab.json", lambda f: f.write(vocab.encode("utf-8")))
        write_atomic(path / "merges.txt", lambda f: f.write(text.encode("utf-8")))
    return path
