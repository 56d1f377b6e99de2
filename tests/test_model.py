"""The whole model's hand-written backward against centered finite differences, in float64.

A random dlogits stands in for ∂L/∂logits; the numerical gradient of sum(logits * dlogits)
with respect to each parameter is compared with model_backward, for full fine-tuning (every
parameter), for LoRA (each target alone, and all six at once) and for partial trainable sets
(A without B, betas without gammas, ...), where set(grads) must be exactly the set asked for. The params and adapters
are perturbed away from their init so that no gradient is trivially zero (B = 0 would make
dA vanish, and the check pass vacuously).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_np.gradcheck import assert_grad_close, numerical_vjp
from lora_np.lora import delta_weight
from lora_np.train import trainable_names

from lora_np import (
    LORA_TARGETS,
    LoraConfig,
    ModelConfig,
    init_lora,
    init_params,
    merge,
    model_backward,
    model_forward,
)

# A composition of ~10 ops accumulates more round-off than one op; 1e-6 still leaves a
# wrong term (an error of order 1) a million times above the line.
TOL = 1e-6


def perturbed(arrays, rng, scale):
    for k in arrays:
        arrays[k] = arrays[k] + scale * rng.normal(size=arrays[k].shape)
    return arrays


configs = st.builds(
    ModelConfig,
    vocab_size=st.integers(2, 7),
    context_length=st.just(5),
    d_model=st.sampled_from([4, 6]),
    n_heads=st.sampled_from([1, 2]),
    n_layers=st.integers(1, 2),
    d_mlp=st.integers(2, 8),
)


def check_model_grads(cfg, seed, lora=None, T=4):
    rng = np.random.default_rng(seed)
    params = perturbed(init_params(cfg, seed), rng, 0.3)
    adapters = perturbed(init_lora(cfg, lora, seed), rng, 0.5) if lora else None
    tokens = rng.integers(0, cfg.vocab_size, size=(2, T))
    logits, cache = model_forward(params, tokens, adapters, lora)
    dlogits = rng.normal(size=logits.shape)
    trainable = list(adapters) if lora else list(params)
    grads = model_backward(dlogits, cache, trainable)
    assert set(grads) == set(trainable)

    def f():
        return model_forward(params, tokens, adapters, lora)[0]

    for name in trainable:
        x = adapters[name] if lora else params[name]
        assert grads[name].shape == x.shape, name
        # ∂L/∂b_k is exactly zero (softmax ignores a shift shared by all keys): only an
        # absolute comparison with the finite-difference noise makes sense for it
        atol = 1e-8 if name.endswith("b_k") else 0.0
        assert_grad_close(name, grads[name], numerical_vjp(f, x, dlogits), TOL, atol)


@settings(max_examples=8)
@given(cfg=configs, seed=st.integers(0, 2**32 - 1))
def test_full_model_gradients(cfg, seed):
    check_model_grads(cfg, seed)


@pytest.mark.parametrize("target", LORA_TARGETS)
@settings(max_examples=4)
@given(cfg=configs, r=st.integers(1, 2), seed=st.integers(0, 2**32 - 1))
def test_lora_gradients_each_target(target, cfg, r, seed):
    check_model_grads(cfg, seed, LoraConfig(r=min(r, cfg.d_mlp), alpha=3.0, targets=(target,)))


@settings(max_examples=6)
@given(cfg=configs, r=st.integers(1, 2), rslora=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_lora_gradients_all_six_targets(cfg, r, rslora, seed):
    lora = LoraConfig(r=min(r, cfg.d_mlp), alpha=2.0, targets=LORA_TARGETS, rslora=rslora)
    check_model_grads(cfg, seed, lora)


def test_lora_gradients_with_dropout_in_training():
    """The same dropout masks on every call (a fresh generator from one seed), so the forward
    is a deterministic function of the adapters and can be differentiated numerically."""
    cfg = ModelConfig(vocab_size=6, context_length=5, d_model=6, n_heads=2, n_layers=2, d_mlp=8)
    lora = LoraConfig(r=2, alpha=2.0, targets=LORA_TARGETS, dropout=0.3)
    rng = np.random.default_rng(5)
    params = perturbed(init_params(cfg, 5), rng, 0.3)
    adapters = perturbed(init_lora(cfg, lora, 5), rng, 0.5)
    tokens = rng.integers(0, 6, size=(2, 5))

    def f():
        return model_forward(params, tokens, adapters, lora, train=True, rng=np.random.default_rng(9))[0]

    logits, cache = model_forward(params, tokens, adapters, lora, train=True, rng=np.random.default_rng(9))
    dlogits = rng.normal(size=logits.shape)
    grads = model_backward(dlogits, cache)
    for name in adapters:
        assert_grad_close(name, grads[name], numerical_vjp(f, adapters[name], dlogits), TOL)


def test_dropout_is_off_outside_training():
    cfg = ModelConfig(vocab_size=6, context_length=5, d_model=6, n_heads=2, n_layers=1, d_mlp=8)
    lora, no_drop = LoraConfig(r=2, dropout=0.5), LoraConfig(r=2, dropout=0.0)
    params, rng = init_params(cfg, 0), np.random.default_rng(0)
    adapters = perturbed(init_lora(cfg, lora, 0), rng, 0.5)
    tokens = rng.integers(0, 6, size=(2, 5))
    off, _ = model_forward(params, tokens, adapters, lora, train=False, rng=np.random.default_rng(1))
    ref, _ = model_forward(params, tokens, adapters, no_drop)
    on, _ = model_forward(params, tokens, adapters, lora, train=True, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(off, ref)
    assert not np.array_equal(on, ref)


# s for alpha = 6, written out by hand rather than computed by the code under test:
# α/r (paper, Section 4.1) and α/√r (rsLoRA). A scaling merely linear in α (α, α/√r for both,
# α/r for both) passes a test that doubles α; it fails here.
S_BY_HAND = {
    (1, False): 6.0, (2, False): 3.0, (3, False): 2.0, (4, False): 1.5, (8, False): 0.75,
    (1, True): 6.0, (2, True): 4.242640687119285, (3, True): 3.464101615137755,  # 3√2, 2√3
    (4, True): 3.0, (8, True): 2.1213203435596424,  # 3/√2
}  # fmt: skip


@pytest.mark.parametrize("r, rslora", list(S_BY_HAND))
def test_adapted_forward_equals_dense_weight_written_by_hand(r, rslora):
    """Arithmetic done another way: W_q + s·B·A with s from the table and B·A formed here, against
    delta_weight, merge and the unmerged forward, over several r (one r cannot tell α/r from α/√r)."""
    s = S_BY_HAND[r, rslora]
    cfg = ModelConfig(vocab_size=6, context_length=5, d_model=8, n_heads=2, n_layers=2, d_mlp=8)
    lora = LoraConfig(r=r, alpha=6.0, targets=("W_q", "W_2"), rslora=rslora)
    rng = np.random.default_rng(r)
    params = init_params(cfg, 0)
    adapters = perturbed(init_lora(cfg, lora, 0), rng, 0.5)
    dense, merged = params.copy(), merge(params, adapters, lora)
    for l in range(cfg.n_layers):
        for t in lora.targets:
            name = f"blocks.{l}.{t}"
            A, B = adapters[name + ".A"], adapters[name + ".B"]
            BA = np.einsum("ik,kj->ij", B, A)  # (d_out, d_in), not the library's B @ A
            np.testing.assert_allclose(delta_weight(adapters, lora, name), s * BA, rtol=1e-13, atol=0, err_msg=name)
            # merge adds exactly s·B·A: (W0 + ΔW) - W0 is exact up to one rounding of W0 + ΔW
            np.testing.assert_allclose(merged[name] - params[name], s * BA, rtol=0, atol=1e-14, err_msg=name)
            dense[name] = params[name] + s * BA
    tokens = rng.integers(0, 6, size=(2, 5))
    np.testing.assert_allclose(
        model_forward(params, tokens, adapters, lora)[0], model_forward(dense, tokens)[0], rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_rank_of_delta_w_is_r_and_drops_with_a_zero_column_of_b(r):
    """rank(ΔW) <= r holds for any product with inner size r; equality for generic A, B, and
    r - 1 once a column of B is zero, say that ΔW is the product of these two factors."""
    cfg = ModelConfig(vocab_size=6, context_length=5, d_model=8, n_heads=2, n_layers=1, d_mlp=12)
    lora = LoraConfig(r=r, targets=LORA_TARGETS)
    adapters = perturbed(init_lora(cfg, lora, r), np.random.default_rng(r), 1.0)  # B generic, not 0
    for t in LORA_TARGETS:
        name = f"blocks.0.{t}"
        assert np.linalg.matrix_rank(delta_weight(adapters, lora, name)) == r, name
        cut = dict(adapters)
        cut[name + ".B"] = adapters[name + ".B"].copy()
        cut[name + ".B"][:, r - 1] = 0.0  # direction r-1 of A no longer reaches the output
        assert np.linalg.matrix_rank(delta_weight(cut, lora, name)) == r - 1, name


def check_zero_init(cfg, lora, seed):
    """At B = 0 (adapters as init_lora makes them): dB against finite differences, and dA exactly 0.

    dA = s·Bᵀ·g·xᵀ is 0 here for any formula with a factor of B (its value is checked at B ≠ 0,
    in check_model_grads), so what this test can catch is in dB's value, not in dB ≠ 0.
    """
    rng = np.random.default_rng(seed)
    params = perturbed(init_params(cfg, seed), rng, 0.3)
    adapters = init_lora(cfg, lora, seed)
    assert all(np.all(adapters[n] == 0.0) for n in adapters if n.endswith(".B"))
    # T >= 2: with one position attention's weight is 1 whatever q, k are, and dB of W_q, W_k is 0
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 4))
    logits, cache = model_forward(params, tokens, adapters, lora)
    dlogits = rng.normal(size=logits.shape)
    grads = model_backward(dlogits, cache)
    assert set(grads) == set(adapters)

    def f():
        return model_forward(params, tokens, adapters, lora)[0]

    for name in adapters:
        if name.endswith(".A"):
            assert np.all(grads[name] == 0.0), f"{name}: ∂L/∂A = s·Bᵀ·g·xᵀ must be exactly 0 at B = 0"
        else:
            assert_grad_close(name, grads[name], numerical_vjp(f, adapters[name], dlogits), TOL)


@settings(max_examples=6)
@given(cfg=configs, r=st.integers(1, 2), rslora=st.booleans(), init=st.sampled_from(["gaussian", "kaiming"]),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_at_zero_init_dB_matches_finite_differences_and_dA_is_zero(cfg, r, rslora, init, seed):
    # alpha = 3: s is never 1, so a dB that forgets s is off by a factor
    check_zero_init(cfg, LoraConfig(r=r, alpha=3.0, targets=LORA_TARGETS, rslora=rslora, init=init), seed)


# Training a part of the adapters or of the parameters: the flags each backward takes must reach
# the right gradient. Each set leaves out a partner that a swap of two flags would bring in.
PARTIAL_SETS = {
    "A without B": lambda params, adapters, lora: [n for n in adapters if n.endswith(".A")],
    "B without A, betas without gammas": lambda params, adapters, lora: (
        [n for n in adapters if n.endswith(".B")] + [n for n in params if n.endswith(".beta")]
    ),
    "gammas without betas": lambda params, adapters, lora: [n for n in params if n.endswith(".gamma")],
    "trainable_names(bias='all')": lambda params, adapters, lora: trainable_names(params, adapters, lora, bias="all"),
}


def check_partial(which, seed=0):
    """set(grads) == trainable, and every returned gradient against finite differences."""
    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=4, n_heads=2, n_layers=1, d_mlp=6)
    lora = LoraConfig(r=2, alpha=3.0, targets=("W_q", "W_v", "W_1"))  # W_k, W_o, W_2, W_u stay plain
    rng = np.random.default_rng(seed)
    params = perturbed(init_params(cfg, seed), rng, 0.3)
    adapters = perturbed(init_lora(cfg, lora, seed), rng, 0.5)  # B ≠ 0, so dA is not trivially 0
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 4))
    trainable = PARTIAL_SETS[which](params, adapters, lora)
    logits, cache = model_forward(params, tokens, adapters, lora)
    dlogits = rng.normal(size=logits.shape)
    grads = model_backward(dlogits, cache, trainable)
    extra, missing = sorted(set(grads) - set(trainable)), sorted(set(trainable) - set(grads))
    assert not extra and not missing, f"{which}: gradients of frozen {extra[:4]}, none for trainable {missing[:4]}"

    def f():
        return model_forward(params, tokens, adapters, lora)[0]

    for name in trainable:
        x = adapters[name] if name in adapters else params[name]
        assert grads[name].shape == x.shape, name
        atol = 1e-8 if name.endswith("b_k") else 0.0  # exactly 0: see check_model_grads
        assert_grad_close(name, grads[name], numerical_vjp(f, x, dlogits), TOL, atol)


@pytest.mark.parametrize("which", list(PARTIAL_SETS))
def test_partial_trainable_sets(which):
    check_partial(which)


def test_bias_gradients_alongside_adapters():
    """The "bias: all" option of the reference implementations: adapters and every bias train."""
    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=4, n_heads=2, n_layers=1, d_mlp=6)
    lora = LoraConfig(r=2, targets=("W_q", "W_1"))
    rng = np.random.default_rng(0)
    params = perturbed(init_params(cfg, 0), rng, 0.3)
    adapters = perturbed(init_lora(cfg, lora, 0), rng, 0.5)
    tokens = rng.integers(0, 5, size=(2, 4))
    logits, cache = model_forward(params, tokens, adapters, lora)
    dlogits = rng.normal(size=logits.shape)
    biases = [n for n in params if n.split(".")[-1].startswith("b_")]
    grads = model_backward(dlogits, cache, list(adapters) + biases)
    for name in biases:
        num = numerical_vjp(lambda: model_forward(params, tokens, adapters, lora)[0], params[name], dlogits)
        assert_grad_close(name, grads[name], num, TOL, atol=1e-8 if name.endswith("b_k") else 0.0)


def test_float32_forward_agrees_with_float64():
    from lora_np import cast

    cfg = ModelConfig(vocab_size=11, context_length=8, d_model=16, n_heads=4, n_layers=2, d_mlp=32)
    lora = LoraConfig(r=4, targets=LORA_TARGETS)
    rng = np.random.default_rng(0)
    params = perturbed(init_params(cfg, 0), rng, 0.1)
    adapters = perturbed(init_lora(cfg, lora, 1), rng, 0.1)
    tokens = rng.integers(0, 11, size=(3, 8))
    l64, _ = model_forward(params, tokens, adapters, lora)
    l32, _ = model_forward(cast(params, np.float32), tokens, cast(adapters, np.float32), lora)
    assert l32.dtype == np.float32 and l64.dtype == np.float64
    # float32 carries ~7 digits; after a few layers 1e-4 relative to the logits' scale is ample
    assert np.abs(l32 - l64).max() < 1e-4 * np.abs(l64).max()


def test_backward_dtype_follows_params():
    """float32 in, float32 out: no NumPy float64 scalar or mask may upcast on the way."""
    from lora_np.layers import cross_entropy_backward, cross_entropy_forward

    from lora_np import cast

    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=4, n_heads=2, n_layers=1, d_mlp=6)
    lora = LoraConfig(r=2, targets=LORA_TARGETS, dropout=0.2, rslora=True)
    params = cast(init_params(cfg, 0), np.float32)
    adapters = cast(perturbed(init_lora(cfg, lora, 0), np.random.default_rng(0), 0.5), np.float32)
    tokens = np.array([[1, 2, 3, 4]])
    for ad, lo in ((None, None), (adapters, lora)):
        logits, cache = model_forward(params, tokens, ad, lo, train=True, rng=np.random.default_rng(0))
        assert logits.dtype == np.float32
        _, ce = cross_entropy_forward(logits, tokens)
        dlogits = cross_entropy_backward(np.float64(1.0), ce)  # a NumPy float64 dloss must not upcast
        assert dlogits.dtype == np.float32
        grads = model_backward(dlogits, cache)
        assert grads and all(g.dtype == np.float32 for g in grads.values()), {k: g.dtype for k, g in grads.items()}
