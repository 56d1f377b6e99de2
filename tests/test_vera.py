"""VeRA's layer pair against finite differences, and its invariants, in float64 unless stated.

Gradients are checked at lambda_b ≠ 0. At lambda_b = 0 (VeRA's init) ∂L/∂lambda_d is exactly
zero, since the gradient reaches lambda_d only through Λ_b: a check of it there would pass
vacuously, so that case is a test of its own, asserting the exact zero.

Step size: the layer is affine in x, in lambda_d and in lambda_b, each taken alone, so the centered
difference has no truncation error at any step. A step of 1 (not gradcheck's 1e-5) leaves only
the round-off of L itself, ~ε·|L|, instead of ~ε·|L|/1e-5: a gradient that is small beside the
frozen path's output (a short A·x, a dropped input) is still checked to 1e-7 relative.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lora_np.gradcheck import assert_grad_close, numerical_vjp
from lora_np.layers import lora_linear_backward, lora_linear_forward
from lora_np.vera import VERA_D_INIT, vera_linear_backward, vera_linear_forward, vera_shared_init

from lora_np import LoraConfig, ModelConfig, init_lora

TOL = 1e-7
dims = st.integers(1, 6)
seeds = st.integers(0, 2**32 - 1)
leads = st.one_of(st.tuples(dims), st.tuples(dims, dims))  # (N,) or (B, T)


def check(name, analytic, f, x, dout):
    assert analytic.shape == x.shape, f"{name}: gradient shape {analytic.shape} != parameter shape {x.shape}"
    assert_grad_close(name, analytic, numerical_vjp(f, x, dout, h=1.0), TOL)  # exact for an affine f


@st.composite
def layers(draw):
    """A layer's shapes: square or not, r from 1 (and beyond min(d_out, d_in), which VeRA allows)."""
    d_in = draw(dims)
    d_out = d_in if draw(st.booleans()) else draw(dims)
    return draw(leads), d_in, d_out, draw(st.integers(1, 5))


@given(shape=layers(), bias=st.booleans(), dropout=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_vera_linear_gradients(shape, bias, dropout, seed):
    lead, d_in, d_out, r = shape
    rng = np.random.default_rng(seed)
    x, W = rng.normal(size=(*lead, d_in)), rng.normal(size=(d_out, d_in))
    b = rng.normal(size=d_out) if bias else None
    A, B = vera_shared_init(d_out, d_in, r, rng)
    # lambda_b ≠ 0: at lambda_b = 0, d_lambda_d is exactly zero and its check would pass vacuously
    lambda_d, lambda_b = rng.normal(size=r), rng.normal(size=d_out)

    def f():
        # the same dropout mask on every call: a fresh generator from the same seed
        return vera_linear_forward(x, W, b, A, B, lambda_d, lambda_b, dropout=dropout,
                                   rng=np.random.default_rng(seed + 1))[0]  # fmt: skip

    out, cache = vera_linear_forward(x, W, b, A, B, lambda_d, lambda_b, dropout=dropout,
                                     rng=np.random.default_rng(seed + 1))  # fmt: skip
    assert out.shape == (*lead, d_out)
    dout = rng.normal(size=out.shape)
    dx, d_lambda_d, d_lambda_b = vera_linear_backward(dout, cache)
    check("dx", dx, f, x, dout)
    check("d_lambda_d", d_lambda_d, f, lambda_d, dout)
    check("d_lambda_b", d_lambda_b, f, lambda_b, dout)


@given(shape=layers(), dropout=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_at_init_d_lambda_d_is_exactly_zero_and_lambda_b_still_learns(shape, dropout, seed):
    """VeRA's start (lambda_b = 0, lambda_d = 0.1): like LoRA's dA at B = 0, d_lambda_d is exactly
    zero and the adapter adds nothing to dx; d_lambda_b is not zero, since lambda_d ≠ 0."""
    lead, d_in, d_out, r = shape
    rng = np.random.default_rng(seed)
    x, W, b = rng.normal(size=(*lead, d_in)), rng.normal(size=(d_out, d_in)), rng.normal(size=d_out)
    A, B = vera_shared_init(d_out, d_in, r, rng)
    lambda_d, lambda_b = np.full(r, VERA_D_INIT), np.zeros(d_out)

    def f():
        return vera_linear_forward(x, W, b, A, B, lambda_d, lambda_b, dropout=dropout,
                                   rng=np.random.default_rng(seed + 1))[0]  # fmt: skip

    out, cache = vera_linear_forward(x, W, b, A, B, lambda_d, lambda_b, dropout=dropout,
                                     rng=np.random.default_rng(seed + 1))  # fmt: skip
    dout = rng.normal(size=out.shape)
    dx, d_lambda_d, d_lambda_b = vera_linear_backward(dout, cache)
    assert np.all(d_lambda_d == 0.0), f"d_lambda_d at lambda_b = 0 should be exactly 0, got {d_lambda_d}"
    np.testing.assert_array_equal(dx, (dout.reshape(-1, d_out) @ W).reshape(x.shape))  # the frozen path only
    check("d_lambda_b", d_lambda_b, f, lambda_b, dout)
    if dropout == 0.0:  # (with dropout, every input of A can be dropped, and y = 0)
        assert np.any(d_lambda_b != 0.0)


@given(N=dims, d_in=dims, d_out=dims, r=dims, bias=st.booleans(), dropout=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_start_is_the_base_layer_bit_for_bit(N, d_in, d_out, r, bias, dropout, seed):
    """lambda_b = 0 adds exact zeros: the output is x·W0ᵀ + b to the last bit, dropout or not."""
    rng = np.random.default_rng(seed)
    x, W = rng.normal(size=(N, d_in)), rng.normal(size=(d_out, d_in))
    b = rng.normal(size=d_out) if bias else None
    A, B = vera_shared_init(d_out, d_in, r, rng)
    out, _ = vera_linear_forward(x, W, b, A, B, np.full(r, VERA_D_INIT), np.zeros(d_out), dropout=dropout, rng=rng)
    np.testing.assert_array_equal(out, x @ W.T + b if bias else x @ W.T)


def test_matches_the_dense_update_and_shared_pairs_differ_only_by_the_vectors():
    """Arithmetic done another way: the layer equals x·(W0 + Λ_b·B·Λ_d·A)ᵀ + b, with ΔW formed
    here (the module never forms it). Two layers sharing (A, B) differ only through their vectors."""
    rng = np.random.default_rng(3)
    d_out, d_in, r = 4, 6, 3
    x, b = rng.normal(size=(2, 5, d_in)), rng.normal(size=d_out)
    A, B = vera_shared_init(d_out, d_in, r, rng)
    for _ in range(2):  # two layers, one shared pair
        W, lambda_d, lambda_b = rng.normal(size=(d_out, d_in)), rng.normal(size=r), rng.normal(size=d_out)
        out, _ = vera_linear_forward(x, W, b, A, B, lambda_d, lambda_b)
        delta_W = np.diag(lambda_b) @ B @ np.diag(lambda_d) @ A  # (d_out, d_in)
        np.testing.assert_allclose(out, x @ (W + delta_W).T + b, rtol=1e-12, atol=1e-12)


def test_dropout_is_on_the_adapter_input_only():
    """The frozen path sees the clean x; the adapter sees x ⊙ m with m in {0, 1/(1-p)}."""
    rng = np.random.default_rng(0)
    d_out, d_in, r, p = 3, 5, 2, 0.4
    x, W = rng.normal(size=(400, d_in)), rng.normal(size=(d_out, d_in))
    A, B = vera_shared_init(d_out, d_in, r, rng)
    lambda_d, lambda_b = rng.normal(size=r), rng.normal(size=d_out)
    out, cache = vera_linear_forward(x, W, None, A, B, lambda_d, lambda_b, dropout=p, rng=rng)
    mask = cache[2]
    assert set(np.unique(mask)) <= {0.0, 1 / (1 - p)} and abs((mask == 0).mean() - p) < 0.05
    adapter = (((x * mask) @ A.T) * lambda_d) @ B.T * lambda_b
    np.testing.assert_allclose(out, x @ W.T + adapter, rtol=1e-12, atol=1e-12)


def test_need_flags_give_none_and_leave_dx_unchanged():
    rng = np.random.default_rng(1)
    d_out, d_in, r = 5, 4, 3
    x, W = rng.normal(size=(2, 3, d_in)), rng.normal(size=(d_out, d_in))
    A, B = vera_shared_init(d_out, d_in, r, rng)
    out, cache = vera_linear_forward(x, W, None, A, B, rng.normal(size=r), rng.normal(size=d_out))
    dout = rng.normal(size=out.shape)
    dx, d_lambda_d, d_lambda_b = vera_linear_backward(dout, cache)
    for need_dd, need_db in ((False, True), (True, False), (False, False)):
        dx2, dd2, db2 = vera_linear_backward(dout, cache, need_dd=need_dd, need_db=need_db)
        assert (dd2 is None) == (not need_dd) and (db2 is None) == (not need_db)
        np.testing.assert_array_equal(dx2, dx)
        if need_dd:
            np.testing.assert_array_equal(dd2, d_lambda_d)
        if need_db:
            np.testing.assert_array_equal(db2, d_lambda_b)


def test_float32_stays_float32():
    rng = np.random.default_rng(2)
    d_out, d_in, r = 4, 6, 3
    f32 = np.float32
    x, W, b = rng.normal(size=(2, 3, d_in)).astype(f32), rng.normal(size=(d_out, d_in)).astype(f32), np.ones(d_out, f32)
    A, B = (m.astype(f32) for m in vera_shared_init(d_out, d_in, r, rng))
    lambda_d, lambda_b = np.full(r, VERA_D_INIT, f32), rng.normal(size=d_out).astype(f32)
    out, cache = vera_linear_forward(x, W, b, A, B, lambda_d, lambda_b, dropout=0.2, rng=rng)
    grads = vera_linear_backward(np.ones_like(out), cache)
    assert out.dtype == f32 and all(g.dtype == f32 for g in grads), [out.dtype] + [g.dtype for g in grads]


@given(d_out=st.integers(1, 40), d_in=st.integers(1, 40), r=st.integers(1, 40), seed=seeds)
def test_shared_init_is_kaiming_uniform_and_reproducible(d_out, d_in, r, seed):
    """A ~ U(±sqrt(6/d_in)), B ~ U(±sqrt(6/r)) (PEFT's _kaiming_init), A drawn first; a seed
    regenerates both, which is why a VeRA checkpoint need not store them."""
    A, B = vera_shared_init(d_out, d_in, r, np.random.default_rng(seed))
    assert A.shape == (r, d_in) and B.shape == (d_out, r) and A.dtype == B.dtype == np.float64
    assert np.abs(A).max() <= np.sqrt(6 / d_in) and np.abs(B).max() <= np.sqrt(6 / r)
    A2, B2 = vera_shared_init(d_out, d_in, r, np.random.default_rng(seed))
    np.testing.assert_array_equal(A, A2)
    np.testing.assert_array_equal(B, B2)
    rng = np.random.default_rng(seed)
    np.testing.assert_array_equal(A, rng.uniform(-np.sqrt(6 / d_in), np.sqrt(6 / d_in), size=(r, d_in)))


def test_shared_init_variance_is_two_over_fan_in_so_the_product_variance_ignores_r():
    """Var(A) = 2/d_in, Var(B) = 2/r; so Var((B·A·x)_i) = 4·Var(x) whatever r is (the paper's
    reason for Kaiming). Monte Carlo, seeded: each estimate has a relative standard error of ~2%
    or less, and the tolerance is 10%."""
    rng = np.random.default_rng(0)
    A, B = vera_shared_init(2000, 256, 64, rng)  # 16,384 and 128,000 draws
    assert abs(A.var() * 256 / 2 - 1) < 0.05 and abs(B.var() * 64 / 2 - 1) < 0.05
    d_out, d_in = 128, 256
    x = rng.normal(size=(600, d_in))  # Var(x) = 1
    for r in (1, 8, 64):
        pairs = [vera_shared_init(d_out, d_in, r, rng) for _ in range(32)]
        out_var = np.mean([((x @ A.T) @ B.T).var() for A, B in pairs])
        assert abs(out_var / 4 - 1) < 0.1, f"r={r}: Var(B·A·x) = {out_var:.3f}, expected 4"


def test_trainable_count_against_lora():
    """Per layer VeRA trains lambda_d (r,) and lambda_b (d_out,): r + d_out numbers, against LoRA's
    r·(d_in + d_out). Counted from the gradients each backward returns, then the paper's arithmetic."""
    rng = np.random.default_rng(0)
    d_out, d_in, r = 6, 4, 3
    x, W = rng.normal(size=(2, d_in)), rng.normal(size=(d_out, d_in))
    A, B = vera_shared_init(d_out, d_in, r, rng)
    out, cache = vera_linear_forward(x, W, None, A, B, rng.normal(size=r), rng.normal(size=d_out))
    vera = sum(g.size for g in vera_linear_backward(np.ones_like(out), cache)[1:])
    out, cache = lora_linear_forward(x, W, None, A, B, 1.0)
    lora = sum(g.size for g in lora_linear_backward(np.ones_like(out), cache)[1:])
    assert (vera, lora) == (r + d_out, r * (d_in + d_out)) == (9, 30)
    # A square d_model = 1024 weight (RoBERTa-large width), rank 16 for both:
    d, r = 1024, 16
    assert r + d == 1_040 and r * (d + d) == 32_768  # VeRA trains ~31x fewer numbers per layer
    # VeRA is never more: r + d_out <= r·(d_in + d_out) for all r, d_in >= 1, equal only at r = d_in = 1
    for d_out, d_in, r in np.ndindex(7, 7, 7):
        if min(d_out, d_in, r) >= 1:
            assert r + d_out <= r * (d_in + d_out)
            assert (r + d_out == r * (d_in + d_out)) == (r == 1 and d_in == 1)
    # VeRA's count grows with r by 1 a step, LoRA's by d_in + d_out: at PEFT's default r = 256,
    assert 256 + d == 1_280 and 256 * 2 * d == 524_288


def test_bad_arguments_explain_themselves():
    rng = np.random.default_rng(0)
    x, W = np.ones((2, 3)), np.ones((4, 3))
    A, B = vera_shared_init(4, 3, 2, rng)
    ld, lb = np.full(2, VERA_D_INIT), np.zeros(4)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        vera_linear_forward(x, W, None, A, B, ld, lb, dropout=1.0, rng=rng)
    with pytest.raises(ValueError, match="rng must be a np.random.Generator when dropout > 0"):
        vera_linear_forward(x, W, None, A, B, ld, lb, dropout=0.1)
    with pytest.raises(ValueError, match=r"lambda_d must have shape \(r,\) = \(2,\) to match A \(2, 3\), got \(1,\)"):
        vera_linear_forward(x, W, None, A, B, np.ones(1), lb)
    with pytest.raises(ValueError, match=r"lambda_b must have shape \(d_out,\) = \(4,\) to match W \(4, 3\), got \(\)"):
        vera_linear_forward(x, W, None, A, B, ld, np.float64(0.0))
    with pytest.raises(ValueError, match="r must be an int >= 1, got 0"):
        vera_shared_init(4, 3, 0, rng)
    with pytest.raises(TypeError, match="d_in must be an int, got 3.0"):
        vera_shared_init(4, 3.0, 2, rng)
    with pytest.raises(TypeError, match="rng must be a np.random.Generator, got int"):
        vera_shared_init(4, 3, 2, 0)


# ----------------------------------------------------------------------------
# the model's VeRA adapters at init (issue 21): checked against PEFT's values, not lora_np's constants


def test_lambda_d_starts_at_peft_d_initial_and_lambda_b_at_zero():
    # PEFT's VeraConfig: `d_initial: float = field(default=0.1, ...)` (src/peft/tuners/vera/config.py),
    # "Small values (<=0.1) are recommended"; written here, not read from VERA_D_INIT
    cfg = ModelConfig(vocab_size=11, context_length=8, d_model=8, n_heads=2, n_layers=2, d_mlp=12)
    lora = LoraConfig(r=3, targets=("W_q", "W_1"), method="vera")
    adapters = init_lora(cfg, lora, seed=0)
    lambda_d = {k: v for k, v in adapters.items() if k.endswith(".lambda_d")}
    lambda_b = {k: v for k, v in adapters.items() if k.endswith(".lambda_b")}
    assert len(lambda_d) == len(lambda_b) == cfg.n_layers * len(lora.targets)
    assert all(np.array_equal(v, np.full(3, 0.1)) for v in lambda_d.values()), lambda_d
    assert all(v.shape in ((8,), (12,)) and not v.any() for v in lambda_b.values())
    assert VERA_D_INIT == 0.1


def test_two_shapes_get_two_draws_of_one_stream_not_the_same_a():
    """W_q (D, D) and W_1 (M, D) both need an A of shape (r, D); each shape's pair is drawn from
    one generator in turn, so the two A's share no entry. (A fresh generator per shape, from
    the same seed, would give both the same A.)"""
    D, M, r = 8, 12, 3
    cfg = ModelConfig(vocab_size=11, context_length=8, d_model=D, n_heads=2, n_layers=2, d_mlp=M)
    adapters = init_lora(cfg, LoraConfig(r=r, targets=("W_q", "W_1", "W_2"), method="vera"), seed=0)
    shared = {k: v for k, v in adapters.items() if not k.startswith("blocks.")}
    A_D = [v for k, v in shared.items() if k.endswith(".A") and v.shape == (r, D)]
    B_D = [v for k, v in shared.items() if k.endswith(".B") and v.shape == (D, r)]  # W_q's and W_2's
    assert len(shared) == 6 and len(A_D) == 2 and len(B_D) == 2, {k: v.shape for k, v in shared.items()}
    assert not np.any(A_D[0] == A_D[1]) and not np.any(B_D[0] == B_D[1])
