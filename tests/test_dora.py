"""DoRA's forward/backward pair against centered finite differences, and its invariants, in float64.

Every input with a gradient (x, A, B, m) is checked separately, at B ≠ 0, for both backwards:
the exact one against the forward itself, the detached one (paper, Section 4.3) against a
forward whose norm is held at its unperturbed value. Then the invariants: the start is the base
layer bit for bit, merge equals unmerged, unmerge needs the merge-time norms, frozen gradients
are not formed, nothing d_out × d_in is ever formed, float32 stays float32.
"""

from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from lora_np.dora import (
    dora_linear_backward,
    dora_linear_forward,
    dora_magnitude_init,
    dora_merge,
    dora_unmerge,
    dora_weight_norm,
)
from lora_np.gradcheck import assert_grad_close, numerical_vjp, rel_error

from lora_np.course.student import Spy, formed, spying

TOL = 1e-7
dims = st.integers(1, 6)
seeds = st.integers(0, 2**32 - 1)


@dataclass(frozen=True)
class Case:
    """One DoRA layer's sizes and values."""

    lead: tuple  # leading shape of x: (N,) or (B, T)
    d_in: int
    d_out: int
    r: int
    scaling: float
    bias: bool
    dropout: float
    seed: int

    def arrays(self, dtype=np.float64):
        """x, W, b, A, B, m, dout, drawn from the seed."""
        rng = np.random.default_rng(self.seed)
        x = rng.normal(size=(*self.lead, self.d_in))
        W = rng.normal(size=(self.d_out, self.d_in))
        b = rng.normal(size=self.d_out) if self.bias else None
        A = rng.normal(size=(self.r, self.d_in))
        # B ≠ 0: at B = 0, dA is exactly zero and a check of it would pass vacuously
        B = rng.normal(size=(self.d_out, self.r))
        # m moved away from its init ‖W0‖, so that m/n is not close to 1 everywhere
        m = dora_magnitude_init(W, A, self.scaling) * rng.uniform(0.5, 2.0, size=self.d_out)
        dout = rng.normal(size=(*self.lead, self.d_out))
        return [None if a is None else a.astype(dtype) for a in (x, W, b, A, B, m, dout)]

    def forward(self, x, W, b, A, B, m, detach_norm=True):
        # the same dropout mask on every call: a fresh generator from the same seed
        rng = np.random.default_rng(self.seed + 1)
        return dora_linear_forward(
            x, W, b, A, B, m, self.scaling, dropout=self.dropout, rng=rng, detach_norm=detach_norm
        )

    def __str__(self):
        return (f"x {(*self.lead, self.d_in)}, W {(self.d_out, self.d_in)}, r = {self.r}, s = {self.scaling}, "
                f"{'with' if self.bias else 'no'} bias, dropout {self.dropout}")  # fmt: skip


@st.composite
def cases(draw, min_d_in=1, dropouts=(0.0, 0.3)):
    d_in = draw(st.integers(min_d_in, 6))
    d_out = d_in if draw(st.booleans()) else draw(dims)  # square half of the time
    lead = draw(st.one_of(st.tuples(dims), st.tuples(st.integers(1, 3), st.integers(1, 4))))
    return Case(lead, d_in, d_out, draw(st.integers(1, 4)), draw(st.floats(0.1, 4.0)), draw(st.booleans()),
                draw(st.sampled_from(dropouts)), draw(seeds))  # fmt: skip


# The corners, run on every CI run whatever hypothesis draws: square and not, r = 1, both
# leading shapes, with and without bias and dropout.
CORNERS = [
    Case((4,), 5, 5, 1, 2.0, False, 0.0, 1),  # square, r = 1, no bias, no dropout
    Case((2, 3), 4, 6, 1, 0.5, True, 0.3, 2),  # tall, (B, T), bias, dropout
    Case((3,), 6, 2, 3, 4.0, True, 0.0, 3),  # wide, bias
    Case((2, 2), 3, 3, 2, 1.0, False, 0.3, 4),  # square, (B, T), dropout
]


def with_corners(test):
    for case in reversed(CORNERS):
        test = example(case)(test)
    return test


def check(name, analytic, f, x, dout, case):
    assert analytic.shape == x.shape, f"{name}: gradient shape {analytic.shape} != parameter shape {x.shape} ({case})"
    assert_grad_close(f"{name} ({case})", analytic, numerical_vjp(f, x, dout), TOL)


# ----------------------------------------------------------------------------
# gradients


# d_in >= 2: with d_in = 1 a row of V is a single number, its direction is ±1, and without
# dropout h does not depend on A or B at all; the exact dA, dB are zero up to round-off and only
# the finite-difference noise would be left to compare.
@given(cases(min_d_in=2))
@with_corners
def test_dora_exact_gradients(case):
    x, W, b, A, B, m, dout = case.arrays()
    _, cache = case.forward(x, W, b, A, B, m, detach_norm=False)
    dx, dA, dB, dm = dora_linear_backward(dout, cache)

    def f():
        return case.forward(x, W, b, A, B, m, detach_norm=False)[0]

    check("dx", dx, f, x, dout, case)
    check("dA", dA, f, A, dout, case)
    check("dB", dB, f, B, dout, case)
    check("dm", dm, f, m, dout, case)


@given(cases())
@with_corners
def test_dora_detached_gradients(case):
    """Section 4.3: the backward of a forward in which n = ‖V‖ is a constant, not a function of A, B."""
    x, W, b, A, B, m, dout = case.arrays()
    out, cache = case.forward(x, W, b, A, B, m, detach_norm=True)
    dx, dA, dB, dm = dora_linear_backward(dout, cache)
    mask = cache[3]  # the forward's dropout mask, (N, d_in) or None
    n0 = dora_weight_norm(W, A, B, case.scaling)  # held at the unperturbed values

    def frozen_norm_forward():
        x2 = x.reshape(-1, case.d_in)
        xd = x2 if mask is None else x2 * mask
        y = x2 @ W.T + case.scaling * (xd @ A.T) @ B.T
        h = y * (m / n0) + (0.0 if b is None else b)
        return h.reshape(*case.lead, case.d_out)

    np.testing.assert_allclose(frozen_norm_forward(), out, rtol=1e-13, atol=1e-13)  # the same function here
    check("dx", dx, frozen_norm_forward, x, dout, case)
    check("dA", dA, frozen_norm_forward, A, dout, case)
    check("dB", dB, frozen_norm_forward, B, dout, case)
    check("dm", dm, frozen_norm_forward, m, dout, case)
    # dm and dx do not go through n: the same code, the same floats, in both variants
    dx_exact, _, _, dm_exact = dora_linear_backward(dout, case.forward(x, W, b, A, B, m, detach_norm=False)[1])
    assert np.array_equal(dx, dx_exact) and np.array_equal(dm, dm_exact)


@given(cases(dropouts=(0.0,)))
def test_dora_gradients_are_the_papers_eq_6_7_11(case):
    """Arithmetic done another way: dense ∂L/∂W', projected (eq. 6) or not (eq. 11), through V = W0 + s·B·A."""
    x, W, b, A, B, m, dout = case.arrays()
    s = case.scaling
    G = dout.reshape(-1, case.d_out).T @ x.reshape(-1, case.d_in)  # (d_out, d_in)   ∂L/∂W' = Σ g·xᵀ
    V = W + s * B @ A
    n = np.linalg.norm(V, axis=1)
    v = V / n[:, None]  # unit directions
    Gv = np.sum(G * v, axis=1)  # (d_out,)   G_i·v̂_i
    dV = {
        False: (m / n)[:, None] * (G - Gv[:, None] * v),  # eq. (6): scaled by m/n, projected away from V
        True: (m / n)[:, None] * G,  # eq. (11): only scaled
    }
    for detach in (False, True):
        dx, dA, dB, dm = dora_linear_backward(dout, case.forward(x, W, b, A, B, m, detach_norm=detach)[1])
        np.testing.assert_allclose(dm, Gv, rtol=1e-12, atol=1e-12)  # eq. (7): ∇_m L = ∇_W' L · V / ‖V‖
        np.testing.assert_allclose(dB, s * dV[detach] @ A.T, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(dA, s * B.T @ dV[detach], rtol=1e-11, atol=1e-11)


def test_the_two_backwards_differ_in_dA_and_dB_only():
    case = Case((5,), 4, 3, 2, 2.0, True, 0.0, 7)
    x, W, b, A, B, m, dout = case.arrays()
    for B_ in (B, np.zeros_like(B)):
        exact = dora_linear_backward(dout, case.forward(x, W, b, A, B_, m, detach_norm=False)[1])
        detached = dora_linear_backward(dout, case.forward(x, W, b, A, B_, m, detach_norm=True)[1])
        (dx_e, dA_e, dB_e, dm_e), (dx_d, dA_d, dB_d, dm_d) = exact, detached
        assert np.array_equal(dx_e, dx_d) and np.array_equal(dm_e, dm_d)
        # dB differs even at B = 0: n_i = ‖W0_i + s·B_i·A‖ depends on B_i to first order there,
        # ∂n_i/∂B_i = s·(W0·Aᵀ)_i / n_i, so the first training step already differs
        assert rel_error(dB_e, dB_d) > 1e-2, rel_error(dB_e, dB_d)
        if B_ is B:
            assert rel_error(dA_e, dA_d) > 1e-2, rel_error(dA_e, dA_d)
        else:  # at B = 0 both dA are zero: every term has a factor B
            assert not dA_e.any() and not dA_d.any()


# ----------------------------------------------------------------------------
# invariants


@given(cases())
@with_corners
def test_start_is_the_base_layer_bit_for_bit(case):
    x, W, b, A, _, _, _ = case.arrays()
    x = x.reshape(-1, case.d_in)  # 2-D, so that W0·x is one product whichever way it is written
    B0 = np.zeros((case.d_out, case.r))
    m = dora_magnitude_init(W, A, case.scaling)
    np.testing.assert_allclose(m, np.linalg.norm(W, axis=1), rtol=1e-14)  # eq. (2): m = ‖W0‖
    assert np.all(m / dora_weight_norm(W, A, B0, case.scaling) == 1.0)
    base = x @ W.T + (0.0 if b is None else b)
    for detach in (True, False):
        out, _ = case.forward(x, W, b, A, B0, m, detach_norm=detach)  # with dropout too: its path is zero
        err = rel_error(out, base)
        assert np.array_equal(out, base), f"B = 0 must give x·W0ᵀ + b bit for bit, relative error {err} ({case})"


@given(cases(dropouts=(0.0,)))
@with_corners
def test_merge_equals_unmerged(case):
    case = replace(case, dropout=0.0)  # dropout is training-time noise: the merged layer is the one without it
    x, W, b, A, B, m, _ = case.arrays()
    W_merged = dora_merge(W, A, B, m, case.scaling)
    out, _ = case.forward(x, W, b, A, B, m)
    merged = x @ W_merged.T + (0.0 if b is None else b)
    np.testing.assert_allclose(merged, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(W_merged, axis=1), m, rtol=1e-12)  # eq. (5): row i has norm m_i


@given(cases())
def test_unmerge_with_the_merge_time_norms_recovers_W0(case):
    _, W, _, A, B, m, _ = case.arrays()
    norms = dora_weight_norm(W, A, B, case.scaling)  # kept at merge time
    W_merged = dora_merge(W, A, B, m, case.scaling)
    np.testing.assert_allclose(dora_unmerge(W_merged, A, B, m, case.scaling, norms), W, rtol=1e-12, atol=1e-12)


def test_unmerge_cannot_do_without_the_norms():
    """Two different W0 with the same A, B, m merge to the same W': only the norms tell them apart."""
    case = Case((1,), 5, 4, 2, 1.5, False, 0.0, 11)
    _, W, _, A, B, m, _ = case.arrays()
    s = case.scaling
    t = np.array([0.5, 2.0, 3.0, 1.5])  # any positive multiple of each row of V
    W_other = t[:, None] * (W + s * B @ A) - s * B @ A  # V_other = t ⊙ V: same directions
    assert np.abs(W_other - W).max() > 0.5
    merged, merged_other = dora_merge(W, A, B, m, s), dora_merge(W_other, A, B, m, s)
    np.testing.assert_allclose(merged_other, merged, rtol=1e-12, atol=1e-12)  # the same W'
    # from that one W', each set of merge-time norms gives back its own W0
    for W0 in (W, W_other):
        norms = dora_weight_norm(W0, A, B, s)
        np.testing.assert_allclose(dora_unmerge(merged, A, B, m, s, norms), W0, rtol=1e-12, atol=1e-12)


@given(cases())
def test_weight_norm_matches_forming_V(case):
    """Arithmetic done another way: the identity against the norm of V itself."""
    _, W, _, A, B, _, _ = case.arrays()
    n = dora_weight_norm(W, A, B, case.scaling)
    np.testing.assert_allclose(n, np.linalg.norm(W + case.scaling * B @ A, axis=1), rtol=1e-12)


def test_weight_norm_round_off_under_cancellation():
    """The identity's relative error is about eps·κ, κ = ((‖W0_i‖ + s‖(BA)_i‖) / ‖V_i‖)², as _row_norms says.

    Rows of V are made δ times shorter than W0's by W0 = -s·B·A + δ·U. In float32, the float64 norm
    of V (error about 1e-16/δ) is the reference.
    """
    rng = np.random.default_rng(0)
    d_out, d_in, r, s = 8, 64, 4, 2.0
    eps = float(np.finfo(np.float32).eps)
    errors = {}
    for delta in (1.0, 1e-1, 1e-2):
        A = (rng.normal(size=(r, d_in)) / np.sqrt(d_in)).astype(np.float32)
        B = rng.normal(size=(d_out, r)).astype(np.float32)
        BA = s * B.astype(np.float64) @ A.astype(np.float64)
        U = rng.normal(size=(d_out, d_in))
        U *= np.linalg.norm(BA, axis=1, keepdims=True) / np.linalg.norm(U, axis=1, keepdims=True)
        W = (-BA + delta * U).astype(np.float32)
        W64, V64 = W.astype(np.float64), W.astype(np.float64) + BA
        ref = np.linalg.norm(V64, axis=1)
        kappa = ((np.linalg.norm(W64, axis=1) + np.linalg.norm(BA, axis=1)) / ref) ** 2
        err = np.abs(dora_weight_norm(W, A, B, s).astype(np.float64) - ref) / ref
        assert np.all(err <= 4 * eps * kappa), (delta, err.max(), (eps * kappa).max())
        errors[delta] = err.max()
    assert errors[1e-2] > 1e3 * eps  # the concern is real: digits are lost as V shrinks


# ----------------------------------------------------------------------------
# frozen means not computed; nothing d_out × d_in; dtypes; arguments


@pytest.mark.parametrize("detach", [True, False])
def test_frozen_gradients_are_not_formed(detach):
    case = Case((5,), 7, 6, 2, 2.0, True, 0.0, 3)  # N, d_in, d_out, r all different
    x, W, b, A, B, m, dout = case.arrays()
    _, cache = case.forward(x, W, b, A, B, m, detach_norm=detach)
    full = dora_linear_backward(dout, cache)
    for need_dA in (True, False):
        for need_dB in (True, False):
            for need_dm in (True, False):
                got = dora_linear_backward(dout, cache, need_dA=need_dA, need_dB=need_dB, need_dm=need_dm)
                assert got[0].shape == x.shape and np.array_equal(got[0], full[0])
                for g, g_full, need in zip(got[1:], full[1:], (need_dA, need_dB, need_dm), strict=True):
                    assert (g is None) if not need else np.array_equal(g, g_full)
    # none formed, not even on the way: no (r, d_in), (d_out, r) or (d_out,) result at all
    spied = tuple(a.view(Spy) if isinstance(a, np.ndarray) else a for a in cache)
    with spying() as shapes:
        dora_linear_backward(dout.view(Spy), spied, need_dA=False, need_dB=False, need_dm=False)
    assert not any(tuple(s) in {(2, 7), (6, 2), (6,)} for s in shapes), shapes


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("detach", [True, False])
def test_nothing_d_out_by_d_in_is_formed(dropout, detach):
    """Forward and backward: the norms come from W0·Aᵀ and A·Aᵀ, so V is not formed in either."""
    N, d_in, d_out, r = 5, 7, 6, 2  # all different, so a shape tells a product apart
    case = Case((N,), d_in, d_out, r, 2.0, True, dropout, 4)
    x, W, b, A, B, m, dout = (None if a is None else a.view(Spy) for a in case.arrays())
    with spying() as shapes:
        _, cache = case.forward(x, W, b, A, B, m, detach_norm=detach)
        dora_linear_backward(dout, cache)
    assert shapes, "the spy saw no product: the test would pass vacuously"
    assert formed(shapes, {(d_out, d_in), (d_in, d_out)}) is None, shapes


def test_float32_in_float32_out():
    case = Case((2, 3), 4, 5, 2, 2.0, True, 0.3, 5)
    x, W, b, A, B, m, dout = case.arrays(np.float32)
    for detach in (True, False):
        out, cache = case.forward(x, W, b, A, B, m, detach_norm=detach)
        assert out.dtype == np.float32
        for name, g in zip(("dx", "dA", "dB", "dm"), dora_linear_backward(dout, cache), strict=True):
            assert g.dtype == np.float32, f"{name} is {g.dtype}"
    norms = dora_weight_norm(W, A, B, case.scaling)
    merged = dora_merge(W, A, B, m, case.scaling)
    assert norms.dtype == merged.dtype == dora_magnitude_init(W, A, case.scaling).dtype == np.float32
    assert dora_unmerge(merged, A, B, m, case.scaling, norms).dtype == np.float32


def test_bad_arguments_are_named():
    case = Case((3,), 4, 5, 2, 1.0, False, 0.0, 6)
    x, W, b, A, B, m, _ = case.arrays()
    with pytest.raises(ValueError, match="dropout"):
        dora_linear_forward(x, W, b, A, B, m, 1.0, dropout=1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        dora_linear_forward(x, W, b, A, B, m, 1.0, dropout=0.1)
    with pytest.raises(ValueError, match=r"m must have shape \(d_out,\) = \(5,\).*\(5, 1\)"):
        dora_linear_forward(x, W, b, A, B, m[:, None], 1.0)
