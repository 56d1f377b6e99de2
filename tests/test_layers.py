"""Every forward/backward pair against centered finite differences, in float64.

For each op: draw shapes and values, draw a random upstream gradient dout, and compare
op_backward(dout, cache) with the numerical gradient of sum(op_forward(...) * dout) for
every input separately. Single ops must agree to 1e-7 relative.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lora_np.gradcheck import assert_grad_close, numerical_vjp
from lora_np.layers import (
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    lora_linear_backward,
    lora_linear_forward,
)

from lora_np.course.student import Spy, formed, spying

TOL = 1e-7
dims = st.integers(1, 6)
seeds = st.integers(0, 2**32 - 1)


def check(name, analytic, f, x, dout):
    assert analytic.shape == x.shape, f"{name}: gradient shape {analytic.shape} != parameter shape {x.shape}"
    assert_grad_close(name, analytic, numerical_vjp(f, x, dout), TOL)


@given(N=dims, d_in=dims, d_out=dims, bias=st.booleans(), seed=seeds)
def test_linear(N, d_in, d_out, bias, seed):
    rng = np.random.default_rng(seed)
    x, W = rng.normal(size=(2, N, d_in)), rng.normal(size=(d_out, d_in))
    b = rng.normal(size=d_out) if bias else None
    out, cache = linear_forward(x, W, b)
    dout = rng.normal(size=out.shape)
    dx, dW, db = linear_backward(dout, cache)

    def f():
        return linear_forward(x, W, b)[0]

    check("dx", dx, f, x, dout)
    check("dW", dW, f, W, dout)
    if bias:
        check("db", db, f, b, dout)
    else:
        assert db is None


# "Not formed" seen from inside: Spy (lora_np.course.student) is an ndarray that logs the shape
# of every product and reduction computed from it. The sizes are distinct, so a logged shape says
# which gradient it was: (d_out, d_in) can only be dW. Each test also runs with the flag on, where
# the spy must see the product: a spy that saw nothing would prove nothing.
N_, D_IN, D_OUT, R = 3, 5, 7, 2
FLAGS = [(False, False), (False, True), (True, False), (True, True)]


def spies(rng, *shapes):
    return [rng.normal(size=shape).view(Spy) for shape in shapes]


@pytest.mark.parametrize("need_dW, need_db", FLAGS)
def test_linear_frozen_gradients_are_never_formed(need_dW, need_db):
    x, W, b, dout = spies(np.random.default_rng(0), (N_, D_IN), (D_OUT, D_IN), D_OUT, (N_, D_OUT))
    _, cache = linear_forward(x, W, b)
    with spying() as shapes:
        dx, dW, db = linear_backward(dout, cache, need_dW=need_dW, need_db=need_db)
    assert (dW is not None, db is not None) == (need_dW, need_db)
    assert (formed(shapes, {(D_OUT, D_IN)}) is not None) == need_dW, f"need_dW={need_dW}, products {shapes}"
    assert ((D_OUT,) in shapes) == need_db, f"need_db={need_db}, products and sums {shapes}"  # db = Σ_n g


@pytest.mark.parametrize("need_dA, need_dB", FLAGS)
def test_lora_linear_frozen_adapter_is_never_formed(need_dA, need_dB):
    rng = np.random.default_rng(0)
    x, W, b, A, B, dout = spies(rng, (N_, D_IN), (D_OUT, D_IN), D_OUT, (R, D_IN), (D_OUT, R), (N_, D_OUT))
    _, cache = lora_linear_forward(x, W, b, A, B, 0.5)
    with spying() as shapes:
        dx, dA, dB = lora_linear_backward(dout, cache, need_dA=need_dA, need_dB=need_dB)
    assert (dA is not None, dB is not None) == (need_dA, need_dB)
    assert (formed(shapes, {(R, D_IN)}) is not None) == need_dA, f"need_dA={need_dA}, products {shapes}"
    assert (formed(shapes, {(D_OUT, R)}) is not None) == need_dB, f"need_dB={need_dB}, products {shapes}"
    assert formed(shapes, {(D_OUT, D_IN)}) is None, f"a d_out × d_in product was formed: {shapes}"  # B·A, dW0


@pytest.mark.parametrize("need_dgamma, need_dbeta", FLAGS)
def test_layernorm_frozen_gradients_are_never_formed(need_dgamma, need_dbeta):
    # dgamma = Σ_n dout·xhat and dbeta = Σ_n dout are the only sums over positions, both (D,):
    # their number tells how many were formed (dx's means are over D, shaped (N, 1)).
    x, gamma, beta, dout = spies(np.random.default_rng(0), (N_, D_IN), D_IN, D_IN, (N_, D_IN))
    _, cache = layernorm_forward(x, gamma, beta)
    with spying() as shapes:
        dx, dgamma, dbeta = layernorm_backward(dout, cache, need_dgamma=need_dgamma, need_dbeta=need_dbeta)
    assert (dgamma is not None, dbeta is not None) == (need_dgamma, need_dbeta)
    assert shapes.count((D_IN,)) == need_dgamma + need_dbeta, f"flags {need_dgamma, need_dbeta}, sums {shapes}"


@given(
    N=dims,
    d_in=dims,
    d_out=dims,
    r=st.integers(1, 4),
    scaling=st.floats(0.1, 4.0),
    dropout=st.sampled_from([0.0, 0.3]),
    seed=seeds,
)
def test_lora_linear(N, d_in, d_out, r, scaling, dropout, seed):
    rng = np.random.default_rng(seed)
    x, W, b = rng.normal(size=(2, N, d_in)), rng.normal(size=(d_out, d_in)), rng.normal(size=d_out)
    # B is non-zero: at B = 0, dA is exactly zero and a check of it would pass vacuously
    A, B = rng.normal(size=(r, d_in)), rng.normal(size=(d_out, r))

    def f():
        # the same dropout mask on every call: a fresh generator from the same seed
        drop_rng = np.random.default_rng(seed + 1)
        return lora_linear_forward(x, W, b, A, B, scaling, dropout=dropout, rng=drop_rng)[0]

    out = f()
    _, cache = lora_linear_forward(x, W, b, A, B, scaling, dropout=dropout, rng=np.random.default_rng(seed + 1))
    dout = rng.normal(size=out.shape)
    dx, dA, dB = lora_linear_backward(dout, cache)
    check("dx", dx, f, x, dout)
    check("dA", dA, f, A, dout)
    check("dB", dB, f, B, dout)


def test_lora_linear_matches_dense_delta_w():
    """Arithmetic done another way: the unfused layer equals x·(W0 + s·B·A)ᵀ + b."""
    rng = np.random.default_rng(3)
    x, W, b = rng.normal(size=(5, 6)), rng.normal(size=(4, 6)), rng.normal(size=4)
    A, B = rng.normal(size=(2, 6)), rng.normal(size=(4, 2))
    out, _ = lora_linear_forward(x, W, b, A, B, 0.5)
    np.testing.assert_allclose(out, x @ (W + 0.5 * B @ A).T + b, rtol=1e-12, atol=1e-12)


def test_lora_dropout_is_inverted_and_only_on_the_lora_input():
    rng = np.random.default_rng(0)
    x = np.ones((20000, 1))
    W, b = np.zeros((1, 1)), None
    A, B = np.ones((1, 1)), np.ones((1, 1))
    out, cache = lora_linear_forward(x, W, b, A, B, 1.0, dropout=0.25, rng=rng)
    kept = out[:, 0] != 0
    assert np.allclose(out[kept, 0], 1 / 0.75)  # survivors scaled by 1/(1-p)
    assert abs(kept.mean() - 0.75) < 0.02  # about 1-p survive
    assert abs(out.mean() - 1.0) < 0.03  # so the expectation is unchanged
    # the LoRA branch off (B = 0): W0 = 1 sees the clean x, so nothing is dropped on its path
    out2, _ = lora_linear_forward(x, np.ones((1, 1)), b, A, np.zeros((1, 1)), 1.0, dropout=0.25, rng=rng)
    assert np.all(out2 == 1.0)


@given(n_rows=dims, D=dims, B=dims, T=dims, seed=seeds)
def test_embedding(n_rows, D, B, T, seed):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n_rows, D))
    ids = rng.integers(0, n_rows, size=(B, T))  # repeats are likely: they must accumulate
    out, cache = embedding_forward(ids, W)
    dout = rng.normal(size=out.shape)
    check("dW", embedding_backward(dout, cache), lambda: embedding_forward(ids, W)[0], W, dout)


# D >= 3: with D = 2 a normalized row is always (-1, 1) up to eps, so dx is ~eps-small and
# only the finite-difference noise is left to compare.
@given(N=dims, D=st.integers(3, 8), scale=st.floats(0.5, 10.0), seed=seeds)
def test_layernorm(N, D, scale, seed):
    rng = np.random.default_rng(seed)
    # LayerNorm's curvature grows like 1/std³: a row whose entries nearly coincide is
    # ill-conditioned for finite differences (not for the analytic gradient), so each row is
    # given a spread of at least 0.5 and a random offset.
    z = rng.normal(size=(2, N, D))
    z = (z - z.mean(axis=-1, keepdims=True)) / z.std(axis=-1, keepdims=True)
    x = scale * z + rng.normal(size=(2, N, 1))
    gamma, beta = rng.normal(size=D), rng.normal(size=D)

    def f():
        return layernorm_forward(x, gamma, beta)[0]

    out = f()
    _, cache = layernorm_forward(x, gamma, beta)
    dout = rng.normal(size=out.shape)
    dx, dgamma, dbeta = layernorm_backward(dout, cache)
    check("dx", dx, f, x, dout)
    check("dgamma", dgamma, f, gamma, dout)
    check("dbeta", dbeta, f, beta, dout)


def test_layernorm_statistics():
    """Arithmetic done another way: biased variance, eps = 1e-5, against the definition."""
    x = np.array([[1.0, 2.0, 3.0, 6.0]])
    out, _ = layernorm_forward(x, np.ones(4), np.zeros(4))
    mu, var = 3.0, np.mean((x - 3.0) ** 2)  # var = 3.5, divided by D = 4
    np.testing.assert_allclose(out, (x - mu) / np.sqrt(var + 1e-5), rtol=1e-14)


@given(shape=st.lists(dims, min_size=1, max_size=3), scale=st.floats(0.1, 5.0), seed=seeds)
def test_gelu(shape, scale, seed):
    rng = np.random.default_rng(seed)
    x = scale * rng.normal(size=shape)
    out, cache = gelu_forward(x)
    dout = rng.normal(size=out.shape)
    check("dx", gelu_backward(dout, cache), lambda: gelu_forward(x)[0], x, dout)


def test_gelu_known_values():
    import math

    # GELU(0) = 0; GELU(x) -> x for large x; GELU(x) -> 0 for very negative x
    out, _ = gelu_forward(np.array([0.0, 10.0, -10.0, 1.0, -1.0]))
    assert out[0] == 0.0 and abs(out[1] - 10.0) < 1e-12 and abs(out[2]) < 1e-12
    # the exact GELU is x·Φ(x); the tanh approximation stays within 2e-4 of it near |x| = 1
    for x, y in ((1.0, out[3]), (-1.0, out[4])):
        assert abs(y - x * 0.5 * (1 + math.erf(x / math.sqrt(2)))) < 2e-4


@given(B=st.integers(1, 3), T=dims, H=st.integers(1, 3), hs=st.integers(1, 4), seed=seeds)
def test_attention(B, T, H, hs, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, T, H * hs)) for _ in range(3))

    def f():
        return attention_forward(q, k, v, H)[0]

    out = f()
    _, cache = attention_forward(q, k, v, H)
    dout = rng.normal(size=out.shape)
    dq, dk, dv = attention_backward(dout, cache)
    check("dq", dq, f, q, dout)
    check("dk", dk, f, k, dout)
    check("dv", dv, f, v, dout)


def test_attention_is_causal_and_matches_a_loop():
    """Arithmetic done another way: one head, one query at a time, in plain loops."""
    rng = np.random.default_rng(0)
    B, T, H, hs = 2, 5, 2, 3
    q, k, v = (rng.normal(size=(B, T, H * hs)) for _ in range(3))
    y, _ = attention_forward(q, k, v, H)
    for b in range(B):
        for h in range(H):
            cols = slice(h * hs, (h + 1) * hs)
            for t in range(T):
                s = np.array([q[b, t, cols] @ k[b, j, cols] / np.sqrt(hs) for j in range(t + 1)])
                w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                expected = sum(w[j] * v[b, j, cols] for j in range(t + 1))
                np.testing.assert_allclose(y[b, t, cols], expected, rtol=1e-12, atol=1e-14)
    # changing the future leaves the past alone
    k2 = k.copy()
    k2[:, -1] += 1.0
    y2, _ = attention_forward(q, k2, v, H)
    np.testing.assert_array_equal(y2[:, :-1], y[:, :-1])


@given(B=dims, T=dims, V=st.integers(2, 8), scale=st.floats(0.1, 10.0), seed=seeds)
def test_cross_entropy(B, T, V, scale, seed):
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    loss, cache = cross_entropy_forward(logits, targets)
    dlogits = cross_entropy_backward(1.0, cache)
    check("dlogits", dlogits, lambda: cross_entropy_forward(logits, targets)[0], logits, 1.0)


def ce_case(seed=7):
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.normal(size=(2, 3, 5))
    targets = rng.integers(0, 5, size=(2, 3))
    return logits, targets


@pytest.mark.parametrize("dloss", [0.37, -2.0])
def test_cross_entropy_scales_by_dloss(dloss):
    """Above, dloss is always 1.0, which a backward that ignores dloss passes too."""
    logits, targets = ce_case()
    _, cache = cross_entropy_forward(logits, targets)
    dlogits = cross_entropy_backward(dloss, cache)
    check("dlogits", dlogits, lambda: cross_entropy_forward(logits, targets)[0], logits, dloss)


def test_cross_entropy_backward_leaves_its_cache_alone():
    """Two backwards through one cache agree, and the cached probabilities are unchanged."""
    logits, targets = ce_case()
    _, cache = cross_entropy_forward(logits, targets)
    before = [a.copy() for a in cache]
    first = cross_entropy_backward(0.37, cache)
    second = cross_entropy_backward(0.37, cache)
    np.testing.assert_array_equal(second, first)
    for name, a, b in zip(("probs", "targets"), cache, before, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"cross_entropy_backward changed the cached {name}")


def test_cross_entropy_known_values():
    # uniform logits: loss = log V exactly; large logits do not overflow
    loss, _ = cross_entropy_forward(np.zeros((2, 3, 5)), np.zeros((2, 3), dtype=int))
    assert loss == pytest.approx(np.log(5), rel=1e-15)
    loss, _ = cross_entropy_forward(np.array([[[1000.0, 0.0]]]), np.array([[0]]))
    assert loss == pytest.approx(0.0, abs=1e-300)
