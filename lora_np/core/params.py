"""The tiny GPT's parameters: names, shapes, initialization and validation.

Dimension legend: V vocabulary, D model width, M MLP width, L layers.

All parameters live in one flat dict keyed by the names of the literature:

    W_e (V, D)   W_p (context_length, D)
    blocks.{l}.ln1.gamma, blocks.{l}.ln1.beta (D,)
    blocks.{l}.W_q, W_k, W_v, W_o (D, D)   blocks.{l}.b_q, b_k, b_v, b_o (D,)
    blocks.{l}.ln2.gamma, blocks.{l}.ln2.beta (D,)
    blocks.{l}.W_1 (M, D)  blocks.{l}.b_1 (M,)   blocks.{l}.W_2 (D, M)  blocks.{l}.b_2 (D,)
    ln_f.gamma, ln_f.beta (D,)   W_u (V, D)
"""

import hashlib
from numbers import Integral

import numpy as np

from .config import ModelConfig


class Params(dict):
    """A dict name -> array that also carries the ModelConfig it was built for, and a record of
    the adapters merged into its weights.

    The config rides along because one number, n_heads, cannot be read off the arrays'
    shapes, and model_forward(params, tokens) has no other place to get it from. A plain
    dict built from a Params (e.g. by a dict comprehension) loses it; wrap it again with
    Params(cfg, arrays).

    merged_adapters is a tuple of fingerprints (adapters_fingerprint) of the adapters that
    lora_np's merge has folded into these weights, oldest first: () for a base from init_params
    or load_params. Nothing in a merged weight says that ΔW is already in it, so without this
    record merging twice would add ΔW twice and unmerging a base would subtract it; merge and
    unmerge consult it (with_merged, without_merged) and refuse both. copy() keeps it; a Params
    rebuilt by hand, Params(cfg, arrays), starts with none.
    """

    def __init__(self, config, arrays, merged_adapters=()):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        super().__init__(arrays)
        self.config = config
        self.merged_adapters = tuple(merged_adapters)

    def copy(self):
        return Params(self.config, self, self.merged_adapters)

    def with_merged(self, adapters, lora):
        """A shallow copy (as copy()) that records `adapters` as merged; ValueError if they already are."""
        key = adapters_fingerprint(adapters, lora)
        if key in self.merged_adapters:
            raise ValueError(f"adapters (fingerprint {key[:12]}..., {lora}) are already merged into params: "
                             f"merging them again would add ΔW twice")  # fmt: skip
        return Params(self.config, self, self.merged_adapters + (key,))

    def without_merged(self, adapters, lora):
        """A shallow copy (as copy()) without `adapters` in its record; ValueError if they are not in it."""
        key = adapters_fingerprint(adapters, lora)
        if key not in self.merged_adapters:
            raise ValueError(f"adapters (fingerprint {key[:12]}..., {lora}) were not merged into merged (it holds "
                             f"{len(self.merged_adapters)} merged adapters): unmerging them would subtract ΔW "
                             f"from weights that do not hold it")  # fmt: skip
        kept = list(self.merged_adapters)
        kept.remove(key)
        return Params(self.config, self, kept)

    def __repr__(self):
        n = sum(a.size for a in self.values())
        merged = len(self.merged_adapters)
        record = f", {merged} merged adapter{'s' if merged > 1 else ''}" if merged else ""
        return f"Params({self.config}, {len(self)} arrays, {n:,} numbers{record})"


def adapters_fingerprint(adapters, lora):
    """SHA-256 (hex) of a LoraConfig and its adapters' names, dtypes, shapes and values: what
    Params.merged_adapters records. The same numbers under another alpha are another ΔW."""
    h = hashlib.sha256(repr(lora).encode())
    for name in sorted(adapters):
        a = np.ascontiguousarray(adapters[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# the blocks' linear weights: the ones a base may store in another format (quantized)
QUANTIZABLE = ("W_q", "W_k", "W_v", "W_o", "W_1", "W_2")


def param_shapes(cfg):
    """{name: shape} of every parameter, in the order of the forward pass."""
    V, D, M = cfg.vocab_size, cfg.d_model, cfg.d_mlp
    shapes = {"W_e": (V, D), "W_p": (cfg.context_length, D)}
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        shapes.update({p + "ln1.gamma": (D,), p + "ln1.beta": (D,)})
        for w in "qkvo":
            shapes.update({p + f"W_{w}": (D, D), p + f"b_{w}": (D,)})
        shapes.update({p + "ln2.gamma": (D,), p + "ln2.beta": (D,)})
        shapes.update({p + "W_1": (M, D), p + "b_1": (M,), p + "W_2": (D, M), p + "b_2": (D,)})
    shapes.update({"ln_f.gamma": (D,), "ln_f.beta": (D,), "W_u": (V, D)})
    return shapes


def check_seed(seed):
    if not isinstance(seed, Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int >= 0, got {seed!r} ({type(seed).__name__})")
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def init_params(cfg, seed):
    """GPT-2 style initialization, in float64 (use `cast` for float32).

    Weights ~ N(0, 0.02²); the two that write into the residual stream, W_o and W_2, get
    0.02/sqrt(2·L) so the stream's variance does not grow with depth (Radford et al. 2019).
    Biases and LayerNorm betas are 0, LayerNorm gammas 1.

    Inputs:
    - cfg: ModelConfig
    - seed: int >= 0; the same seed gives the same numbers, bit for bit

    Returns:
    - params: Params (a dict name -> array, carrying cfg)
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    check_seed(seed)
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / np.sqrt(2 * cfg.n_layers)
    arrays = {}
    for name, shape in param_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma":
            arrays[name] = np.ones(shape)
        elif leaf == "beta" or leaf.startswith("b_"):
            arrays[name] = np.zeros(shape)
        elif leaf in ("W_o", "W_2"):
            arrays[name] = rng.normal(0.0, residual_std, size=shape)
        else:
            arrays[name] = rng.normal(0.0, 0.02, size=shape)
    return Params(cfg, arrays)


def is_stored_weight(a):
    """True for a weight kept in another format than a NumPy array, such as a quantized base weight
    (QLoRA's 4-bit NormalFloat, lora_np.methods.nf4): an object with a shape and a dtype that
    np.asarray turns into the array it stands for. The layers use it through np.asarray alone, so
    they need not know its format; it is frozen, as only an array can take a gradient step."""
    return not isinstance(a, np.ndarray) and hasattr(a, "__array__") and hasattr(a, "shape") and hasattr(a, "dtype")


def is_quantized(params):
    """True when some weight of params is stored in another format than an array (is_stored_weight)."""
    return any(is_stored_weight(a) for a in params.values())


def cast(arrays, dtype):
    """A copy of a Params or adapter dict with every array in `dtype` (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if isinstance(arrays, Params) and is_quantized(arrays):
        raise ValueError("params hold weights stored in another format (quantized): cast before quantizing")
    out = {k: v.astype(dtype) for k, v in arrays.items()}
    return Params(arrays.config, out) if isinstance(arrays, Params) else out


def check_params(params):
    """Raise a clear error unless `params` is a Params whose arrays fit its config."""
    if not isinstance(params, Params):
        raise TypeError(
            f"params must be a lora_np Params (from init_params, merge or load), got "
            f"{type(params).__name__}; wrap a plain dict with Params(cfg, arrays)"
        )
    expected = param_shapes(params.config)
    missing = [n for n in expected if n not in params]
    extra = [n for n in params if n not in expected]
    if missing or extra:
        raise ValueError(f"params do not fit {params.config}: missing {missing[:4]}, unexpected {extra[:4]}")
    dtype = params["W_e"].dtype
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"params must be float32 or float64, got W_e with dtype {dtype}")
    for name, shape in expected.items():
        a = params[name]
        # a blocks' linear weight stored in another format (a quantized base) is checked by the shape
        # and dtype it stands for
        array_like = isinstance(a, np.ndarray) or (name.rsplit(".", 1)[-1] in QUANTIZABLE and is_stored_weight(a))
        if not array_like or a.shape != shape or a.dtype != dtype:
            got = (a.shape, a.dtype) if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"params[{name!r}] must be an array of shape {shape} and dtype {dtype}, got {got}")
