"""DoRA: a LoRA layer whose adapted weight is split into a magnitude and a direction.

DoRA (Liu et al., 2024) writes the adapted weight as one magnitude per output feature times a
unit direction, and lets LoRA move only the direction (paper, eq. 5):

    W' = m ⊙ V / ‖V‖,    V = W0 + s·B·A,    m initialised to ‖W0‖ (eq. 2)

In lora_np's orientation W is (d_out, d_in) and tokens are rows, so ‖V‖ is the norm of each ROW
of V and m has d_out entries, one per output feature. (The paper writes W ∈ R^{d×k} with a
column norm and m ∈ R^{1×k}; its released code and PEFT both take the norm of each output
feature of an nn.Linear weight, torch.linalg.norm(weight, dim=1), which is our row norm.)
In rows, with n = ‖V‖ by rows (d_out,) and the bias added after the rescaling:

    h = (x·Vᵀ) ⊙ (m / n) + b,    x·Vᵀ = x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ

Dropout is on the input of A only, as in lora_linear_forward: the frozen path sees the clean x.
(PEFT, and the paper's released code, differ here when dropout is on: they compute
W0·x + b + (m/n - 1)·W0·drop(x) + (m/n)·s·B·A·drop(x), so the frozen path's correction also sees
the dropped-out x. Without dropout, and in expectation over the mask, the two are the same.)

The norm is a function of B and A, so it has a gradient. Section 4.3 of the paper proposes to
treat ‖V + ΔV‖ as a constant in the backward ("detaching it from the gradient graph") to save
memory, which PEFT does too; `detach_norm=True` is that variant, `detach_norm=False`
differentiates through n exactly (eq. 6). The forward is the same in both.

Nothing d_out × d_in is formed, in the forward or the backward: not B·A, not V, not ∂L/∂W'.
The one exception is dora_merge, whose whole job is to form W' once for inference.

Dimension legend: N any number of leading positions (usually B*T), d_in / d_out the input /
output width of the linear layer, r the LoRA rank.

References
- Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353:
  eq. (2) the decomposition and the init of m, eq. (5) the adapted weight, eq. (6) and (7) the
  gradients of V' and m, Section 4.3 and eq. (11) the detached norm.
- Hugging Face PEFT, src/peft/tuners/lora/dora.py (DoraLinearLayer) and variants.py
  (DoraLinearVariant: merge caches the weight norm so that unmerge can undo it).
- Salimans & Kingma 2016, "Weight Normalization", which DoRA's decomposition follows.
"""

import numpy as np

from ..core.config import Extension, LoraConfig
from ..core.lora import Method, init_lora, register

# ----------------------------------------------------------------------------
# the row norms of V = W0 + s·B·A, without forming V


def _row_norms(W, A, B, scaling):
    """n = ‖W0 + s·B·A‖ row by row, and the two r-wide products it is built from.

    Expanding the square of row i of V = W0 + s·B·A, with (BA)_i = B_i·A (B_i a row of B):

        ‖V_i‖² = ‖W0_i‖² + 2s·⟨W0_i, (BA)_i⟩ + s²·‖(BA)_i‖²
               = ‖W0_i‖² + 2s·B_i·(W0·Aᵀ)_i + s²·B_i·(A·Aᵀ)·B_iᵀ

    needs only W0·Aᵀ (d_out, r) and A·Aᵀ (r, r): nothing d_out × d_in, in memory O(d_out·r)
    instead of O(d_out·d_in). We use it rather than forming V because (1) that is the point of
    LoRA, whose B·A is never formed either; (2) the exact backward needs V·Aᵀ = W0·Aᵀ + s·B·(A·Aᵀ),
    so the two products are cached and reused.

    The price is round-off when V_i is small against the terms it is the sum of: the identity
    subtracts squares, so its relative error is about eps·κ_i with
    κ_i = ((‖W0_i‖ + s·‖(BA)_i‖) / ‖V_i‖)², where forming V loses only about eps·√κ_i. Measured
    (d_in = 64, r = 4, s = 2, rows with ‖V_i‖ = δ·‖W0_i‖, against exact rational arithmetic):

        δ:                1      1e-1     1e-2     1e-3     1e-4
        float64 identity  3e-16  4e-14    3e-12    2e-10    3e-8
        float64 form V    2e-16  2e-16    2e-15    1e-14    2e-13
        float32 identity  1e-7   9e-6     1e-3     6e-2     3
        float32 form V    4e-8   6e-8     7e-7     1e-5     6e-5

    In the regime DoRA lives in, s·B·A a small change to W0 (δ ≈ 1), both are at round-off (1e-16
    and 1e-7 measured for ‖s(BA)_i‖/‖W0_i‖ from 5e-4 to 0.4). Only an adapter that almost cancels a
    row of W0 loses digits, and float32 loses them fast: there a caller should form V instead.

    Inputs:
    - W: (d_out, d_in), the frozen W0
    - A: (r, d_in)
    - B: (d_out, r)
    - scaling: the float s

    Returns:
    - n: (d_out,)
    - WAt: (d_out, r), W0·Aᵀ
    - AAt: (r, r), A·Aᵀ
    """
    WAt = W @ A.T  # (d_out, r)
    AAt = A @ A.T  # (r, r)
    n2 = (
        np.einsum("ij,ij->i", W, W)  # ‖W0_i‖², row-wise dot products: W0⊙W0 is never formed
        + 2 * scaling * np.einsum("ik,ik->i", B, WAt)  # 2s·⟨W0_i, (BA)_i⟩ = 2s·B_i·(W0·Aᵀ)_i
        + scaling * scaling * np.einsum("ik,ik->i", B @ AAt, B)  # s²·‖(BA)_i‖² = s²·B_i·(A·Aᵀ)·B_iᵀ
    )
    # No clipping at 0: n2 < 0 can only come from a row lost to cancellation, and a NaN says so.
    return np.sqrt(n2), WAt, AAt


def dora_weight_norm(W, A, B, scaling):
    """The row norms of V = W0 + s·B·A, the ‖V + ΔV‖_c of the paper's eq. (5).

    Computed without forming V (see _row_norms for why, and for its round-off).

    Inputs:
    - W: (d_out, d_in), the frozen W0
    - A: (r, d_in)
    - B: (d_out, r)
    - scaling: the float s

    Returns:
    - n: (d_out,)
    """
    return _row_norms(W, A, B, scaling)[0]


def dora_magnitude_init(W, A, scaling):
    """The initial magnitude m = ‖W0‖ by rows (paper, eq. 2 and Section 4.1).

    Computed by dora_weight_norm itself with B = 0, not by np.linalg.norm(W, axis=1): the two
    sum the squares in different orders and can differ in the last bit. Through the same
    function, the forward's n at B = 0 is the same float as m, so m / n is exactly 1.0 and the
    adapted layer starts as the base layer bit for bit. A is passed only so that the arithmetic
    is the same: at B = 0 the terms it enters are exact zeros.

    Inputs:
    - W: (d_out, d_in), the frozen W0
    - A: (r, d_in)
    - scaling: the float s

    Returns:
    - m: (d_out,)
    """
    return dora_weight_norm(W, A, np.zeros((W.shape[0], A.shape[0]), dtype=W.dtype), scaling)


# ----------------------------------------------------------------------------
# DoRA linear: out = (x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ) ⊙ (m / ‖W0 + s·B·A‖_rows) + b   (paper eq. 5)


def dora_linear_forward(x, W, b, A, B, m, scaling, *, dropout=0.0, rng=None, detach_norm=True):
    """A frozen linear layer W0 adapted by DoRA: magnitude m, direction W0 + s·B·A.

    In column form for one token (paper, eq. 5, with LoRA's scaling s):

        h = (m / n) ⊙ (V·x) + b,    V = W0 + s·B·A,    n = ‖V‖ row by row

    computed in five stages, without forming V (dropout, as in LoRA, on the input of A only):

        1. x̃ = μ⊙x               inverted dropout, μ the scaled mask       (d_in,)
        2. a = A·x̃                the low-rank factor, only r wide           (r,)
        3. y = W0·x + s·B·a       = V·x when there is no dropout             (d_out,)
        4. n = ‖V‖ by rows        the norms, from W0·Aᵀ and A·Aᵀ             (d_out,)
        5. h = c⊙y + b,  c = m/n  each output feature rescaled, then biased  (d_out,)

    Inputs:
    - x: (..., d_in)
    - W: (d_out, d_in), the frozen W0
    - b: (d_out,) or None
    - A: (r, d_in), drawn at random at init
    - B: (d_out, r), zero at init
    - m: (d_out,), the magnitude, dora_magnitude_init(W, A, scaling) at init, so that the layer
      starts as exactly the base layer
    - scaling: the float s
    - dropout: probability of zeroing an input of A (inverted dropout); 0 turns it off
    - rng: np.random.Generator, required when dropout > 0
    - detach_norm: True for the paper's Section 4.3 variant (PEFT's too): the backward treats n
      as a constant. False differentiates through n exactly. The forward is the same.

    Returns:
    - out: (..., d_out)
    - cache: (x, W, xd, mask, xA, A, B, scaling, m, y, n, WAt, AAt, detach_norm), in this order:
        x, W, xd, mask, xA, A, B, scaling  as in lora_linear_forward
        m     the magnitude (d_out,), for ∂L/∂n
        y     V·x before the rescaling, (N, d_out): ∂L/∂m and ∂L/∂n need Σ_N g⊙y, and
              recovering it from out would divide by m, which may hold zeros
        n     the row norms (d_out,)
        WAt   W0·Aᵀ (d_out, r) and AAt = A·Aᵀ (r, r): n was built from them, and the exact
              backward needs V·Aᵀ = W0·Aᵀ + s·B·(A·Aᵀ); kept because they are r wide
        detach_norm  which backward to run
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if dropout > 0.0 and rng is None:
        raise ValueError("rng must be a np.random.Generator when dropout > 0, got None")
    d_out, d_in = W.shape
    if np.shape(m) != (d_out,):
        # a (d_out, 1) m would broadcast against n (d_out,) into a (d_out, d_out) scale, silently
        raise ValueError(
            f"m must have shape (d_out,) = ({d_out},), one magnitude per output feature, got {np.shape(m)}"
        )
    x2 = x.reshape(-1, d_in)  # (N, d_in)
    # 1. inverted dropout on the input of A only: the frozen path sees the clean x
    if dropout > 0.0:
        mask = (rng.random(x2.shape) >= dropout) / (1.0 - dropout)
        mask = mask.astype(x.dtype)  # (N, d_in), entries 0 or 1/(1-p)
        xd = x2 * mask
    else:
        mask, xd = None, x2
    # 2. A·x, only r wide
    xA = xd @ A.T  # (N, r)
    # 3. y = V·x = W0·x + s·B·(A·x): the LoRA layer without its bias; B·A is never formed
    y = x2 @ W.T  # (N, d_out)
    y += (scaling * xA) @ B.T  # (N, r)@(r, d_out)
    # 4. the row norms of V, from r-wide products only
    n, WAt, AAt = _row_norms(W, A, B, scaling)  # (d_out,)
    # 5. one scale per output feature, then the bias, which the paper's W' does not touch.
    # At init m and n are the same float, so c is exactly 1.0 and h is x·W0ᵀ + b bit for bit.
    c = m / n  # (d_out,)
    h = y * c  # (N, d_out)
    if b is not None:
        h += b
    cache = (x, W, xd, mask, xA, A, B, scaling, m, y, n, WAt, AAt, detach_norm)
    return h.reshape(*x.shape[:-1], d_out), cache


def dora_linear_backward(dout, cache, *, need_dA=True, need_dB=True, need_dm=True):
    """Backward of dora_linear_forward. W0 and b are frozen: their gradients are not formed.

    Column form, one token, g = ∂L/∂h (d_out,); Σ sums over the N tokens. The stages of the
    forward, undone in reverse:

        5. h = c⊙y + b, c = m/n:
             ∂L/∂c = Σ g⊙y,  so  ∂L/∂m = Σ g⊙y / n                   (d_out,)
             ∂L/∂y = g⊙c                                              (d_out,)
             exact variant: ∂L/∂n = -Σ (g⊙y)⊙m / n²                   (d_out,)
        4. n_i = √(V_i·V_i), so ∂n_i/∂V_i = V_i / n_i and, exact variant only,
             ∂L/∂V = diag(e)·V,  e = (∂L/∂n) / n                      (d_out, d_in), not formed
           then through V = W0 + s·B·A (∂L/∂B = s·(∂L/∂V)·Aᵀ, ∂L/∂A = s·Bᵀ·(∂L/∂V)):
             ∂L/∂B ∋ s·diag(e)·V·Aᵀ = s·diag(e)·(W0·Aᵀ + s·B·(A·Aᵀ))      (d_out, r)
             ∂L/∂A ∋ s·Bᵀ·diag(e)·V = s·((e⊙B)ᵀ·W0 + s·((e⊙B)ᵀ·B)·A)      (r, d_in)
        3. y = W0·x + s·B·a:
             ∂L/∂B ∋ s·(∂L/∂y)·aᵀ                                     (d_out, r)
             ∂L/∂a = s·Bᵀ·(∂L/∂y)                                     (r,)
             ∂L/∂x = W0ᵀ·(∂L/∂y), the frozen path                    (d_in,)
        2. a = A·x̃:   ∂L/∂A ∋ (∂L/∂a)·x̃ᵀ,   ∂L/∂x̃ = Aᵀ·(∂L/∂a)
        1. x̃ = μ⊙x:   ∂L/∂x += μ⊙(∂L/∂x̃)

    Without dropout, stages 3 and 4 together are ∂L/∂V = diag(c)·G + diag(e)·V with
    G = Σ g·xᵀ = ∂L/∂W', which row by row is (m_i/n_i)·(I - v̂_i·v̂_iᵀ)·G_i with v̂_i = V_i/n_i:
    the paper's eq. (6), the gradient scaled by m/n and projected away from V. The detached
    variant (Section 4.3) drops the diag(e)·V term and keeps ∂L/∂V = diag(m/n)·G, eq. (11).
    ∂L/∂m is eq. (7), and is the same in both variants (as the paper says); so is ∂L/∂x, since n
    does not depend on x. ∂L/∂A and ∂L/∂B differ, and ∂L/∂B differs even at B = 0, where n
    still depends on B to first order (∂n_i/∂B_i = s·(W0·Aᵀ)_i / n_i); ∂L/∂A is zero there in both.

    As in the forward, every product is at most r or N wide: neither ∂L/∂V, nor G, nor V is
    formed; V·Aᵀ is rebuilt from the cached W0·Aᵀ and A·Aᵀ.

    Inputs:
    - dout: (..., d_out)
    - cache: from dora_linear_forward
    - need_dA, need_dB, need_dm: form these gradients; False for a frozen parameter

    Returns:
    - dx: (..., d_in)
    - dA: (r, d_in) or None
    - dB: (d_out, r) or None
    - dm: (d_out,) or None
    """
    x, W, xd, mask, xA, A, B, scaling, m, y, n, WAt, AAt, detach_norm = cache
    g = dout.reshape(-1, W.shape[0])  # (N, d_out)
    through_norm = not detach_norm and (need_dA or need_dB)  # frozen means not computed

    # 5. in the forward pass this was h = y·c + b with c = m/n
    c = m / n  # (d_out,), recomputed: one division
    gy = np.einsum("ni,ni->i", g, y) if (need_dm or through_norm) else None  # (d_out,)  ∂L/∂c = Σ g⊙y
    dm = gy / n if need_dm else None  # ∂L/∂m = Σ g⊙y / n   (eq. 7)
    dy = g * c  # (N, d_out)   ∂L/∂y = g⊙c

    # 4. in the forward pass this was n = ‖V‖ by rows, V = W0 + s·B·A (exact variant only)
    dA = dB = None
    if through_norm:
        dn = -gy * m / (n * n)  # (d_out,)   ∂L/∂n = -Σ (g⊙y)⊙m / n²
        e = dn / n  # (d_out,)   ∂L/∂V = diag(e)·V, since ∂n_i/∂V_i = V_i / n_i
        if need_dB:
            # ∂L/∂B = s·diag(e)·V·Aᵀ, with V·Aᵀ = W0·Aᵀ + s·B·(A·Aᵀ): (d_out, r)@(r, r)
            dB = scaling * (e[:, None] * (WAt + scaling * (B @ AAt)))
        if need_dA:
            eB = e[:, None] * B  # (d_out, r)   diag(e)·B
            # ∂L/∂A = s·Bᵀ·diag(e)·V = s·((e⊙B)ᵀ·W0 + s·((e⊙B)ᵀ·B)·A): (r, d_out)@(d_out, d_in), (r, r)@(r, d_in)
            dA = scaling * (eB.T @ W + scaling * ((eB.T @ B) @ A))

    # 3. in the forward pass this was y = x·W0ᵀ + s·xA·Bᵀ
    dx = dy @ W  # (N, d_in)   W0ᵀ·(∂L/∂y), the frozen path
    if need_dB:
        dB_y = scaling * (dy.T @ xA)  # ∂L/∂B = s·(∂L/∂y)·(A·x)ᵀ, (d_out, N)@(N, r)
        dB = dB_y if dB is None else dB + dB_y
    dxA = scaling * (dy @ B)  # (N, r)   s·Bᵀ·(∂L/∂y), the gradient at A·x

    # 2. in the forward pass this was xA = xd·Aᵀ
    if need_dA:
        dA_y = dxA.T @ xd  # ∂L/∂A = (s·Bᵀ·∂L/∂y)·x̃ᵀ (x after dropout), (r, N)@(N, d_in)
        dA = dA_y if dA is None else dA + dA_y
    dxd = dxA @ A  # (N, d_in)

    # 1. in the forward pass this was xd = x * mask, so the gradient passes through the mask
    dx += dxd if mask is None else dxd * mask
    return dx.reshape(x.shape), dA, dB, dm


# ----------------------------------------------------------------------------
# merge / unmerge: W' = m ⊙ V / n, formed once for inference


def dora_merge(W, A, B, m, scaling):
    """The adapted weight W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ by rows (paper, eq. 5).

    The one place where V and W' are formed (d_out × d_in): after merging, inference is a plain
    linear layer, x·W'ᵀ + b, at no extra cost. The norms come from dora_weight_norm, the same
    numbers the forward divides by, so the merged layer equals the unmerged one to round-off.
    Keep them, dora_weight_norm(W, A, B, scaling) before the merge: dora_unmerge needs them.

    Inputs:
    - W: (d_out, d_in), the frozen W0
    - A: (r, d_in)
    - B: (d_out, r)
    - m: (d_out,)
    - scaling: the float s

    Returns:
    - W_merged: (d_out, d_in), each row of norm m_i
    """
    n = dora_weight_norm(W, A, B, scaling)  # (d_out,)
    V = W + scaling * (B @ A)  # (d_out, d_in)
    return (m / n)[:, None] * V  # as PEFT: the factor m/n times V


def dora_unmerge(W_merged, A, B, m, scaling, norms):
    """W0 back from a merged weight, given the row norms n of V at merge time.

    W'_i = (m_i / n_i)·V_i, so W0 = W' / (m/n) - s·B·A by rows.

    Why the norms must be passed in: W'_i / m_i is the unit direction V_i / n_i, and the length
    n_i of V_i is exactly what the division by n_i erased. For any t_i > 0, the base weight
    W0_i* = t_i·V_i - s·(BA)_i has V_i* = t_i·V_i, whose unit direction is the same, so it merges
    to the same W'_i with the same m, A and B. From W', A, B and m alone, one positive scalar per
    row is lost, and W0 cannot be recovered. PEFT caches the weight norm at merge time for the
    same reason. (Nor can n be recomputed as ‖W0 + s·B·A‖: W0 is what we are looking for.)

    A row with m_i = 0 merges to a zero row and cannot be unmerged at all (0/0 below).

    Inputs:
    - W_merged: (d_out, d_in), from dora_merge
    - A: (r, d_in)
    - B: (d_out, r)
    - m: (d_out,)
    - scaling: the float s
    - norms: (d_out,), dora_weight_norm(W0, A, B, scaling) at merge time

    Returns:
    - W: (d_out, d_in), W0 up to round-off
    """
    c = m / norms  # (d_out,), the merge's factor
    return W_merged / c[:, None] - scaling * (B @ A)


# ----------------------------------------------------------------------------
# DoRA in the model: the core's seam (lora_np.core.lora.register), filled


class DoRA(Method):
    """DoRA on every adapted weight: LoRA's A, B and a magnitude m (d_out,) each."""

    def names(self, cfg, lora):
        names = {}
        for l in range(cfg.n_layers):
            for t in lora.targets:
                d_out, d_in = cfg.linear_shape(t)
                p = f"blocks.{l}.{t}"
                names.update({p + ".A": (lora.r, d_in), p + ".B": (d_out, lora.r), p + ".m": (d_out,)})
        return names

    def init(self, cfg, lora, seed):
        raise ValueError(f"method={lora.method!r}, init={lora.init!r} initializes from the base weights W0: "
                         f"use init_adapters(params, lora, seed), which returns (params, adapters)")

    def linear_forward(self, x, W, b, adapters, name, lora, dropout, rng):
        A, B, m = adapters[name + ".A"], adapters[name + ".B"], adapters[name + ".m"]
        return dora_linear_forward(x, W, b, A, B, m, lora.scaling, dropout=dropout, rng=rng,
                                   detach_norm=not lora.dora_exact_norm)  # fmt: skip

    def linear_backward(self, dout, cache, name, want):
        dx, dA, dB, dm = dora_linear_backward(dout, cache, need_dA=name + ".A" in want, need_dB=name + ".B" in want,
                                              need_dm=name + ".m" in want)  # fmt: skip
        grads = {name + ".A": dA, name + ".B": dB, name + ".m": dm}
        return dx, {k: g for k, g in grads.items() if g is not None}

    def merge(self, params, adapters, lora):
        merged = params.with_merged(adapters, lora)  # a copy with its record; refuses adapters merged before
        for name in _adapted(params.config, lora):
            A, B, m = adapters[name + ".A"], adapters[name + ".B"], adapters[name + ".m"]
            merged[name] = dora_merge(params[name], A, B, m, lora.scaling)
        return merged

    def unmerge(self, merged, adapters, lora, norms=None):
        adapted = _adapted(merged.config, lora)
        if not isinstance(norms, dict) or set(norms) != set(adapted):
            raise ValueError("unmerging DoRA needs norms = lora_np.variants.dora_norms(base, adapters, lora), taken "
                             "before merging: W' = m ⊙ V/‖V‖ keeps V's direction but not its norm")  # fmt: skip
        params = merged.without_merged(adapters, lora)  # refuses adapters that were never merged
        for name in adapted:
            A, B, m = adapters[name + ".A"], adapters[name + ".B"], adapters[name + ".m"]
            params[name] = dora_unmerge(merged[name], A, B, m, lora.scaling, norms[name])
        return params


def _adapted(cfg, lora):
    return [f"blocks.{l}.{t}" for l in range(cfg.n_layers) for t in lora.targets]


def dora_start(params, lora, seed):
    """DoRA's start: LoRA's A and B = 0, and the magnitude m = the row norms of W0 (paper, eq. 2)."""
    plain = LoraConfig(r=lora.r, alpha=lora.alpha, targets=lora.targets, init=lora.init, rslora=lora.rslora)
    adapters = {k: v.astype(params["W_e"].dtype) for k, v in init_lora(params.config, plain, seed).items()}
    for name in _adapted(params.config, lora):
        # m = ‖W0‖ through the forward's own norm at B = 0, so that m/‖V‖ is 1.0 exactly
        adapters[name + ".m"] = dora_magnitude_init(params[name], adapters[name + ".A"], lora.scaling)
    return params, adapters


def _check_config(cfg):
    if not isinstance(cfg.dora_exact_norm, bool):
        raise TypeError(f"dora_exact_norm must be True or False, got {cfg.dora_exact_norm!r}")
    if cfg.dora_exact_norm and cfg.method != "dora":
        raise ValueError(f"dora_exact_norm applies to method='dora', got method={cfg.method!r}")


register("dora", Extension(methods=("dora",), check=_check_config, start=dora_start), {"dora": DoRA()})
