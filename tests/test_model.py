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
        assert_grad_close(name, grads[name], numerical_vjp(f, x, dlogits), TOL)


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
        assert_grad_close(name, grads[name], num, TOL)


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
    from lora_np import cast

    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=4, n_heads=2, n_layers=1, d_mlp=6)
    params = cast(init_params(cfg, 0), np.float32)
    logits, cache = model_forward(params, np.zeros((1, 3), dtype=np.int64))
    grads = model_backward(np.ones_like(logits), cache)
    assert all(g.dtype == np.float32 for g in grads.values())
