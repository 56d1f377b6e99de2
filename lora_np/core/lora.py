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

The seam. Plain LoRA is written out here and in model.py. A method that came after it (DoRA,
VeRA, the paper's adapter baselines, PiSSA's start, QLoRA's 4-bit base: lora_np/methods/) plugs in
with one call from its own module, register(extension, methods): what LoraConfig accepts for it
(config.EXTENSIONS) and, for a method of its own, a Method (METHODS): the arrays it needs, how it
starts, how an adapted weight runs forward and backward, the layers it inserts into a block at
SLOTS, how it merges. The core looks a method up there when LoraConfig.method is not "lora", and
names none of them.

Dimension legend: r rank, d_in / d_out the adapted weight's input / output width.
"""

from types import MappingProxyType

import numpy as np

from .config import EXTENSIONS, Extension, LoraConfig, ModelConfig
from .params import Params, check_params, check_seed

# ----------------------------------------------------------------------------
# the seam: every method other than plain LoRA


class Method:
    """A method other than plain LoRA, as the core sees it.

    Its own module (lora_np/methods/) subclasses this and adds an instance to METHODS under its
    LoraConfig.method name. Where LoRA has an answer, it is the default here.

    - names(cfg, lora) -> {name: shape}: its adapter arrays, in a fixed order
    - init(cfg, lora, seed) -> adapters: fresh arrays that leave the model exactly the base model
    - frozen_prefix: adapter names starting with it are never trained (None: every array trains)
    - check_rank(cfg, lora): ValueError unless r fits the model
    - linear_forward(x, W, b, adapters, name, lora, dropout, rng) -> (out, cache), and
      linear_backward(dout, cache, name, want) -> (dx, {name: gradient, for the names in want}):
      the pair that replaces lora_linear_forward/backward for the adapted weight `name`
    - layers: {slot: (forward, backward)}, layers the method inserts into every block at SLOTS,
      forward(h, adapters, prefix) -> (out, cache) and backward(dout, cache, prefix, want, grads)
      -> dh (the gradients of its arrays written into grads), with prefix "blocks.{l}."
    - merge(params, adapters, lora) -> merged and unmerge(merged, adapters, lora, norms) -> params,
      as merge and unmerge below
    """

    frozen_prefix = None
    layers = MappingProxyType({})  # none; a method that inserts layers sets its own

    def names(self, cfg, lora):
        raise NotImplementedError

    def init(self, cfg, lora, seed):
        raise NotImplementedError

    def check_rank(self, cfg, lora):
        check_rank_of_targets(cfg, lora)

    def linear_forward(self, x, W, b, adapters, name, lora, dropout, rng):
        raise NotImplementedError

    def linear_backward(self, dout, cache, name, want):
        raise NotImplementedError

    def merge(self, params, adapters, lora):
        raise NotImplementedError

    def unmerge(self, merged, adapters, lora, norms=None):
        raise NotImplementedError


# Where a method may insert a layer of its own into each block (Method.layers), by model.py's stages
SLOTS = (
    "after_attn",  # 4a. on y·W_oᵀ + b_o, before the residual add of stage 4
    "after_mlp",  # 8a. on z·W_2ᵀ + b_2, before the residual add of stage 8
    "after_block",  # 9. on x, after the residual add of stage 8
)

METHODS = {}  # LoraConfig.method -> Method, for every method but "lora" (register fills it)


def register(name, extension, methods=None):
    """Plug a later method into the core: `extension` (config.Extension) into config.EXTENSIONS under
    `name`, and a Method for each value of LoraConfig.method it adds into METHODS. Checked here, so
    that a mistake fails at import, not as a model that silently skips a layer: every method the
    extension names has its Method and no other; every layer sits at one of SLOTS."""
    methods = {} if methods is None else dict(methods)
    if not isinstance(extension, Extension):
        raise TypeError(f"extension must be a lora_np.core.config.Extension, got {type(extension).__name__}")
    if set(methods) != set(extension.methods):
        raise ValueError(f"{name}: the extension adds methods {sorted(extension.methods)} but Methods are given for "
                         f"{sorted(methods)}; give one Method for each")  # fmt: skip
    for method, m in methods.items():
        if not isinstance(m, Method):
            raise TypeError(f"{name}: METHODS[{method!r}] must be a lora_np.core.lora.Method, got {type(m).__name__}")
        unknown = sorted(set(m.layers) - set(SLOTS))
        if unknown:
            raise ValueError(f"{name}: method {method!r} inserts layers at {unknown}; the slots are {SLOTS}")
    EXTENSIONS[name] = extension
    METHODS.update(methods)


def adapter_names(cfg, lora):
    """The adapter arrays a model needs, as {name: shape}, in a fixed order (blocks, targets, A then B).

    LoRA: A (r, d_in) and B (d_out, r) per adapted weight. Another method: its own (Method.names).
    """
    if lora.method != "lora":
        return METHODS[lora.method].names(cfg, lora)
    names = {}
    for l in range(cfg.n_layers):
        for t in lora.targets:
            d_out, d_in = cfg.linear_shape(t)
            names[f"blocks.{l}.{t}.A"] = (lora.r, d_in)
            names[f"blocks.{l}.{t}.B"] = (d_out, lora.r)
    return names


def trainable_adapters(adapters):
    """The names of the adapter arrays that train: all but those a method keeps frozen (Method.frozen_prefix)."""
    frozen = tuple(m.frozen_prefix for m in METHODS.values() if m.frozen_prefix)
    return [name for name in adapters if not name.startswith(frozen)]


def check_rank_of_targets(cfg, lora):
    """r must not exceed min(d_out, d_in) of any target: beyond it B·A cannot gain rank."""
    for t in lora.targets:
        d_out, d_in = cfg.linear_shape(t)
        if lora.r > min(d_out, d_in):
            raise ValueError(
                f"r must be between 1 and min(d_out, d_in) = {min(d_out, d_in)} for target {t} "
                f"of shape (d_out, d_in) = {(d_out, d_in)}, got r={lora.r}"
            )


def check_rank(cfg, lora):
    """ValueError unless r fits the model: for LoRA, r <= min(d_out, d_in) of every target."""
    if lora.method != "lora":
        return METHODS[lora.method].check_rank(cfg, lora)
    check_rank_of_targets(cfg, lora)


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
    if lora.method != "lora":
        return METHODS[lora.method].init(cfg, lora, seed)
    if lora.init not in ("gaussian", "kaiming"):  # an init computed from W0 needs the base weights
        raise ValueError(f"init={lora.init!r} initializes from the base weights W0: use "
                         f"init_adapters(params, lora, seed), which returns (params, adapters)")
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


def init_adapters(params, lora, seed):
    """Every method's starting point, from the base weights: (params to train on, adapters).

    LoRA's is init_lora's, in the params' dtype, on the base as it is. A later method whose start
    needs the base weights gives its own in its Extension (start): PiSSA's A, B from W0's singular
    triplets and the residual base, DoRA's magnitude m = ‖W0‖, QLoRA's 4-bit copy of the base.
    Every start leaves the model exactly the base model, or to round-off where an SVD is involved.
    """
    check_params(params)
    if not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a LoraConfig, got {type(lora).__name__}")
    check_seed(seed)
    for extension in EXTENSIONS.values():
        if extension.start is not None and extension.owns(lora):
            return extension.start(params, lora, seed)
    dtype = params["W_e"].dtype
    return params, {k: v.astype(dtype) for k, v in init_lora(params.config, lora, seed).items()}


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

    A weight stored in another format (a quantized base) is merged as the array it stands for, and
    every such weight comes back as that array: the merged model is a plain one. Another method
    merges its own way (Method.merge: DoRA's W' = m ⊙ V/‖V‖, VeRA's W0 + Λ_b·B·Λ_d·A).
    """
    check_adapters(params, adapters, lora)
    if lora.method != "lora":
        return METHODS[lora.method].merge(params, adapters, lora)
    # params.copy() that also records these adapters as merged, and refuses them if they already are
    merged = params.with_merged(adapters, lora)  # shallow: arrays LoRA does not adapt are shared
    merged.update({k: np.asarray(v) for k, v in params.items() if not isinstance(v, np.ndarray)})
    for l in range(params.config.n_layers):
        for t in lora.targets:
            name = f"blocks.{l}.{t}"
            # s·B·A: (d_out, r) @ (r, d_in), formed once here so that inference never forms it
            delta = lora.scaling * (adapters[name + ".B"] @ adapters[name + ".A"])
            merged[name] = merged[name] + delta  # W' = W0 + s·B·A
    return merged


def unmerge(merged, adapters, lora, norms=None):
    """W0 = W' - s·B·A for every adapted weight: the inverse of merge, up to round-off.

    Subtracting the same s·B·A that merge added gives W0 back to within an ulp or so of W0 + s·B·A,
    not bit for bit: (W0 + Δ) - Δ rounds twice.

    Inputs and Returns as in merge, with `merged` in place of params. `norms` is for a method whose
    merged weight has lost what unmerging needs (DoRA: lora_np.variants.dora_norms explains); LoRA's
    does not, and ignores it.
    Adapters that merge did not fold into `merged` are refused (ValueError), not subtracted.
    """
    check_adapters(merged, adapters, lora)
    if lora.method != "lora":
        return METHODS[lora.method].unmerge(merged, adapters, lora, norms)
    params = merged.without_merged(adapters, lora)  # merged.copy(), minus these adapters in its record
    for l in range(merged.config.n_layers):
        for t in lora.targets:
            name = f"blocks.{l}.{t}"
            delta = lora.scaling * (adapters[name + ".B"] @ adapters[name + ".A"])  # s·B·A, as merge formed it
            params[name] = merged[name] - delta  # W0 = W' - s·B·A
    return params
