"""The whole model's hand-written backward against centered finite differences, in float64.

A random dlogits stands in for ∂L/∂logits; the numerical gradient of sum(logits * dlogits)
with respect to each parameter is compared with model_backward, for full fine-tuning (every
parameter) and for LoRA (each target alone, and all six at once). The params and adapters
are perturbed away from their init so that no gradient is trivially zero (B = 0 would make
dA vanish, and the check pass vacuously).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_np import LORA_TARGETS, LoraConfig, ModelConfig, init_lora, init_params, model_backward, model_forward
from lora_np.gradcheck import assert_grad_close, numerical_vjp

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


def test_adapted_forward_equals_dense_weight_written_by_hand():
    """Arithmetic done another way: replace W_q by W_q + (α/r)·B·A, computed here, not by the library."""
    cfg = ModelConfig(vocab_size=6, context_length=5, d_model=8, n_heads=2, n_layers=1, d_mlp=8)
    for rslora, s in ((False, 6.0 / 3), (True, 6.0 / np.sqrt(3))):
        lora = LoraConfig(r=3, alpha=6.0, targets=("W_q",), rslora=rslora)
        rng = np.random.default_rng(0)
        params = init_params(cfg, 0)
        adapters = perturbed(init_lora(cfg, lora, 0), rng, 0.5)
        dense = params.copy()
        dense["blocks.0.W_q"] = params["blocks.0.W_q"] + s * adapters["blocks.0.W_q.B"] @ adapters["blocks.0.W_q.A"]
        tokens = rng.integers(0, 6, size=(2, 5))
        np.testing.assert_allclose(
            model_forward(params, tokens, adapters, lora)[0], model_forward(dense, tokens)[0], rtol=1e-12, atol=1e-14
        )


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
    from lora_np import cast
    from lora_np.layers import cross_entropy_backward, cross_entropy_forward

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
