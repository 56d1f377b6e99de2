"""LoRA adapters for the tiny GPT: creation, validation, merging (paper Sections 4.1 and 4.2).

For every adapted weight W0 (d_out, d_in) of every block, an adapter is the pair

    blocks.{l}.{target}.A : (r, d_in)    drawn at random
    blocks.{l}.{target}.B : (d_out, r)   zero

so that ΔW = s·B·A is zero at the start and the adapted model is exactly the pretrained one.
After training, `merge` folds ΔW into W0 (W' = W0 + s·B·A, Section 4.1: "no additional
inference latency"), and `unmerge` takes it out again. Both return new dicts and leave their
inputs untouched, so the base weights are never lost. Nothing in a merged weight says that ΔW
is in it, so the Params records it (Params.merged_adapters): merging the same adapters twice,
or unmerging adapters that were never merged, is refused instead of adding or subtracting ΔW
a second time.

LoRA's successors (LoraConfig.method "dora", "vera"; see lora_np.variants) name their arrays
here too (adapter_names): DoRA adds a magnitude m (d_out,) to each A, B pair; VeRA trains two
vectors per adapted weight on one frozen random pair per weight shape ("vera." names, never
trained). merge and unmerge hand them, and a 4-bit base, to lora_np.variants.

The paper's adapter baselines (method "adapter_h", "adapter_l"; see lora_np.adapters) are named
here as well, so that model_forward, the trainer and the checkpoints take them as they take LoRA;
they adapt no weight (their targets are ()), and merge refuses them: they are extra layers.

Dimension legend: r rank, d_in / d_out the adapted weight's input / output width.
"""

import numpy as np

from .config import ADAPTER_METHODS, LoraConfig, ModelConfig
from .params import Params, check_seed, is_quantized


def adapter_names(cfg, lora):
    """The adapter arrays a model needs, as {name: shape}, in a fixed order (blocks, targets, A then B).

    method "lora": A (r, d_in) and B (d_out, r) per adapted weight; "dora" adds the magnitude
    m (d_out,); "vera" has two trainable vectors per adapted weight, lambda_d (r,) and
    lambda_b (d_out,), and one frozen random pair per weight shape, shared by every layer:
    "vera.{d_out}x{d_in}.A" (r, d_in) and ".B" (d_out, r). The adapter methods: their bottleneck
    layers' arrays (lora_np.adapters.adapter_layer_names).
    """
    if lora.method in ADAPTER_METHODS:
        from ..methods.adapters import adapter_layer_names

        return adapter_layer_names(cfg, lora)
    names = {}
    if lora.method == "vera":
        for t in lora.targets:
            d_out, d_in = cfg.linear_shape(t)
            names[f"{VERA_SHARED}{d_out}x{d_in}.A"] = (lora.r, d_in)
            names[f"{VERA_SHARED}{d_out}x{d_in}.B"] = (d_out, lora.r)
    for l in range(cfg.n_layers):
        for t in lora.targets:
            d_out, d_in = cfg.linear_shape(t)
            if lora.method == "vera":
                names[f"blocks.{l}.{t}.lambda_d"] = (lora.r,)
                names[f"blocks.{l}.{t}.lambda_b"] = (d_out,)
                continue
            names[f"blocks.{l}.{t}.A"] = (lora.r, d_in)
            names[f"blocks.{l}.{t}.B"] = (d_out, lora.r)
            if lora.method == "dora":
                names[f"blocks.{l}.{t}.m"] = (d_out,)
    return names


VERA_SHARED = "vera."  # the prefix of VeRA's frozen shared matrices: adapters, but never trained


def trainable_adapters(adapters):
    """The names of the adapter arrays that train: all but VeRA's frozen shared matrices."""
    return [name for name in adapters if not name.startswith(VERA_SHARED)]


def vera_shared(adapters, cfg, target):
    """VeRA's frozen (A, B) for a target's weight shape."""
    d_out, d_in = cfg.linear_shape(target)
    return adapters[f"{VERA_SHARED}{d_out}x{d_in}.A"], adapters[f"{VERA_SHARED}{d_out}x{d_in}.B"]


def check_rank(cfg, lora):
    """r must not exceed min(d_out, d_in) of any target: beyond it B·A cannot gain rank. For an
    adapter, r is the bottleneck's width and must not exceed d_model: a wider one is no bottleneck."""
    if lora.method in ADAPTER_METHODS:
        if lora.r > cfg.d_model:
            raise ValueError(f"r is the bottleneck width of method={lora.method!r} and must be between 1 and "
                             f"d_model = {cfg.d_model}, got r={lora.r}")  # fmt: skip
        return
    for t in lora.targets:
        d_out, d_in = cfg.linear_shape(t)
        if lora.r > min(d_out, d_in):
            raise ValueError(
                f"r must be between 1 and min(d_out, d_in) = {min(d_out, d_in)} for target {t} "
                f"of shape (d_out, d_in) = {(d_out, d_in)}, got r={lora.r}"
            )


def init_lora(cfg, lora, seed):
    """Fresh adapters: A random, B = 0 (paper Section 4.1), so ΔW = B·A = 0 at the start.

    init="gaussian" (the paper's "random Gaussian initialization for A"): A ~ N(0, 1/d_in).
    The paper gives no σ; 1/sqrt(d_in) keeps each entry of A·x at the scale of one entry of x.
    init="kaiming": A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), what loralib and PEFT get from
    kaiming_uniform_(a=sqrt(5)).

    Inputs:
    - cfg: ModelConfig
    - lora: LoraConfig
    - seed: int >= 0

    Returns:
    - adapters: dict name -> float64 array, names and shapes as in adapter_names
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a LoraConfig, got {type(lora).__name__}")
    check_seed(seed)
    check_rank(cfg, lora)
    if lora.method == "vera":  # shared frozen matrices and two vectors: lora_np.variants
        from ..methods.variants import init_vera

        return init_vera(cfg, lora, seed)
    if lora.method in ("adapter_h", "adapter_l"):  # config.ADAPTER_METHODS: bottleneck layers, not a ΔW
        from ..methods.adapters import init_adapter_layers

        return init_adapter_layers(cfg, lora, seed)
    if lora.method == "dora" or lora.init == "pissa":
        raise ValueError(f"method={lora.method!r}, init={lora.init!r} initializes from the base weights W0: "
                         f"use lora_np.variants.init_adapters(params, lora, seed), which returns (params, adapters)")
    rng = np.random.default_rng(seed)
    adapters = {}
    for name, shape in adapter_names(cfg, lora).items():
        if name.endswith(".B"):
            adapters[name] = np.zeros(shape)
            continue
        d_in = shape[1]
        if lora.init == "gaussian":
            adapters[name] = rng.normal(0.0, 1.0 / np.sqrt(d_in), size=shape)
        else:
            bound = 1.0 / np.sqrt(d_in)
            adapters[name] = rng.uniform(-bound, bound, size=shape)
    return adapters


def check_adapters(params, adapters, lora):
    """Raise a clear error unless `adapters` fit `params` under `lora`: names, shapes, dtype."""
    if not isinstance(params, Params):
        raise TypeError(f"params must be a lora_np Params (from init_params), got {type(params).__name__}")
    if not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a LoraConfig when adapters are given, got {type(lora).__name__}")
    if not isinstance(adapters, dict):
        raise TypeError(f"adapters must be a dict of name -> array, got {type(adapters).__name__}")
    cfg = params.config
    check_rank(cfg, lora)
    expected = adapter_names(cfg, lora)
    missing = [n for n in expected if n not in adapters]
    extra = [n for n in adapters if n not in expected]
    if missing or extra:
        raise ValueError(
            f"adapters do not fit targets={lora.targets} with n_layers={cfg.n_layers}: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}"
        )
    dtype = params["W_e"].dtype
    for name, shape in expected.items():
        a = adapters[name]
        if not isinstance(a, np.ndarray) or a.shape != shape:
            got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"adapter {name} must have shape {shape} for r={lora.r}, got {got}")
        if a.dtype != dtype:
            raise ValueError(f"adapter {name} has dtype {a.dtype}, but the params are {dtype}; cast one to the other")


def delta_weight(adapters, lora, name):
    """ΔW = s·B·A for the weight `name` (e.g. "blocks.0.W_q"), shape (d_out, d_in)."""
    return lora.scaling * (adapters[name + ".B"] @ adapters[name + ".A"])


def merge(params, adapters, lora):
    """W' = W0 + s·B·A for every adapted weight (paper Section 4.1), so inference runs the plain
    model with no extra latency.

    Inputs:
    - params: Params holding W0
    - adapters: dict from init_lora (trained), names "blocks.{l}.{target}.A" (r, d_in) and ".B" (d_out, r)
    - lora: the LoraConfig the adapters were made for; its `scaling` is s

    Returns:
    - merged: a new Params; the adapted weights are new arrays, every other array is shared with
      params (never written to), and params and adapters are left untouched. It records the
      adapters as merged (merged.merged_adapters); merging them into it again is a ValueError.

    (DoRA's W' = m ⊙ V/‖V‖, VeRA's W0 + Λ_b·B·Λ_d·A and a 4-bit base: lora_np.variants.merge_variant.)
    """
    check_adapters(params, adapters, lora)
    if lora.method != "lora" or is_quantized(params):  # DoRA's and VeRA's W' are not W0 + s·B·A
        from ..methods.variants import merge_variant

        return merge_variant(params, adapters, lora)
    # params.copy() that also records these adapters as merged, and refuses them if they already are
    merged = params.with_merged(adapters, lora)  # shallow: arrays LoRA does not adapt are shared
    for l in range(params.config.n_layers):
        for t in lora.targets:
            name = f"blocks.{l}.{t}"
            # s·B·A: (d_out, r) @ (r, d_in), formed once here so that inference never forms it
            delta = lora.scaling * (adapters[name + ".B"] @ adapters[name + ".A"])
            merged[name] = params[name] + delta  # W' = W0 + s·B·A
    return merged


def unmerge(merged, adapters, lora, norms=None):
    """W0 = W' - s·B·A for every adapted weight: the inverse of merge, up to round-off.

    Subtracting the same s·B·A that merge added gives W0 back to within an ulp or so of W0 + s·B·A,
    not bit for bit: (W0 + Δ) - Δ rounds twice.

    Inputs and Returns as in merge, with `merged` in place of params. `norms` only for DoRA,
    whose merged weight has lost the norms it needs (lora_np.variants.dora_norms explains).
    Adapters that merge did not fold into `merged` are refused (ValueError), not subtracted.
    """
    check_adapters(merged, adapters, lora)
    if lora.method != "lora":
        from ..methods.variants import unmerge_variant

        return unmerge_variant(merged, adapters, lora, norms)
    params = merged.without_merged(adapters, lora)  # merged.copy(), minus these adapters in its record
    for l in range(merged.config.n_layers):
        for t in lora.targets:
            name = f"blocks.{l}.{t}"
            delta = lora.scaling * (adapters[name + ".B"] @ adapters[name + ".A"])  # s·B·A, as merge formed it
            params[name] = merged[name] - delta  # W0 = W' - s·B·A
    return params
