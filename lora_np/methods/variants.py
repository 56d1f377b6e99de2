"""LoRA's successors on the whole model: initialization, merging, and QLoRA's quantized base.

Each method is a layer pair of its own (dora.py, vera.py; LoRA itself in layers.py) that
model.py calls for an adapted weight according to `lora.method`. This module does what needs
the whole model or the base weights:

- init_adapters(params, lora, seed) -> (params, adapters): every method's starting point, which
  for each is exactly (or, with an SVD, to round-off) the base model:
    LoRA       A random, B = 0                                 (Hu et al. 2021, Section 4.1)
    PiSSA      A, B from W0's top-r singular triplets, W0 replaced by the residual W0 - s·B·A
               (Meng et al. 2024)
    DoRA       LoRA's A, B and the magnitude m = the row norms of W0 (Liu et al. 2024)
    VeRA       one frozen random pair (A, B) per weight shape shared by every layer, lambda_b = 0
               and lambda_d = 0.1 (Kopiczko et al. 2024)
    QLoRA      LoRA on a base whose blocks' linear weights are stored as 4-bit NormalFloat
               (Dettmers et al. 2023); the forward dequantizes each weight for its product
- merge_variant / unmerge_variant: W' for DoRA, VeRA and a quantized base (lora.merge calls them);
- lr_scales(adapters, lora): LoRA+'s learning rates (Hayou et al. 2024), B's λ times A's.

The paper's adapter baselines (method "adapter_h", "adapter_l": lora_np.adapters) start here too,
as the identity (W_up = 0), and are refused by merge_variant: they are layers, not a ΔW.

LoRA+'s argument in two lines: at large width, with one learning rate for A and B, either B's
update is too small to learn features or A's is so large it is unstable; with η_B = λ·η_A
(λ ≫ 1, the paper recommends 2^4 = 16) both move the output at the same order (Section 3).
"""

import numpy as np

from ..core.config import ADAPTER_METHODS, LoraConfig
from ..core.lora import VERA_SHARED, check_adapters, init_lora, trainable_adapters, vera_shared
from ..core.params import QUANTIZABLE, check_params, check_seed
from .dora import dora_merge, dora_unmerge, dora_weight_norm
from .nf4 import NF4Tensor, quantize_nf4
from .pissa import pissa_factors
from .vera import VERA_D_INIT, vera_shared_init


def _adapted(cfg, lora):
    return [(f"blocks.{l}.{t}", t) for l in range(cfg.n_layers) for t in lora.targets]


def init_vera(cfg, lora, seed):
    """VeRA's adapters: the shared frozen (A, B) per weight shape, lambda_d = 0.1, lambda_b = 0."""
    rng = np.random.default_rng(seed)
    adapters = {}
    for t in lora.targets:  # one pair per shape, drawn in the order of the targets
        d_out, d_in = cfg.linear_shape(t)
        key = f"{VERA_SHARED}{d_out}x{d_in}"
        if key + ".A" not in adapters:
            adapters[key + ".A"], adapters[key + ".B"] = vera_shared_init(d_out, d_in, lora.r, rng)
    for name, t in _adapted(cfg, lora):
        d_out, _ = cfg.linear_shape(t)
        adapters[name + ".lambda_d"] = np.full(lora.r, VERA_D_INIT)
        adapters[name + ".lambda_b"] = np.zeros(d_out)  # 0: the start is exactly the base model
    return adapters


def init_adapters(params, lora, seed):
    """Every method's starting point, from the base weights: (params to train on, adapters).

    The params returned are the base itself, except under PiSSA (the residual W0 - s·B·A
    replaces each adapted W0) and with base_quant="nf4" (the blocks' linear weights become
    NF4Tensors). Adapters come in the params' dtype. The adapter methods' layers start as the
    identity (lora_np.adapters.init_adapter_layers), so the model starts as exactly the base.
    """
    check_params(params)
    if not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a LoraConfig, got {type(lora).__name__}")
    check_seed(seed)
    cfg, dtype = params.config, params["W_e"].dtype
    if lora.init == "pissa":
        base, adapters = params.copy(), {}
        for name, _ in _adapted(cfg, lora):
            A, B, residual = pissa_factors(params[name].astype(np.float64), lora.r, lora.scaling)
            adapters[name + ".A"], adapters[name + ".B"] = A.astype(dtype), B.astype(dtype)
            base[name] = residual.astype(dtype)
        return base, adapters
    if lora.method == "dora":
        plain = LoraConfig(r=lora.r, alpha=lora.alpha, targets=lora.targets, init=lora.init, rslora=lora.rslora)
        adapters = {k: v.astype(dtype) for k, v in init_lora(cfg, plain, seed).items()}
        for name, _ in _adapted(cfg, lora):
            A, B = adapters[name + ".A"], adapters[name + ".B"]
            # m = ‖W0‖ by the very function the forward uses, with B = 0: m/‖V‖ is then 1.0 exactly
            adapters[name + ".m"] = dora_weight_norm(params[name], A, B, lora.scaling)
        return params, adapters
    adapters = {k: v.astype(dtype) for k, v in init_lora(cfg, lora, seed).items()}
    return (quantize_base(params, lora) if lora.base_quant else params), adapters


def quantize_base(params, lora):
    """A Params whose blocks' linear weights are NF4Tensors (QLoRA's base); everything else shared."""
    out = params.copy()
    for name in params:
        if name.rsplit(".", 1)[-1] in QUANTIZABLE:
            out[name] = quantize_nf4(params[name], double_quant=lora.double_quant, dtype=params[name].dtype)
    return out


def lr_scales(adapters, lora):
    """LoRA+: {name: λ} for every B, so AdamW's learning rate for B is λ times A's (λ = lora.lr_ratio)."""
    if lora.lr_ratio == 1.0:
        return {}
    return {name: lora.lr_ratio for name in trainable_adapters(adapters) if name.endswith(".B")}


def _weight(params, name):
    W = params[name]
    return W.dequantize() if isinstance(W, NF4Tensor) else W


def dora_norms(params, adapters, lora):
    """{name: ‖W0 + s·B·A‖ per row} for DoRA's adapted weights: what unmerge needs and a merged
    weight has lost. W' = m ⊙ V/‖V‖ keeps only V's direction row by row; any positive multiple of
    that direction, minus s·B·A, is a W0 that merges to the same W'."""
    return {name: dora_weight_norm(params[name], adapters[name + ".A"], adapters[name + ".B"], lora.scaling)
            for name, _ in _adapted(params.config, lora)}  # fmt: skip


def _refuse_adapter_layers(lora, what):
    if lora.method in ADAPTER_METHODS:
        raise ValueError(
            f"method={lora.method!r} adapters cannot be {what}: an adapter is an extra layer, h + W_up·f(W_down·h), "
            f"with a nonlinearity f between its projections, not an update ΔW to a weight; inference has to run "
            f"it after the layer before it (the added latency of the LoRA paper's Table 1). LoRA, DoRA and VeRA "
            f"change weights, and merge into them"
        )


def merge_variant(params, adapters, lora):
    """W' for DoRA (m ⊙ V/‖V‖), VeRA (W0 + Λ_b·B·Λ_d·A) or LoRA on a quantized base (W0 dequantized
    + s·B·A, in the compute dtype: the merged model is not re-quantized). Returns a new Params that
    records the adapters as merged; adapters already merged into params are refused (ValueError).
    Adapter layers (method "adapter_h", "adapter_l") are refused: they cannot be merged."""
    _refuse_adapter_layers(lora, "merged")
    check_adapters(params, adapters, lora)
    cfg = params.config
    merged = params.with_merged(adapters, lora)  # a copy with its record; refuses adapters merged before
    merged.update({k: _weight(params, k) for k in params})  # a quantized base is dequantized
    for name, t in _adapted(cfg, lora):
        W0 = merged[name]
        if lora.method == "dora":
            merged[name] = dora_merge(W0, adapters[name + ".A"], adapters[name + ".B"], adapters[name + ".m"],
                                      lora.scaling)  # fmt: skip
        elif lora.method == "vera":
            A, B = vera_shared(adapters, cfg, t)
            # Λ_b·B·Λ_d·A: scale B's rows by lambda_b and A's rows by lambda_d, then one (d_out, r) @ (r, d_in)
            lb, ld = adapters[name + ".lambda_b"], adapters[name + ".lambda_d"]
            merged[name] = W0 + (lb[:, None] * B) @ (ld[:, None] * A)
        else:
            merged[name] = W0 + lora.scaling * (adapters[name + ".B"] @ adapters[name + ".A"])
    return merged


def unmerge_variant(merged, adapters, lora, norms=None):
    """The inverse of merge_variant. DoRA needs `norms` = dora_norms(base, adapters, lora), taken
    before merging: the merged weight cannot give them back. Adapters that were not merged into
    `merged` are refused (ValueError)."""
    _refuse_adapter_layers(lora, "unmerged")
    check_adapters(merged, adapters, lora)
    cfg = merged.config
    if lora.method == "dora" and (not isinstance(norms, dict) or set(norms) != {n for n, _ in _adapted(cfg, lora)}):
        raise ValueError("unmerging DoRA needs norms = lora_np.variants.dora_norms(base, adapters, lora), taken "
                         "before merging: W' = m ⊙ V/‖V‖ keeps V's direction but not its norm")  # fmt: skip
    params = merged.without_merged(adapters, lora)  # refuses adapters that were never merged
    for name, t in _adapted(cfg, lora):
        W = merged[name]
        if lora.method == "dora":
            params[name] = dora_unmerge(W, adapters[name + ".A"], adapters[name + ".B"], adapters[name + ".m"],
                                        lora.scaling, norms[name])  # fmt: skip
        elif lora.method == "vera":
            A, B = vera_shared(adapters, cfg, t)
            lb, ld = adapters[name + ".lambda_b"], adapters[name + ".lambda_d"]
            params[name] = W - (lb[:, None] * B) @ (ld[:, None] * A)  # W0 = W' - Λ_b·B·Λ_d·A, as merged
        else:
            params[name] = W - lora.scaling * (adapters[name + ".B"] @ adapters[name + ".A"])
    return params
