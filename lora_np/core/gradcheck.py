"""Numerical gradients, to check the hand-written ones (CS231n's recipe, in float64).

A backward pass computes a vector-Jacobian product: given dout = ∂L/∂out it returns
∂L/∂x = Jᵀ·dout. To check it without trusting any of our own backward code, take the
scalar L(x) = sum(f(x) * dout) and differentiate it numerically, one entry at a time:

    ∂L/∂x_i ≈ (L(x + h·e_i) - L(x - h·e_i)) / (2h)      (centered: error O(h²))

In float64 with h = 1e-5 the truncation error (~h²) and the round-off (~1e-16/h) are both
around 1e-10, so a correct gradient agrees to about 1e-8 relative or better.
"""

import numpy as np


def numerical_vjp(f, x, dout, h=1e-5):
    """Centered finite-difference gradient of sum(f() * dout) with respect to the array x.

    Inputs:
    - f: a function of no arguments that reads x (which is perturbed in place) and
      returns an array shaped like dout, or a float when dout is a float
    - x: float64 array, perturbed in place and restored exactly
    - dout: array like f's output (or a float for a scalar f)
    - h: step

    Returns:
    - dx: array shaped like x
    """
    if x.dtype != np.float64:
        raise ValueError(f"x must be float64 for a meaningful finite difference, got {x.dtype}")
    dx = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = np.sum(f() * dout)
        x[i] = old - h
        minus = np.sum(f() * dout)
        x[i] = old  # restored bit for bit: the same float is written back
        dx[i] = (plus - minus) / (2 * h)
    return dx


def rel_error(a, b):
    """max|a - b| / (max|a| + max|b|): the error relative to the tensors' scale.

    Scaled by the whole tensor, not entry by entry, so that an entry that is zero up to
    round-off (common after a causal mask or a sum that cancels) does not dominate.
    Two all-zero tensors have error 0.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.abs(a).max(initial=0.0) + np.abs(b).max(initial=0.0)
    return 0.0 if scale == 0.0 else float(np.abs(a - b).max() / scale)


def assert_grad_close(name, analytic, numeric, tol=1e-7, atol=0.0):
    """Check a gradient; raise AssertionError naming the tensor, its shape, the errors and a few values.

    Passes when rel_error < tol, or when every entry differs by less than atol. Leave atol
    at 0 except for a gradient known to be zero in exact arithmetic (∂L/∂b_k is one: softmax
    ignores a shift that all keys share), which finite differences only know to their
    noise, about 1e-16·|L|/h ≈ 1e-10, so no relative error can be small.

    Returns the relative error.
    """
    analytic, numeric = np.asarray(analytic), np.asarray(numeric)
    if analytic.shape != numeric.shape:
        raise AssertionError(f"{name}: analytic gradient has shape {analytic.shape}, expected {numeric.shape}")
    err = rel_error(analytic, numeric)
    diff = np.abs(analytic - numeric)
    max_abs = float(diff.max(initial=0.0))
    if not (err < tol or max_abs < atol):  # written so that a NaN fails
        worst = np.unravel_index(np.nanargmax(diff), diff.shape) if diff.size else ()
        raise AssertionError(
            f"{name} {analytic.shape}: relative error {err:.3e} >= {tol:.0e} and max abs error "
            f"{max_abs:.3e} >= {atol:.0e}; worst at {worst}: analytic {analytic[worst]!r}, "
            f"numeric {numeric[worst]!r}; first values analytic {analytic.ravel()[:3]}, "
            f"numeric {numeric.ravel()[:3]}"
        )
    return err
