"""PiSSA's start, property by property, over drawn shapes, ranks, scalings and spectra, in float64.

Two error bounds, both relative to σ_1 = ‖W0‖_2 (derivations in lora_np/pissa.py's docstring):

1. W_res + s·(B @ A) == W0 to within ε·σ_1 in every entry: u·(σ_1 + σ_{r+1}) + O(u²), u = ε/2.
   No factor of the dimensions and no dependence on the SVD's accuracy, because W_res was formed
   by subtracting that very product: adding it back undoes one rounding per entry.

2. Everything that rests on the SVD's accuracy (Eckart–Young, σ_{r+1}, the orthogonalities, the
   uniqueness of s·B·A) is tested to TOL(W) = C·(d_out + d_in)·ε·σ_1, times the natural scale of
   the quantity (√(σ_1/s) for A·W_resᵀ, σ_1/s for A·Aᵀ). Two errors add up to it:
   (i) the SVD's backward error: the computed U·Σ·Vᵀ is the exact SVD of W0 + E, ‖E‖_2 ≤
       p·ε·σ_1 (LAPACK Users' Guide). LAPACK gives no value for its "modestly growing" p; on
       20,000 matrices of the kinds drawn here, ‖E‖_2 reached 50·ε·σ_1 (small matrices with
       repeated or widely spread singular values, where the divide-and-conquer SVD deflates).
       In Frobenius norm, ‖E‖_F ≤ √k·‖E‖_2 ≤ 50·√k·ε·σ_1 ≤ 25·(d_out + d_in)·ε·σ_1, as
       √k ≤ k ≤ (d_out + d_in)/2.
   (ii) forming A, B, s·(B @ A) and W0 - s·(B @ A): each of the r terms of an entry goes through
       at most r + 7 roundings (the division by s and the square root, which A and B both carry,
       the scalings of U and Vᵀ, its product, r - 1 sums, the product by s, the subtraction), and
       the terms' magnitudes sum to at most σ_1 (|U_r|·Σ_r·|V_r|ᵀ ≤ σ_1 entrywise, by
       Cauchy–Schwarz). So ≤ (r + 7)·u·σ_1 per entry, ≤ √(d_out·d_in)·(r + 7)·u·σ_1 ≤
       (d_out + d_in)·(k + 7)/4·ε·σ_1 in Frobenius norm: ≤ 4·(d_out + d_in)·ε·σ_1 for k ≤ 8.
   So C = 29 covers the measured p and the worst-case rounding; C = 50 leaves headroom. The
   largest error seen over those 20,000 matrices was 6·(d_out + d_in)·ε·σ_1 (in A·W_resᵀ). A
   wrong formula (a missing s, a wrong singular vector, the factors' roles swapped) errs by
   O(σ_1), 10^13 times more.

Hypothesis draws four kinds of spectrum: a Gaussian W0; singular values spread over 8 decades;
repeated singular values (the SVD is then not unique beyond signs); and rank below k (σ_i = 0).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lora_np.layers import linear_forward, lora_linear_backward, lora_linear_forward
from lora_np.pissa import pissa_factors

EPS = np.finfo(np.float64).eps
C = 50
dims = st.integers(1, 8)
seeds = st.integers(0, 2**32 - 1)
SPECTRA = ("gaussian", "spread", "repeated", "low_rank")


def orthonormal(rng, n, k):
    """(n, k) with orthonormal columns (k <= n), random signs included."""
    Q, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return Q


def with_spectrum(rng, d_out, d_in, sigma):
    """W = Q1·diag(sigma)·Q2ᵀ, sigma (k,) descending, and Q1, Q2."""
    k = len(sigma)
    Q1, Q2 = orthonormal(rng, d_out, k), orthonormal(rng, d_in, k)
    return (Q1 * sigma) @ Q2.T, Q1, Q2


def draw_weight(rng, d_out, d_in, kind):
    k = min(d_out, d_in)
    scale = 10.0 ** rng.uniform(-3, 3)  # the bounds are relative to σ_1: any scale must pass
    if kind == "gaussian":
        return scale * rng.normal(size=(d_out, d_in))
    if kind == "spread":
        sigma = np.sort(10.0 ** rng.uniform(-8, 0, size=k))[::-1]
    elif kind == "repeated":
        sigma = np.sort(rng.choice([1.0, 1.0, 2.0, 3.0], size=k))[::-1]
    else:  # low_rank: rank 0 (W0 = 0) to k - 1
        rank = rng.integers(0, k)
        return scale * rng.normal(size=(d_out, rank)) @ rng.normal(size=(rank, d_in))
    return scale * with_spectrum(rng, d_out, d_in, sigma)[0]


@st.composite
def cases(draw):
    """(W0, r, s, σ): square or not, r from 1 to k, σ W0's singular values, computed independently."""
    d_out = draw(dims)
    d_in = d_out if draw(st.booleans()) else draw(dims)
    r = draw(st.integers(1, min(d_out, d_in)))
    rng = np.random.default_rng(draw(seeds))
    W = draw_weight(rng, d_out, d_in, draw(st.sampled_from(SPECTRA)))
    scaling = draw(st.floats(0.05, 8.0))
    # compute_uv=False: LAPACK's values-only path, not the one pissa_factors takes
    return W, r, scaling, np.linalg.svd(W, compute_uv=False)


def tol(W, sigma):
    return C * sum(W.shape) * EPS * sigma[0]


@given(case=cases())
def test_start_reconstructs_W0_to_one_rounding(case):
    W, r, s, sigma = case
    A, B, W_res = pissa_factors(W, r, s)
    assert A.shape == (r, W.shape[1]) and B.shape == (W.shape[0], r) and W_res.shape == W.shape
    err = np.abs(W_res + s * (B @ A) - W).max()
    assert err <= EPS * sigma[0], f"max |W_res + s·B·A - W0| = {err:.3e} > ε·σ_1 = {EPS * sigma[0]:.3e}"


@given(case=cases())
def test_s_B_A_is_the_best_rank_r_approximation(case):
    """Eckart–Young: ‖W0 - s·B·A‖_F = sqrt(σ_{r+1}² + ... + σ_k²), the least any rank-r matrix
    achieves. Compared as norms, not squares: a squared norm's error grows with the norm."""
    W, r, s, sigma = case
    A, B, W_res = pissa_factors(W, r, s)
    tail = np.sqrt(np.sum(sigma[r:] ** 2))
    err = abs(np.linalg.norm(W - s * (B @ A)) - tail)
    assert err <= tol(W, sigma), f"‖W0 - s·B·A‖_F off the Eckart–Young value {tail:.6e} by {err:.3e}"


@given(case=cases())
def test_residual_keeps_the_rest_of_the_spectrum(case):
    """W_res = U_{r:}·Σ_{r:}·V_{r:}ᵀ: its largest singular value is σ_{r+1} (0 when r = k)."""
    W, r, s, sigma = case
    _, _, W_res = pissa_factors(W, r, s)
    sigma_next = sigma[r] if r < len(sigma) else 0.0
    err = abs(np.linalg.norm(W_res, 2) - sigma_next)
    assert err <= tol(W, sigma), f"‖W_res‖_2 = σ_(r+1) = {sigma_next:.6e} missed by {err:.3e}"


@given(case=cases())
def test_residual_is_orthogonal_to_the_adapter(case):
    """W_res's rows are orthogonal to A's rows (A·W_resᵀ = 0) and its columns to B's (Bᵀ·W_res = 0):
    the adapter holds the principal directions, the frozen base the rest."""
    W, r, s, sigma = case
    A, B, W_res = pissa_factors(W, r, s)
    bound = tol(W, sigma) * np.sqrt(sigma[0] / s)  # A's and B's norms are √(σ_1/s)
    for name, M in (("A·W_resᵀ", A @ W_res.T), ("Bᵀ·W_res", B.T @ W_res)):
        assert np.abs(M).max() <= bound, f"{name} should be 0: max {np.abs(M).max():.3e} > {bound:.3e}"


@given(case=cases())
def test_factors_are_orthogonal_with_the_singular_values_on_the_diagonal(case):
    """A·Aᵀ = Σ_r/s (A's rows orthogonal) and Bᵀ·B = Σ_r/s (B's columns orthogonal)."""
    W, r, s, sigma = case
    A, B, _ = pissa_factors(W, r, s)
    expected = np.diag(sigma[:r] / s)
    bound = tol(W, sigma) / s
    for name, M in (("A·Aᵀ", A @ A.T), ("Bᵀ·B", B.T @ B)):
        err = np.abs(M - expected).max()
        assert err <= bound, f"{name} should be diag(Σ_r/s) = {np.diag(expected)}: off by {err:.3e} > {bound:.3e}"


@given(
    d_out=dims,
    d_in=dims,
    data=st.data(),
    s=st.floats(0.05, 8.0),
    seed=seeds,
)
def test_s_B_A_does_not_depend_on_the_svds_signs(d_out, d_in, data, s, seed):
    """With a gap σ_r > σ_{r+1}, s·B·A is W0's unique best rank-r approximation, whatever signs
    LAPACK gives each (u_i, v_i). W0 is built as Q1·Σ·Q2ᵀ with Q1, Q2 of random signs, so the
    exact answer Q1_r·Σ_r·Q2_rᵀ is known; and W0 is also fed rotated by signed permutations, which
    changes the signs and order LAPACK works in. Perturbation theory (Wedin) scales the error by
    1 + 2σ_1/gap: here σ_1 <= 2 and the gap >= 0.5."""
    rng = np.random.default_rng(seed)
    k = min(d_out, d_in)
    r = data.draw(st.integers(1, k))
    sigma = np.concatenate([np.sort(rng.uniform(1, 2, size=r))[::-1], np.sort(rng.uniform(0, 0.5, size=k - r))[::-1]])
    W, Q1, Q2 = with_spectrum(rng, d_out, d_in, sigma)
    bound = tol(W, sigma) * (1 + 2 * sigma[0] / 0.5)
    A, B, _ = pissa_factors(W, r, s)
    exact = (Q1[:, :r] * sigma[:r]) @ Q2[:, :r].T
    assert np.abs(s * (B @ A) - exact).max() <= bound

    def signed_permutation(n):
        return np.eye(n)[rng.permutation(n)] * rng.choice([-1.0, 1.0], size=n)

    P1, P2 = signed_permutation(d_out), signed_permutation(d_in)
    A2, B2, _ = pissa_factors(P1 @ W @ P2.T, r, s)  # exact: P1 and P2 only move and negate entries
    assert np.abs(s * (B2 @ A2) - P1 @ exact @ P2.T).max() <= bound


def test_a_sign_flip_of_the_svd_moves_the_factors_not_their_product():
    """-W0 has the same singular values; its SVD must flip u_i or v_i of every pair. The factors
    change sign pair by pair (row i of A with column i of B, or one of them), the product only
    by the overall -1 it must."""
    rng = np.random.default_rng(4)
    W, s, r = rng.normal(size=(6, 5)), 0.5, 3
    A, B, W_res = pissa_factors(W, r, s)
    A2, B2, W_res2 = pissa_factors(-W, r, s)
    for i in range(r):  # each factor row/column is the old one or its negative
        a = 1.0 if np.allclose(A2[i], A[i], atol=1e-12) else -1.0
        b = 1.0 if np.allclose(B2[:, i], B[:, i], atol=1e-12) else -1.0
        np.testing.assert_allclose(A2[i], a * A[i], atol=1e-12)
        np.testing.assert_allclose(B2[:, i], b * B[:, i], atol=1e-12)
        assert a * b == -1.0  # exactly one of the pair flipped: the product of the pair changed sign
    np.testing.assert_allclose(s * (B2 @ A2), -s * (B @ A), atol=1e-12)
    np.testing.assert_allclose(W_res2, -W_res, atol=1e-12)


@given(N=dims, d_in=dims, d_out=dims, data=st.data(), s=st.floats(0.05, 8.0), seed=seeds)
def test_adapted_layer_starts_as_the_base_layer(N, d_in, d_out, data, s, seed):
    """The LoRA layer on (W_res, A, B) computes x·W0ᵀ + b to round-off. Entry by entry, the
    products' roundings are at most γ_{d_in}, γ_{d_in+r+1} and γ_{d_in} times ‖x‖_1·σ_1 (for the
    residual, the adapter and the reference, γ_n = n·u), plus ε·σ_1·‖x‖_1 from the start itself
    and a few u·(‖x‖_1·σ_1 + |b|) for the additions: at most 2·(d_in + r + 2)·ε·(‖x‖_1·σ_1 + |b|).
    Unlike LoRA's start (B = 0, so dA = 0), both adapter gradients are non-zero."""
    rng = np.random.default_rng(seed)
    r = data.draw(st.integers(1, min(d_in, d_out)))
    W, x, b = rng.normal(size=(d_out, d_in)), rng.normal(size=(N, d_in)), rng.normal(size=d_out)
    A, B, W_res = pissa_factors(W, r, s)
    out, cache = lora_linear_forward(x, W_res, b, A, B, s)
    base, _ = linear_forward(x, W, b)
    sigma_1 = np.linalg.norm(W, 2)
    bound = 2 * (d_in + r + 2) * EPS * (np.abs(x).sum(axis=1, keepdims=True) * sigma_1 + np.abs(b))
    assert np.all(np.abs(out - base) <= bound), f"max excess {(np.abs(out - base) / bound).max():.3f} of the bound"
    _, dA, dB = lora_linear_backward(rng.normal(size=out.shape), cache)
    assert np.any(dA != 0) and np.any(dB != 0)


def test_float32_stays_float32():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(7, 5)).astype(np.float32)
    A, B, W_res = pissa_factors(W, 2, np.float64(2.0))  # a NumPy float64 s must not upcast
    assert A.dtype == B.dtype == W_res.dtype == np.float32
    sigma_1 = np.linalg.norm(W.astype(np.float64), 2)
    assert np.abs(W_res + np.float32(2.0) * (B @ A) - W).max() <= np.finfo(np.float32).eps * sigma_1


@pytest.mark.parametrize(
    "W, r, s, error, message",
    [
        (np.ones((3, 4)), 0, 1.0, ValueError, r"r must be between 1 and min\(d_out, d_in\) = 3 .*, got r=0"),
        (np.ones((3, 4)), 4, 1.0, ValueError, r"r must be between 1 and min\(d_out, d_in\) = 3 .*, got r=4"),
        (np.ones((3, 4)), 2.0, 1.0, TypeError, r"r must be an int, got 2.0"),
        (np.ones((3, 4)), True, 1.0, TypeError, r"r must be an int, got True"),
        (np.ones((3, 4)), 2, 0.0, ValueError, r"scaling must be a finite number > 0 \(alpha/r or .*, got 0.0"),
        (np.ones((3, 4)), 2, -1, ValueError, r"scaling must be a finite number > 0 .*, got -1"),
        (np.ones((3, 4)), 2, float("nan"), ValueError, r"scaling must be a finite number > 0 .*, got nan"),
        (np.ones((3, 4)), 2, "1", TypeError, r"scaling must be a real number, got '1'"),
        (np.ones(4), 1, 1.0, TypeError, r"W must be a 2-D NumPy array \(d_out, d_in\), got ndarray of shape \(4,\)"),
        ([[1.0, 2.0]], 1, 1.0, TypeError, r"W must be a 2-D NumPy array \(d_out, d_in\), got list of shape \(1, 2\)"),
        (np.ones((3, 4), dtype=int), 1, 1.0, TypeError, r"W must be a float array .*, got dtype int64"),
        (np.full((3, 4), np.nan), 1, 1.0, ValueError, r"W must be finite: it has NaN or inf entries"),
        (np.ones((3, 4), dtype=np.float16), 1, 1.0, TypeError, r"W must be a float array .*, got dtype float16"),
    ],
)
def test_bad_arguments_explain_themselves(W, r, s, error, message):
    with pytest.raises(error, match=message):
        pissa_factors(W, r, s)
