"""VeRA: a frozen random low-rank pair shared by every layer, and two trainable vectors per layer.

LoRA trains B and A in every adapted layer. VeRA (Kopiczko et al. 2024) freezes them instead:
one random pair (A, B), drawn once and shared by every adapted layer of the same shape, and each
layer trains only two vectors that scale it (paper Section 3, "h = W0x + ΔWx = W0x + Λ_bBΛ_dAx"; in
column form, with the layer's bias):

    h = W0·x + b + Λ_b·B·Λ_d·A·x,    Λ_d = diag(lambda_d) (r, r),  Λ_b = diag(lambda_b) (d_out, d_out)

lambda_d scales A's r outputs and lambda_b scales B's d_out outputs. (The paper calls them d and
b; here b is already the layer's bias, so the vectors are lambda_d and lambda_b, PEFT's names
vera_lambda_d and vera_lambda_b.) There is no scaling s: the vectors are the scale.

Trainable numbers per adapted layer: r + d_out, against LoRA's r·(d_in + d_out) (the paper's
"parameter count" in Section 3: |Θ| = L_tuned·(d_model + r) for VeRA against 2·L_tuned·d_model·r
for LoRA). A and B can be regenerated from a seed, so a checkpoint need not store them.

Sharing: here one pair serves every layer of one shape (d_out, d_in), and layers of another shape
get a pair of their own. PEFT instead draws a single pair sized for the largest adapted shape and
slices it per layer (vera_A[:, :d_in], vera_B[:d_out, :]), so a smaller layer's slice keeps the
larger layer's Kaiming bound.

Initialization (paper Section 3, "initialization strategies"):
- A and B: Kaiming initialization, frozen. PEFT (src/peft/tuners/vera/model.py, `_kaiming_init`)
  draws both from U(-bound, bound) with bound = sqrt(3)·sqrt(2)/sqrt(fan_in) = sqrt(6/fan_in), where
  fan_in is the number of columns: d_in for A (r, d_in) and r for B (d_out, r). Each entry of A·x
  then has variance 2·Var(x) and each entry of B·A·x 4·Var(x), whatever r is: the paper's reason
  for Kaiming, a variance of the product that is the same for all ranks. (The paper's ablation
  study, its Table 6, also tries other initializations of A and B; PEFT uses Kaiming uniform.)
- lambda_b = 0, like LoRA's B = 0: the start is exactly the base model.
- lambda_d = one non-zero constant in every entry. PEFT's VeraConfig.d_initial defaults to 0.1:
  "Small values (<=0.1) are recommended (see Table 6c in the paper)". VERA_D_INIT below.

Consequence of lambda_b = 0, as of LoRA's B = 0: at the start ∂L/∂lambda_d is exactly zero (the
gradient reaches lambda_d only through Λ_b), and only lambda_b gets a gradient on the first step.

Frozen means not computed: W0, b, A and B get no gradient slot in the backward; the trainable
vectors get `need_d*` flags (layers.py's convention). Nothing d_out × d_in is ever formed: the
adapter path is two thin products, (N, d_in) @ (d_in, r) and (N, r) @ (r, d_out).

Dimension legend: N positions (B·T, or any leading shape flattened), d_in / d_out the layer's
input / output width, r the rank of the shared pair.

References
- Kopiczko, Blankevoort, Asano 2024, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
  arXiv:2310.11454: Section 3 (the method's equation, the parameter count, the initialization
  strategies); Table 6, the ablation study, whose part (c), the initial value of d, is the one
  PEFT's VeraConfig cites for d_initial.
- HuggingFace PEFT, src/peft/tuners/vera/: config.py (d_initial = 0.1; r = 256 by default, "higher
  values than LoRA ranks", pointing to the paper's Table 1), model.py (`_kaiming_init`),
  layer.py (lambda_b = 0, lambda_d = d_initial; forward lambda_b * B(lambda_d * A(dropout(x)))).
- He et al. 2015 (Kaiming initialization). Hu et al. 2021 (LoRA), for the conventions of layers.py.
"""

import math

import numpy as np

from ..core.config import Extension, check_int
from ..core.lora import Method, register

VERA_D_INIT = 0.1  # lambda_d's initial value: PEFT's VeraConfig.d_initial (it cites the paper's Table 6c)


def vera_shared_init(d_out, d_in, r, rng):
    """The frozen pair (A, B) shared by every adapted layer of shape (d_out, d_in).

    Kaiming uniform with gain sqrt(2), fan_in = the number of columns, as PEFT's `_kaiming_init`:

        A ~ U(-sqrt(6/d_in), sqrt(6/d_in))    Var = 2/d_in
        B ~ U(-sqrt(6/r),    sqrt(6/r))       Var = 2/r

    A is drawn first, then B, so a seed fixes both. r may exceed min(d_out, d_in): in VeRA r is
    the number of trainable entries of lambda_d, not a cap on LoRA's trainable rank (PEFT's
    default is r = 256).

    Inputs:
    - d_out, d_in: int >= 1, the shape of the layers that share the pair
    - r: int >= 1
    - rng: np.random.Generator

    Returns:
    - A: (r, d_in), float64
    - B: (d_out, r), float64
    """
    d_out, d_in, r = check_int("d_out", d_out), check_int("d_in", d_in), check_int("r", r)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator, got {type(rng).__name__}")
    bound_A = math.sqrt(6.0 / d_in)  # sqrt(3)·std with std = sqrt(2)/sqrt(fan_in): the uniform's variance is 2/fan_in
    bound_B = math.sqrt(6.0 / r)
    A = rng.uniform(-bound_A, bound_A, size=(r, d_in))
    B = rng.uniform(-bound_B, bound_B, size=(d_out, r))
    return A, B


# ----------------------------------------------------------------------------
# VeRA linear: out = x·W0ᵀ + b + (((drop(x)·Aᵀ) ⊙ lambda_d)·Bᵀ) ⊙ lambda_b   (h = W0·x + Λ_b·B·Λ_d·A·x)


def vera_linear_forward(x, W, b, A, B, lambda_d, lambda_b, *, dropout=0.0, rng=None):
    """A frozen linear layer W0 plus VeRA's update Λ_b·B·Λ_d·A, never formed as a matrix.

    In column form (paper Section 3), in four stages after the frozen path:

        h = W0·x + b + Λ_b·B·Λ_d·A·drop(x)
        1. a = A·drop(x)      (r,)       the shared down-projection
        2. z = lambda_d ⊙ a   (r,)       Λ_d·a
        3. y = B·z            (d_out,)   the shared up-projection
        4. h += lambda_b ⊙ y  (d_out,)   Λ_b·y

    Inputs:
    - x: (..., d_in)
    - W: (d_out, d_in), the frozen W0
    - b: (d_out,) or None
    - A: (r, d_in), frozen and shared (vera_shared_init)
    - B: (d_out, r), frozen and shared
    - lambda_d: (r,), trainable; VERA_D_INIT in every entry at init
    - lambda_b: (d_out,), trainable; zero at init, so the layer starts as exactly W0
    - dropout: probability of zeroing an input of A (inverted dropout); 0 turns it off
    - rng: np.random.Generator, required when dropout > 0

    Returns:
    - out: (..., d_out)
    - cache: (x, W, mask, xA, A, B, lambda_d, lambda_b), in this order:
        x     the input as given, (..., d_in); backward reads only its shape
        W     W0 (d_out, d_in), for the frozen path of dx
        mask  (N, d_in) with N = prod(x.shape[:-1]), entries 0 or 1/(1 - dropout), or None when
              dropout is 0
        xA    a = A·x (N, r), for ∂L/∂lambda_d
        A, B, lambda_d, lambda_b  as given
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if dropout > 0.0 and rng is None:
        raise ValueError("rng must be a np.random.Generator when dropout > 0, got None")
    d_out, d_in = W.shape
    r = A.shape[0]
    # Checked because broadcasting would hide the mistake: a lambda_d of shape (1,) or () would
    # silently scale every rank by one number.
    if np.shape(lambda_d) != (r,):
        raise ValueError(f"lambda_d must have shape (r,) = ({r},) to match A {A.shape}, got {np.shape(lambda_d)}")
    if np.shape(lambda_b) != (d_out,):
        raise ValueError(
            f"lambda_b must have shape (d_out,) = ({d_out},) to match W {W.shape}, got {np.shape(lambda_b)}"
        )
    x2 = x.reshape(-1, d_in)  # (N, d_in)
    h = x2 @ W.T  # (N, d_out)   W0·x: the frozen path
    if b is not None:
        h += b
    # Inverted dropout on the input of A only (as PEFT's vera_dropout): the frozen path sees the clean x.
    if dropout > 0.0:
        mask = (rng.random(x2.shape) >= dropout) / (1.0 - dropout)
        mask = mask.astype(x.dtype)  # (N, d_in), entries 0 or 1/(1-p)
        xd = x2 * mask
    else:
        mask, xd = None, x2
    xA = xd @ A.T  # 1. (N, r)       a = A·x, only r wide
    z = xA * lambda_d  # 2. (N, r)   Λ_d·a: lambda_d scales each of the r columns
    y = z @ B.T  # 3. (N, d_out)     B·z; B·A (d_out, d_in) is never formed
    h += y * lambda_b  # 4.          Λ_b·y: lambda_b scales each output
    # Cached: W0 and the mask for dx; a = A·x (r wide) for ∂L/∂lambda_d. Not cached: the dropped-out
    # x, which LoRA keeps for dA but VeRA has no trainable A to need it; and y, d_out wide like the
    # output, which backward recomputes from a in one r-wide product, only when ∂L/∂lambda_b is wanted.
    cache = (x, W, mask, xA, A, B, lambda_d, lambda_b)
    return h.reshape(*x.shape[:-1], d_out), cache


def vera_linear_backward(dout, cache, *, need_dd=True, need_db=True):
    """Backward of vera_linear_forward. W0, b, A and B are frozen: their gradients are not formed.

    With g = ∂L/∂h (column form), undo the forward's stages in reverse (4, 3, 2, 1):

        4. h += lambda_b ⊙ y    →  ∂L/∂lambda_b = g ⊙ y,             ∂L/∂y = lambda_b ⊙ g
        3. y = B·z              →  ∂L/∂z = Bᵀ·(lambda_b ⊙ g)          (r,)
        2. z = lambda_d ⊙ a     →  ∂L/∂lambda_d = a ⊙ ∂L/∂z,          ∂L/∂a = lambda_d ⊙ ∂L/∂z
        1. a = A·x              →  ∂L/∂x += Aᵀ·∂L/∂a                  (d_in,)
        frozen path h = W0·x    →  ∂L/∂x += W0ᵀ·g

    Together: ∂L/∂x = W0ᵀ·g + Aᵀ·Λ_d·Bᵀ·Λ_b·g, the transpose of the forward's map. With dropout,
    the adapter path saw m⊙x (m the scaled mask), so its term of ∂L/∂x is multiplied by m.

    The vectors' gradients are elementwise products, summed over the N positions because every
    position shares the same lambda_d and lambda_b. At lambda_b = 0 (VeRA's init) ∂L/∂z = 0, so
    ∂L/∂lambda_d is exactly zero and the adapter adds nothing to ∂L/∂x; only lambda_b gets a
    gradient on the first step (LoRA's dA at B = 0 likewise).

    Inputs:
    - dout: (..., d_out)
    - cache: from vera_linear_forward
    - need_dd, need_db: form these gradients; False for a frozen vector

    Returns:
    - dx: (..., d_in)
    - d_lambda_d: (r,) or None
    - d_lambda_b: (d_out,) or None
    """
    x, W, mask, xA, A, B, lambda_d, lambda_b = cache
    g = dout.reshape(-1, W.shape[0])  # (N, d_out)
    dx = g @ W  # (N, d_in)   W0ᵀ·g, the frozen path
    # 4. in the forward pass this was h += y * lambda_b, with y = B·(lambda_d ⊙ a)
    if need_db:
        y = (xA * lambda_d) @ B.T  # (N, d_out), recomputed (see the forward): one r-wide product
        d_lambda_b = (g * y).sum(axis=0)  # ∂L/∂lambda_b = g ⊙ y, summed over positions
    else:
        d_lambda_b = None
    dy = g * lambda_b  # (N, d_out)   Λ_b·g
    # 3. y = z @ B.T
    dz = dy @ B  # (N, r)   Bᵀ·Λ_b·g
    # 2. z = xA * lambda_d
    d_lambda_d = (dz * xA).sum(axis=0) if need_dd else None  # ∂L/∂lambda_d = a ⊙ ∂L/∂z, summed
    dxA = dz * lambda_d  # (N, r)   Λ_d·Bᵀ·Λ_b·g, the gradient at a = A·x
    # 1. xA = xd @ A.T, and xd = x * mask: the gradient passes through the mask
    dxd = dxA @ A  # (N, d_in)   Aᵀ·(...)
    dx += dxd if mask is None else dxd * mask
    return dx.reshape(x.shape), d_lambda_d, d_lambda_b


# ----------------------------------------------------------------------------
# VeRA in the model: the core's seam (lora_np.core.lora.register), filled

VERA_SHARED = "vera."  # the prefix of VeRA's frozen shared matrices: adapters, but never trained


def vera_shared(adapters, cfg, target):
    """VeRA's frozen (A, B) for a target's weight shape."""
    return _shared(adapters, *cfg.linear_shape(target))


def _shared(adapters, d_out, d_in):
    return adapters[f"{VERA_SHARED}{d_out}x{d_in}.A"], adapters[f"{VERA_SHARED}{d_out}x{d_in}.B"]


def init_vera(cfg, lora, seed):
    """VeRA's adapters: the shared frozen (A, B) per weight shape, lambda_d = 0.1, lambda_b = 0."""
    rng = np.random.default_rng(seed)
    adapters = {}
    for t in lora.targets:  # one pair per shape, drawn in the order of the targets
        d_out, d_in = cfg.linear_shape(t)
        key = f"{VERA_SHARED}{d_out}x{d_in}"
        if key + ".A" not in adapters:
            adapters[key + ".A"], adapters[key + ".B"] = vera_shared_init(d_out, d_in, lora.r, rng)
    for l in range(cfg.n_layers):
        for t in lora.targets:
            d_out, _ = cfg.linear_shape(t)
            adapters[f"blocks.{l}.{t}.lambda_d"] = np.full(lora.r, VERA_D_INIT)
            adapters[f"blocks.{l}.{t}.lambda_b"] = np.zeros(d_out)  # 0: the start is exactly the base model
    return adapters


class VeRA(Method):
    """VeRA on every adapted weight: two trainable vectors each, on one frozen random pair per weight shape."""

    frozen_prefix = VERA_SHARED

    def names(self, cfg, lora):
        """lambda_d (r,) and lambda_b (d_out,) per adapted weight, after one frozen pair per weight shape,
        shared by every layer: "vera.{d_out}x{d_in}.A" (r, d_in) and ".B" (d_out, r)."""
        names = {}
        for t in lora.targets:
            d_out, d_in = cfg.linear_shape(t)
            names[f"{VERA_SHARED}{d_out}x{d_in}.A"] = (lora.r, d_in)
            names[f"{VERA_SHARED}{d_out}x{d_in}.B"] = (d_out, lora.r)
        for l in range(cfg.n_layers):
            for t in lora.targets:
                d_out, _ = cfg.linear_shape(t)
                names[f"blocks.{l}.{t}.lambda_d"] = (lora.r,)
                names[f"blocks.{l}.{t}.lambda_b"] = (d_out,)
        return names

    def init(self, cfg, lora, seed):
        return init_vera(cfg, lora, seed)

    def linear_forward(self, x, W, b, adapters, name, lora, dropout, rng):
        A, B = _shared(adapters, *W.shape)  # the pair of this weight's shape
        d, bv = adapters[name + ".lambda_d"], adapters[name + ".lambda_b"]
        return vera_linear_forward(x, W, b, A, B, d, bv, dropout=dropout, rng=rng)

    def linear_backward(self, dout, cache, name, want):
        dx, dd, db = vera_linear_backward(dout, cache, need_dd=name + ".lambda_d" in want,
                                          need_db=name + ".lambda_b" in want)  # fmt: skip
        grads = {name + ".lambda_d": dd, name + ".lambda_b": db}
        return dx, {k: g for k, g in grads.items() if g is not None}

    def merge(self, params, adapters, lora):
        merged = params.with_merged(adapters, lora)  # a copy with its record; refuses adapters merged before
        for name, t in _adapted(params.config, lora):
            A, B = vera_shared(adapters, params.config, t)
            # Λ_b·B·Λ_d·A: scale B's rows by lambda_b and A's rows by lambda_d, then one (d_out, r) @ (r, d_in)
            lb, ld = adapters[name + ".lambda_b"], adapters[name + ".lambda_d"]
            merged[name] = params[name] + (lb[:, None] * B) @ (ld[:, None] * A)
        return merged

    def unmerge(self, merged, adapters, lora, norms=None):
        params = merged.without_merged(adapters, lora)  # refuses adapters that were never merged
        for name, t in _adapted(merged.config, lora):
            A, B = vera_shared(adapters, merged.config, t)
            lb, ld = adapters[name + ".lambda_b"], adapters[name + ".lambda_d"]
            params[name] = merged[name] - (lb[:, None] * B) @ (ld[:, None] * A)  # W0 = W' - Λ_b·B·Λ_d·A, as merged
        return params


def _adapted(cfg, lora):
    return [(f"blocks.{l}.{t}", t) for l in range(cfg.n_layers) for t in lora.targets]


def _check_config(cfg):
    if cfg.method == "vera" and (cfg.rslora or cfg.lr_ratio != 1.0 or cfg.init != "gaussian"):
        raise ValueError("method='vera' has no scaling, no separate A and B learning rates and its own "
                         "initialization: leave rslora, lr_ratio and init at their defaults")  # fmt: skip


register("vera", Extension(methods=("vera",), check=_check_config), {"vera": VeRA()})
