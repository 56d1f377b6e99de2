"""LoRA's invariants, each a property test over drawn shapes, ranks, targets and values."""

import lora_np.model
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_np.lora import delta_weight

from lora_np import (
    LORA_TARGETS,
    LoraConfig,
    ModelConfig,
    init_lora,
    init_params,
    merge,
    model_backward,
    model_forward,
    unmerge,
)

configs = st.builds(
    ModelConfig,
    vocab_size=st.integers(2, 9),
    context_length=st.just(6),
    d_model=st.sampled_from([4, 6, 8]),
    n_heads=st.sampled_from([1, 2]),
    n_layers=st.integers(1, 2),
    d_mlp=st.integers(4, 10),
)
target_sets = st.lists(st.sampled_from(LORA_TARGETS), min_size=1, max_size=6, unique=True)


@st.composite
def setups(draw, trained=True, min_T=1):
    """A model, LoRA config, adapters (B non-zero unless trained=False) and a batch of tokens."""
    cfg = draw(configs)
    lora = LoraConfig(
        r=draw(st.integers(1, 4)),
        alpha=draw(st.floats(0.5, 16.0)),
        targets=tuple(draw(target_sets)),
        init=draw(st.sampled_from(["gaussian", "kaiming"])),
        rslora=draw(st.booleans()),
    )
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    for k in params:  # move away from init so the layers are not near-identity
        params[k] = params[k] + 0.2 * rng.normal(size=params[k].shape)
    adapters = init_lora(cfg, lora, seed + 1)
    if trained:  # stand-in for a trained adapter: B non-zero
        for k in adapters:
            if k.endswith(".B"):
                adapters[k] = rng.normal(size=adapters[k].shape)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, draw(st.integers(min_T, 6))))
    return cfg, lora, params, adapters, tokens, rng


@given(setups(trained=False))
def test_zero_init_is_exactly_the_base_model(setup):
    cfg, lora, params, adapters, tokens, _ = setup
    base, _ = model_forward(params, tokens)
    adapted, _ = model_forward(params, tokens, adapters, lora)
    np.testing.assert_array_equal(adapted, base)  # bit for bit: B = 0 adds exact zeros


@given(setups())
def test_merged_forward_equals_unmerged(setup):
    cfg, lora, params, adapters, tokens, _ = setup
    unmerged_logits, _ = model_forward(params, tokens, adapters, lora)
    merged_logits, _ = model_forward(merge(params, adapters, lora), tokens)
    err = np.abs(merged_logits - unmerged_logits).max() / np.abs(unmerged_logits).max()
    assert err < 1e-12, f"merged and unmerged logits differ by {err:.2e} relative"


@given(setups())
def test_unmerge_recovers_base_and_nothing_is_mutated(setup):
    cfg, lora, params, adapters, tokens, _ = setup
    before = {k: v.copy() for k, v in params.items()}
    merged = merge(params, adapters, lora)
    restored = unmerge(merged, adapters, lora)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])  # merge did not touch its input
        # (W0 + ΔW) - ΔW rounds twice, each time by at most half an ulp of |W0| + |ΔW|
        delta = delta_weight(adapters, lora, k) if k.endswith(lora.targets) else 0.0
        scale = np.abs(params[k]).max() + np.abs(delta).max()
        np.testing.assert_allclose(restored[k], params[k], rtol=0, atol=4e-16 * max(scale, 1.0))
    for l in range(cfg.n_layers):
        for t in lora.targets:
            assert not np.array_equal(merged[f"blocks.{l}.{t}"], params[f"blocks.{l}.{t}"])


@given(setups())
def test_frozen_weights_get_no_gradient_and_none_is_formed(setup):
    cfg, lora, params, adapters, tokens, rng = setup
    calls = {"linear_backward": [], "layernorm_backward": [], "embedding_backward": []}
    originals = {name: getattr(lora_np.model, name) for name in calls}

    def spy(name):
        def wrapped(dout, cache, **kw):
            calls[name].append(kw)
            return originals[name](dout, cache, **kw)

        return wrapped

    for name in calls:
        setattr(lora_np.model, name, spy(name))
    try:
        logits, cache = model_forward(params, tokens, adapters, lora)
        grads = model_backward(rng.normal(size=logits.shape), cache)
    finally:
        for name, f in originals.items():
            setattr(lora_np.model, name, f)
    assert set(grads) == set(adapters)  # only the adapters: no entry at all for a frozen weight
    # every plain linear layer (the non-targets and W_u) ran its backward without forming dW, db
    assert calls["linear_backward"] and all(not kw["need_dW"] and not kw["need_db"] for kw in calls["linear_backward"])
    # LayerNorm gains and shifts, and the embeddings, are frozen too
    assert all(not kw["need_dgamma"] and not kw["need_dbeta"] for kw in calls["layernorm_backward"])
    assert calls["embedding_backward"] == []


def test_scaling_is_alpha_over_r_or_over_sqrt_r():
    assert LoraConfig(r=4, alpha=8.0).scaling == 2.0  # paper, Section 4.1: α/r
    assert LoraConfig(r=4, alpha=8.0, rslora=True).scaling == 4.0  # rsLoRA: α/sqrt(r)


@settings(max_examples=10)
@given(setups())
def test_full_fine_tuning_is_the_same_code_with_everything_trainable(setup):
    cfg, lora, params, adapters, tokens, rng = setup
    logits, cache = model_forward(params, tokens)
    grads = model_backward(rng.normal(size=logits.shape), cache)
    assert set(grads) == set(params)
    for k, g in grads.items():
        assert g.shape == params[k].shape, k


def test_init_is_deterministic_and_seeded():
    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=8, n_heads=2, n_layers=2, d_mlp=8)
    lora = LoraConfig(r=2, targets=LORA_TARGETS)
    a, b, c = init_params(cfg, 7), init_params(cfg, 7), init_params(cfg, 8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["W_e"], c["W_e"])
    x, y = init_lora(cfg, lora, 3), init_lora(cfg, lora, 3)
    assert all(np.array_equal(x[k], y[k]) for k in x)


def test_lora_init_distributions():
    """Gaussian A ~ N(0, 1/d_in); kaiming A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)); B = 0 in both."""
    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=256, n_heads=4, n_layers=1, d_mlp=512)
    for init in ("gaussian", "kaiming"):
        ad = init_lora(cfg, LoraConfig(r=64, targets=("W_q", "W_2"), init=init), 0)
        for t, d_in in (("W_q", 256), ("W_2", 512)):
            A, B = ad[f"blocks.0.{t}.A"], ad[f"blocks.0.{t}.B"]
            assert np.all(B == 0)
            if init == "gaussian":
                assert abs(A.std() * np.sqrt(d_in) - 1.0) < 0.02
            else:
                assert np.abs(A).max() <= 1 / np.sqrt(d_in)
                assert abs(A.std() * np.sqrt(3 * d_in) - 1.0) < 0.02  # U(-a, a) has std a/sqrt(3)


# ----------------------------------------------------------------------------
# merging twice, unmerging what was never merged: refused (issue 12, item 6)

MERGE_CFG = ModelConfig(vocab_size=7, context_length=6, d_model=8, n_heads=2, n_layers=2, d_mlp=12)


def _trained(lora, seed):
    from lora_np.variants import init_adapters

    base, adapters = init_adapters(init_params(MERGE_CFG, 0), lora, seed)
    rng = np.random.default_rng(seed)
    return base, {k: v + 0.1 * rng.normal(size=v.shape) for k, v in adapters.items()}


METHODS = {
    "lora": LoraConfig(r=2, alpha=3.0, targets=("W_q", "W_1")),
    "dora": LoraConfig(r=2, targets=("W_q", "W_1"), method="dora"),
    "vera": LoraConfig(r=2, targets=("W_q", "W_1"), method="vera"),
    "qlora": LoraConfig(r=2, targets=("W_q", "W_1"), base_quant="nf4"),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merging_the_same_adapters_twice_is_refused(name):
    lora = METHODS[name]
    base, adapters = _trained(lora, 1)
    assert base.merged_adapters == ()
    merged = merge(base, adapters, lora)
    assert len(merged.merged_adapters) == 1 and base.merged_adapters == ()  # pure: base is unchanged
    with pytest.raises(
        ValueError,
        match=r"adapters \(fingerprint [0-9a-f]{12}\.\.\., LoraConfig\(.*\) are already "
        r"merged into params: merging them again would add ΔW twice",
    ):
        merge(merged, adapters, lora)
    with pytest.raises(ValueError, match=r"already merged"):
        merge(merged.copy(), {k: v.copy() for k, v in adapters.items()}, lora)  # the same numbers, new arrays


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unmerging_adapters_that_were_not_merged_is_refused(name):
    lora = METHODS[name]
    base, adapters = _trained(lora, 1)
    norms = None
    if lora.method == "dora":
        from lora_np.variants import dora_norms

        norms = dora_norms(base, adapters, lora)
    with pytest.raises(
        ValueError,
        match=r"adapters \(fingerprint [0-9a-f]{12}\.\.\., LoraConfig\(.*\) were not "
        r"merged into merged \(it holds 0 merged adapters\): unmerging them would "
        r"subtract ΔW",
    ):
        unmerge(base, adapters, lora, norms)
    back = unmerge(merge(base, adapters, lora), adapters, lora, norms)
    assert back.merged_adapters == ()
    with pytest.raises(ValueError, match=r"were not merged"):
        unmerge(back, adapters, lora, norms)  # unmerging twice


def test_different_adapters_merge_one_after_the_other_and_unmerge_in_any_order():
    lora = METHODS["lora"]
    base, a1 = _trained(lora, 1)
    _, a2 = _trained(lora, 2)
    other_alpha = LoraConfig(r=2, alpha=5.0, targets=("W_q", "W_1"))
    both = merge(merge(base, a1, lora), a2, lora)
    assert len(both.merged_adapters) == 2
    merge(both, a1, other_alpha)  # the same arrays under another scaling are another ΔW
    with pytest.raises(ValueError, match=r"it holds 2 merged adapters"):
        unmerge(both, a1, other_alpha)
    back = unmerge(unmerge(both, a1, lora), a2, lora)
    assert back.merged_adapters == ()
    np.testing.assert_allclose(back["blocks.0.W_q"], base["blocks.0.W_q"], rtol=0, atol=1e-15)


def test_a_merged_params_is_a_params_everywhere():
    from lora_np.params import check_params

    lora = METHODS["lora"]
    base, adapters = _trained(lora, 1)
    merged = merge(base, adapters, lora)
    check_params(merged)
    tokens = np.array([[1, 2, 3]])
    logits, cache = model_forward(merged, tokens)
    np.testing.assert_allclose(logits, model_forward(base, tokens, adapters, lora)[0], rtol=1e-12, atol=1e-12)
    assert set(model_backward(np.ones_like(logits), cache)) == set(base)
    assert merged.copy().merged_adapters == merged.merged_adapters
    assert "1 merged adapter" in repr(merged)
