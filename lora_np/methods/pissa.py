"""PiSSA: LoRA's A and B started at W0's principal singular triplets, W0 replaced by the residual.

LoRA starts from ΔW = B·A = 0 and a random A, so its first steps move in random directions.
PiSSA (Meng et al. 2024, Section 3) keeps LoRA's architecture and changes only the start: with
the economy SVD W0 = U·Σ·Vᵀ (singular values in descending order),

    paper (Section 3):   A_p = U[:, :r]·Σ[:r, :r]^½   (m, r)      B_p = Σ[:r, :r]^½·V[:, :r]ᵀ   (r, n)
                         W_res = U[:, r:]·Σ[r:, r:]·V[:, r:]ᵀ, frozen;   Y = X·W = X·(W_res + A_p·B_p)

The paper names the factors the other way round from LoRA (its A is the left, d_out-side factor)
and has no scaling. In lora_np's names and orientation, with the update s·B·A (layers.py):

    A = √(Σ_r/s)·V_rᵀ   (r, d_in)      B = U_r·√(Σ_r/s)   (d_out, r)
    s·B·A = U_r·Σ_r·V_rᵀ,               W_res = W0 - s·B·A

where U_r, V_r are the first r singular vectors and Σ_r = diag(σ_1..σ_r). Dividing Σ_r by s
before the square root is what PEFT does (src/peft/tuners/lora/layer.py, `pissa_init`:
"Sr /= self.scaling"), so that s·B·A is W0's principal part whatever alpha is. The adapted layer
starts as W_res + s·B·A = W0, to round-off, and training proceeds exactly as LoRA's.

What the start is, and what the tests check (tests/test_pissa.py):
- s·B·A = U_r·Σ_r·V_rᵀ is the best rank-r approximation of W0 (Eckart–Young):
  ‖W0 - s·B·A‖_F² = σ_{r+1}² + ... + σ_k², k = min(d_out, d_in), and ‖W_res‖_2 = σ_{r+1}.
- W_res = U_{r:}·Σ_{r:}·V_{r:}ᵀ: its rows are orthogonal to A's (A·W_resᵀ = 0) and its columns
  to B's (Bᵀ·W_res = 0). A's rows are orthogonal, A·Aᵀ = Σ_r/s, and so are B's columns, BᵀB = Σ_r/s.
- An SVD is unique only up to the signs of each pair (u_i, v_i) (and up to a rotation within a
  repeated singular value). A sign flip negates row i of A and column i of B together, so s·B·A
  does not change: it is unique whenever σ_r > σ_{r+1}.

Why W_res = W0 - s·B·A and not the paper's U_{r:}·Σ_{r:}·V_{r:}ᵀ (equal in exact arithmetic):
with P the computed s·(B @ A), merging the untrained adapter back (lora.merge's W_res + s·(B @ A))
evaluates fl(fl(W0 - P) + P), which is W0 to within one rounding of each of the two sums, however
inaccurate the SVD:

    |fl(fl(W0 - P) + P) - W0| ≤ u·|W0 - P| + u·|W0| + O(u²) ≤ u·(σ_{r+1} + σ_1) + O(u²) ≤ ε·σ_1

entrywise, with u = ε/2 the unit roundoff, because an entry of a matrix is at most its largest
singular value: |W0_ij| ≤ σ_1 and |(W0 - P)_ij| ≤ ‖W_res‖_2 = σ_{r+1} (to O(ε)). No factor of the
dimensions appears. (The unmerged layer, x·W_resᵀ + s·(x·Aᵀ)·Bᵀ, adds only its products'
round-off, as any linear layer does.) The paper's residual would start the layer only as close to W0 as the SVD's
backward error allows, ‖E‖_2 ≤ p(d_out, d_in)·ε·σ_1 (see the references), measured up to 50·ε·σ_1
on small matrices. That error, with the rounding of s·B·A, is what the properties listed above
carry: tests/test_pissa.py derives its bound for them, 50·(d_out + d_in)·ε·σ_1.

A note for rank-deficient W0: if σ_i = 0 for some i ≤ r, row i of A and column i of B are zero,
and both gradients of that pair (∂L/∂A_i = s·(Bᵀ·g)_i·xᵀ, ∂L/∂B_i = s·g·(A·x)_i) are zero too:
that direction of the adapter never trains. Choose r ≤ rank(W0).

Dimension legend: d_out / d_in the weight's output / input width (the paper's m, n),
k = min(d_out, d_in), r the rank.

References
- Meng, Wang, Zhang 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
  Large Language Models", NeurIPS 2024, arXiv:2404.02948, Section 3 (A, B, W_res and Y = X(W_res + AB)).
- HuggingFace PEFT, src/peft/tuners/lora/layer.py, LoraLayer.pissa_init (init_lora_weights="pissa").
- Eckart & Young 1936 (best low-rank approximation).
- LAPACK Users' Guide, "Error Bounds for the Singular Value Decomposition": xGESVD/xGESDD (what
  np.linalg.svd calls) are backward stable, the computed U·Σ·Vᵀ is nearly the exact SVD of W0 + E
  with ‖E‖_2 ≤ p(d_out, d_in)·ε·‖W0‖_2, p "a modestly growing function"; so |σ̂_i - σ_i| ≤ ‖E‖_2.
"""

import math
from numbers import Integral, Real

import numpy as np

from ..core.config import Extension
from ..core.lora import register


def pissa_factors(W, r, scaling):
    """PiSSA's start for a weight W0: the adapter (A, B) from its top-r singular triplets, and the residual.

    With W0 = U·Σ·Vᵀ (np.linalg.svd, full_matrices=False), in lora_np's orientation:

        A = √(Σ_r/s)·V_rᵀ   B = U_r·√(Σ_r/s)   so   s·B·A = U_r·Σ_r·V_rᵀ
        W_res = W0 - s·B·A   so   W_res + s·B·A = W0 to round-off (≤ ε·σ_1 per entry)

    The SVD runs in W's own precision: a float32 W gives float32 factors. (To start a float32
    model from a float64 SVD, pass W.astype(np.float64) and cast the results back.)

    Inputs:
    - W: (d_out, d_in), float array, finite: the base weight W0
    - r: int, 1 <= r <= min(d_out, d_in)
    - scaling: the float s > 0 of the layer's update s·B·A (LoraConfig.scaling)

    Returns:
    - A: (r, d_in), W's dtype
    - B: (d_out, r), W's dtype
    - W_res: (d_out, d_in), W's dtype, the new frozen base
    """
    if not isinstance(W, np.ndarray) or W.ndim != 2:
        raise TypeError(f"W must be a 2-D NumPy array (d_out, d_in), got {type(W).__name__} "
                        f"of shape {np.shape(W)}")  # fmt: skip
    if W.dtype not in (np.float32, np.float64):  # np.linalg.svd refuses float16, and integers are no weight
        raise TypeError(f"W must be a float array (float32 or float64), got dtype {W.dtype}")
    if not np.all(np.isfinite(W)):
        raise ValueError("W must be finite: it has NaN or inf entries, and an SVD of it would not converge")
    d_out, d_in = W.shape
    k = min(d_out, d_in)
    if not isinstance(r, Integral) or isinstance(r, bool):  # True as a rank is a bug, not a 1
        raise TypeError(f"r must be an int, got {r!r} ({type(r).__name__})")
    if not 1 <= r <= k:
        raise ValueError(f"r must be between 1 and min(d_out, d_in) = {k} for W of shape {W.shape}, got r={r}")
    r = int(r)
    if not isinstance(scaling, Real) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a real number, got {scaling!r}")
    scaling = float(scaling)  # a Python float: a NumPy float64 scalar would upcast a float32 W
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be a finite number > 0 (alpha/r or alpha/sqrt(r)), got {scaling!r}")

    U, S, Vh = np.linalg.svd(W, full_matrices=False)  # U (d_out, k), S (k,) descending, Vh = Vᵀ (k, d_in)
    root = np.sqrt(S[:r] / scaling)  # (r,)   √(Σ_r/s): the square root splits σ_i evenly between A and B
    A = root[:, None] * Vh[:r]  # (r, d_in)   √(Σ_r/s)·V_rᵀ, row i of Vᵀ scaled
    B = U[:, :r] * root  # (d_out, r)   U_r·√(Σ_r/s), column i of U scaled
    # The residual by subtraction, not from the trailing triplets: see the module docstring. s·(B @ A)
    # is lora.merge's ΔW, so merging the untrained adapter back gives W0 to one rounding per entry.
    W_res = W - scaling * (B @ A)  # (d_out, d_in)   U_{r:}·Σ_{r:}·V_{r:}ᵀ in exact arithmetic
    return A, B, W_res


# ----------------------------------------------------------------------------
# PiSSA in LoraConfig (init="pissa"): the core's seam on the configuration's side


def pissa_start(params, lora, seed):
    """PiSSA's start: A, B from each adapted W0's top-r singular triplets, and the residual W0 - s·B·A as
    the base to train on (in float64, then the params' dtype). The seed is not used: nothing is random."""
    base, adapters, dtype = params.copy(), {}, params["W_e"].dtype
    for l in range(params.config.n_layers):
        for t in lora.targets:
            name = f"blocks.{l}.{t}"
            A, B, residual = pissa_factors(params[name].astype(np.float64), lora.r, lora.scaling)
            adapters[name + ".A"], adapters[name + ".B"] = A.astype(dtype), B.astype(dtype)
            base[name] = residual.astype(dtype)
    return base, adapters


def _check_config(cfg):
    if cfg.init == "pissa" and cfg.method != "lora":
        raise ValueError(f"init='pissa' is an initialization of LoRA's A and B; method={cfg.method!r} has its own")


register("pissa", Extension(inits=("pissa",), check=_check_config, start=pissa_start))
