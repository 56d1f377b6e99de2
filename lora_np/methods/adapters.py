"""Adapter layers, the baselines LoRA is measured against (paper Sections 3 and 5.1, Table 1).

The paper, Section 5.1: "Adapter tuning as proposed in Houlsby et al. (2019) inserts adapter layers
between the self-attention module (and the MLP module) and the subsequent residual connection. There
are two fully connected layers with biases in an adapter layer with a nonlinearity in between. We call
this original design AdapterH. Recently, Lin et al. (2020) proposed a more efficient design with the
adapter layer applied only after the MLP module and after a LayerNorm. We call it AdapterL." (It also
names AdapterP, Pfeiffer et al. 2021, "very similar" to AdapterL, and AdapterD, AdapterDrop, which
drops some adapter layers; neither is built here.) An adapter layer, in column form:

    Adapter(h) = h + W_up·f(W_down·h + b_down) + b_up      W_down (r, D), W_up (D, r), r ≪ D

and in the pre-LN block of model.py (numbers are model.py's stages, names core.lora's SLOTS):

    AdapterH   4a.  x = x + Adapter(y·W_oᵀ + b_o)       after attention's output projection ("after_attn")
               8a.  x = x + Adapter(z·W_2ᵀ + b_2)       after the MLP ("after_mlp"), both before the residual add
    AdapterL   9.   x = x + Adapter'(LN_a(x))           one a block, after the MLP's residual add ("after_block"),
                                                        behind a LayerNorm of its own

AdapterL's place follows Lin et al.'s code (zlinao/VGLM, pytorch_transformers/modeling_vlm.py: the
block computes x = x + mlp(ln_2(x)), then x + up(relu(down(ln(x))))). Its residual adds the
branch to x itself, not to LN_a(x).

The nonlinearity f: GELU for AdapterH, as Houlsby et al.'s code (google-research/adapter-bert,
modeling.py, feedforward_adapter) has it, in the tanh form of layers.gelu_forward; ReLU for
AdapterL, as Lin et al.'s code has it (nn.ReLU).

Trainable numbers (Section 5.1): |Θ| = L̂_Adpt·(2·d_model·r + r + d_model) + 2·L̂_LN·d_model, with
L̂_Adpt adapter layers and L̂_LN trainable LayerNorms. Here AdapterH has L̂_Adpt = 2·n_layers and
L̂_LN = 0; AdapterL has L̂_Adpt = L̂_LN = n_layers.

Initialization. W_up = 0 and b_up = 0, so every adapter is exactly the identity and the adapted
model starts as exactly the base, as LoRA's B = 0 makes it (Section 4.1). Houlsby et al. draw both
projections from a truncated normal of standard deviation 10⁻³ instead ("near-identity"); a zero
W_up makes it exact, and the tests can then ask for equality. As with LoRA's A, W_down must then
not be small: at step 0 only W_up and b_up have a gradient (W_down's flows through W_up = 0), and
∂L/∂W_up = g·f(W_down·h)ᵀ is only as large as f(W_down·h). W_down ~ N(0, 1/D), LoRA's A, keeps
W_down·h at the scale of h. b_down = 0; AdapterL's LayerNorm starts at gamma = 1, beta = 0.

Why adapters cost latency and LoRA does not (Section 3): an adapter is a new layer in the path of
every token, computed after the sublayer before it and before the one after it ("adapter layers have
to be processed sequentially"); it cannot be merged into a weight, as f lies between its two
projections. Merged LoRA runs the base's exact architecture (W' = W0 + s·B·A, Section 4.1).
lora_np.studies.latency measures both on lora_np's own forward.

Dimension legend: N positions (any leading shape, usually B·T), D model width, r bottleneck width.

References
- Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", ICML.
- Lin, Madotto & Fung 2020, "Exploring Versatile Generative Language Model Via Parameter-Efficient
  Transfer Learning", Findings of EMNLP.
- Hu et al. 2021, "LoRA", Section 3 ("Adapter Layers Introduce Inference Latency"), Table 1, Section 5.1.
"""


import numpy as np

from ..core.config import Extension
from ..core.layers import (
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from ..core.lora import Method, register

ADAPTER_METHODS = ("adapter_h", "adapter_l")  # LoraConfig.method values: AdapterH, AdapterL

# ----------------------------------------------------------------------------
# ReLU (AdapterL's nonlinearity; GELU is in layers.py)


def relu_forward(x):
    """out = max(x, 0). Returns (out, cache); the cache is the mask x > 0, all backward needs."""
    mask = x > 0
    return x * mask, mask


def relu_backward(dout, cache):
    """Backward of relu_forward: the gradient passes where x > 0 and stops elsewhere (at x = 0 too)."""
    return dout * cache


ACTIVATIONS = {"gelu": (gelu_forward, gelu_backward), "relu": (relu_forward, relu_backward)}


def _check_act(act):
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")


# ----------------------------------------------------------------------------
# the bottleneck: v = W_up·f(W_down·h + b_down) + b_up, no residual


def bottleneck_forward(h, W_down, b_down, W_up, b_up, act="gelu"):
    """An adapter's branch: down to r, a nonlinearity, back up to D.

    v = W_up·f(W_down·h + b_down) + b_up in column form.

    Inputs:
    - h: (..., D)
    - W_down: (r, D), b_down: (r,)
    - W_up: (D, r), b_up: (D,)
    - act: "gelu" or "relu", the f

    Returns:
    - v: (..., D)
    - cache: (c_down, act, c_act, c_up). Cached: the input h (in c_down, for ∂L/∂W_down), and
      the r-wide u = W_down·h + b_down and a = f(u) (in c_act and c_up); nothing D-wide is made.
    """
    _check_act(act)
    u, c_down = linear_forward(h, W_down, b_down)  # 1. (..., r)
    a, c_act = ACTIVATIONS[act][0](u)  # 2. (..., r)
    v, c_up = linear_forward(a, W_up, b_up)  # 3. (..., D)
    return v, (c_down, act, c_act, c_up)


def bottleneck_backward(dout, cache, *, need_dW_down=True, need_db_down=True, need_dW_up=True, need_db_up=True):
    """Backward of bottleneck_forward, stages 3, 2, 1. A gradient not asked for is None.

    With g = ∂L/∂v: ∂L/∂W_up = g·aᵀ, ∂L/∂b_up = g, ∂L/∂a = W_upᵀ·g, ∂L/∂u = f'(u) ⊙ ∂L/∂a,
    ∂L/∂W_down = (∂L/∂u)·hᵀ, ∂L/∂b_down = ∂L/∂u, ∂L/∂h = W_downᵀ·(∂L/∂u).

    Returns:
    - dh: (..., D)
    - dW_down: (r, D), db_down: (r,), dW_up: (D, r), db_up: (D,), or None each
    """
    c_down, act, c_act, c_up = cache
    # 3. v = a·W_upᵀ + b_up
    da, dW_up, db_up = linear_backward(dout, c_up, need_dW=need_dW_up, need_db=need_db_up)
    du = ACTIVATIONS[act][1](da, c_act)  # 2. a = f(u)
    # 1. u = h·W_downᵀ + b_down
    dh, dW_down, db_down = linear_backward(du, c_down, need_dW=need_dW_down, need_db=need_db_down)
    return dh, dW_down, db_down, dW_up, db_up


# ----------------------------------------------------------------------------
# AdapterH's layer (Houlsby et al.): out = h + bottleneck(h)


def adapter_forward(h, W_down, b_down, W_up, b_up, act="gelu"):
    """A Houlsby adapter layer: out = h + W_up·f(W_down·h + b_down) + b_up.

    Inputs and cache as in bottleneck_forward; h (..., D), and out has h's shape. With W_up = 0 and
    b_up = 0 (the initialization) out is h exactly.
    """
    v, cache = bottleneck_forward(h, W_down, b_down, W_up, b_up, act)  # 1-3.
    v += h  # 4. the adapter's own skip connection, in place: v is a fresh array, and not cached
    return v, cache


def adapter_backward(dout, cache, **need):
    """Backward of adapter_forward: (dh, dW_down, db_down, dW_up, db_up); `need` as in bottleneck_backward."""
    # 4. out = h + v: dout reaches v, and h unchanged through the skip
    dh, dW_down, db_down, dW_up, db_up = bottleneck_backward(dout, cache, **need)  # 3-1.
    return dout + dh, dW_down, db_down, dW_up, db_up


# ----------------------------------------------------------------------------
# AdapterL's layer (Lin et al.): out = x + bottleneck(LN(x))


def adapter_ln_forward(x, gamma, beta, W_down, b_down, W_up, b_up, act="relu"):
    """A Lin et al. adapter layer: out = x + W_up·f(W_down·LN(x) + b_down) + b_up.

    Inputs:
    - x: (..., D)
    - gamma, beta: (D,), the adapter's own LayerNorm
    - the rest as in bottleneck_forward

    Returns:
    - out: (..., D)
    - cache: (c_ln, c_bottleneck)
    """
    n, c_ln = layernorm_forward(x, gamma, beta)  # 1. (..., D)
    v, c_b = bottleneck_forward(n, W_down, b_down, W_up, b_up, act)  # 2-4.
    v += x  # 5. the skip adds x, not LN(x); in place, as v is a fresh array and not cached
    return v, (c_ln, c_b)


def adapter_ln_backward(dout, cache, *, need_dgamma=True, need_dbeta=True, **need):
    """Backward of adapter_ln_forward: (dx, dgamma, dbeta, dW_down, db_down, dW_up, db_up)."""
    c_ln, c_b = cache
    # 5. out = x + v
    dn, dW_down, db_down, dW_up, db_up = bottleneck_backward(dout, c_b, **need)  # 4-2.
    # 1. n = LN(x); x also reached out through the skip
    dx, dgamma, dbeta = layernorm_backward(dn, c_ln, need_dgamma=need_dgamma, need_dbeta=need_dbeta)
    return dout + dx, dgamma, dbeta, dW_down, db_down, dW_up, db_up


# ----------------------------------------------------------------------------
# the arrays of a model's adapters


def adapter_layer_names(cfg, lora):
    """{name: shape} of every adapter array, in the order of the forward pass.

    AdapterH: blocks.{l}.adapter_attn.* and blocks.{l}.adapter_mlp.*, each W_down (r, D), b_down (r,),
    W_up (D, r), b_up (D,). AdapterL: blocks.{l}.adapter.ln.gamma, .ln.beta (D,) and the same four.
    """
    if lora.method not in ADAPTER_METHODS:
        raise ValueError(f"adapter_layer_names is for method in {ADAPTER_METHODS}, got {lora.method!r}")
    D, r = cfg.d_model, lora.r
    names = {}
    for l in range(cfg.n_layers):
        places = ("adapter_attn", "adapter_mlp") if lora.method == "adapter_h" else ("adapter",)
        for place in places:
            p = f"blocks.{l}.{place}."
            if lora.method == "adapter_l":
                names.update({p + "ln.gamma": (D,), p + "ln.beta": (D,)})
            names.update({p + "W_down": (r, D), p + "b_down": (r,), p + "W_up": (D, r), p + "b_up": (D,)})
    return names


def init_adapter_layers(cfg, lora, seed):
    """Adapters that start as the identity: W_down ~ N(0, 1/D), W_up, b_down, b_up = 0, gamma = 1, beta = 0.

    float64, names and shapes as in adapter_layer_names (init_lora hands adapter configs here).
    """
    rng = np.random.default_rng(seed)
    adapters = {}
    for name, shape in adapter_layer_names(cfg, lora).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "W_down":  # LoRA's A: each entry of W_down·h at the scale of one entry of h
            adapters[name] = rng.normal(0.0, 1.0 / np.sqrt(cfg.d_model), size=shape)
        elif leaf == "gamma":
            adapters[name] = np.ones(shape)
        else:  # W_up = 0 (LoRA's B): the adapter is exactly the identity, the model exactly the base
            adapters[name] = np.zeros(shape)
    return adapters


# ----------------------------------------------------------------------------
# the adapter baselines in the model: the core's seam (lora_np.core.lora.register), filled

_BOTTLENECK = ("W_down", "b_down", "W_up", "b_up")
_PLACES = {  # method -> {core.lora.SLOTS slot: the name of its layer's arrays in a block}
    "adapter_h": {"after_attn": "adapter_attn", "after_mlp": "adapter_mlp"},
    "adapter_l": {"after_block": "adapter"},
}


def _layer_pair(place):
    """(forward, backward) for the adapter layer named `place` in each block, as model.block_forward calls them."""

    def forward(h, adapters, prefix):
        name = prefix + place
        w = [adapters[f"{name}.{k}"] for k in _BOTTLENECK]
        if place == "adapter":  # AdapterL: behind a LayerNorm of its own, ReLU
            return adapter_ln_forward(h, adapters[name + ".ln.gamma"], adapters[name + ".ln.beta"], *w, act="relu")
        return adapter_forward(h, *w, act="gelu")  # AdapterH: GELU

    def backward(dout, cache, prefix, want, grads):
        name = prefix + place
        need = {f"need_d{k}": f"{name}.{k}" in want for k in _BOTTLENECK}
        if place == "adapter":
            dh, *g = adapter_ln_backward(dout, cache, need_dgamma=name + ".ln.gamma" in want,
                                         need_dbeta=name + ".ln.beta" in want, **need)  # fmt: skip
            keys = ("ln.gamma", "ln.beta", *_BOTTLENECK)
        else:
            dh, *g = adapter_backward(dout, cache, **need)
            keys = _BOTTLENECK
        grads.update({f"{name}.{k}": gk for k, gk in zip(keys, g, strict=True) if gk is not None})
        return dh

    return forward, backward


def refuse_merge(lora, what):
    """ValueError: an adapter layer cannot be merged into a weight (`what`: "merged" or "unmerged")."""
    raise ValueError(
        f"method={lora.method!r} adapters cannot be {what}: an adapter is an extra layer, h + W_up·f(W_down·h), "
        f"with a nonlinearity f between its projections, not an update ΔW to a weight; inference has to run "
        f"it after the layer before it (the added latency of the LoRA paper's Table 1). LoRA, DoRA and VeRA "
        f"change weights, and merge into them"
    )


class AdapterLayers(Method):
    """AdapterH or AdapterL: layers inserted into every block, no adapted weight (targets are ())."""

    def __init__(self, method):
        self.layers = {slot: _layer_pair(place) for slot, place in _PLACES[method].items()}

    def names(self, cfg, lora):
        return adapter_layer_names(cfg, lora)

    def init(self, cfg, lora, seed):
        return init_adapter_layers(cfg, lora, seed)

    def check_rank(self, cfg, lora):
        if lora.r > cfg.d_model:
            raise ValueError(f"r is the bottleneck width of method={lora.method!r} and must be between 1 and "
                             f"d_model = {cfg.d_model}, got r={lora.r}")  # fmt: skip

    def merge(self, params, adapters, lora):
        refuse_merge(lora, "merged")

    def unmerge(self, merged, adapters, lora, norms=None):
        refuse_merge(lora, "unmerged")


def _check_config(cfg):
    if cfg.method in ADAPTER_METHODS:
        defaults = {"alpha": 4.0, "dropout": 0.0, "init": "gaussian", "rslora": False, "lr_ratio": 1.0,
                    "base_quant": None}  # fmt: skip
        changed = {k: getattr(cfg, k) for k, v in defaults.items() if getattr(cfg, k) != v}
        if changed:
            raise ValueError(
                f"method={cfg.method!r} is an adapter (r = its bottleneck width): it has no scaling alpha/r, no "
                f"dropout on A, no initialization of A and B to choose, no lr_B/lr_A and no quantized base; leave "
                f"{', '.join(defaults)} at their defaults, got " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
            )


register("adapters", Extension(methods=ADAPTER_METHODS, layer_methods=ADAPTER_METHODS, check=_check_config),
         {m: AdapterLayers(m) for m in ADAPTER_METHODS})
