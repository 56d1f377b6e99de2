"""The adapter baselines (AdapterH, AdapterL): layers, whole model, trainer, files, demo and latency.

Every gradient is checked in float64 against centered finite differences of the forward, never
against other code of the package: the three layer pairs over shapes Hypothesis draws, and the
whole model with adapters, adapters moved off their init (W_up = 0 would make ∂L/∂W_down vanish
and the check pass vacuously). The invariants: an adapter at init is exactly the identity and the
model exactly the base; the trainable numbers are the paper's formula (Section 5.1), computed here
by hand; merging is refused; the trainer and the checkpoints take adapters as they take LoRA. The
latency benchmark is checked for its structure and invariants, never its timings.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lora_np.adapters import (
    adapter_backward,
    adapter_forward,
    adapter_ln_backward,
    adapter_ln_forward,
    bottleneck_backward,
    bottleneck_forward,
    relu_backward,
    relu_forward,
)
from lora_np.checkpoint import load_adapters, save_adapters
from lora_np.gradcheck import assert_grad_close, numerical_vjp
from lora_np.optim import AdamW
from lora_np.train import loss_and_grads, train, trainable_names
from lora_np.variants import init_adapters

from lora_np import LoraConfig, ModelConfig, init_lora, init_params, merge, model_backward, model_forward, unmerge
from lora_np.studies.latency import VARIANTS, latency_table, measure_latency

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"  # the committed results files

CFG = ModelConfig(vocab_size=11, context_length=8, d_model=8, n_heads=2, n_layers=2, d_mlp=12)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 5))
METHODS = ("adapter_h", "adapter_l")


def moved(adapters, seed=1, scale=0.3):
    """Adapters moved off their init, so that no gradient is zero by construction."""
    rng = np.random.default_rng(seed)
    return {k: a + scale * rng.normal(size=a.shape) for k, a in adapters.items()}


def layer_inputs(rng, lead, D, r, ln):
    h = rng.normal(size=(*lead, D))
    w = [rng.normal(size=(r, D)) / np.sqrt(D), rng.normal(size=r), rng.normal(size=(D, r)), rng.normal(size=D)]
    return [h, 1.0 + 0.3 * rng.normal(size=D), 0.3 * rng.normal(size=D), *w] if ln else [h, *w]


shapes = st.tuples(st.lists(st.integers(1, 3), min_size=1, max_size=2), st.integers(2, 7), st.integers(1, 4))


@settings(max_examples=20, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), act=st.sampled_from(["gelu", "relu"]),
       layer=st.sampled_from(["bottleneck", "adapter", "adapter_ln"]))  # fmt: skip
def test_every_input_of_every_layer_matches_finite_differences(shape, seed, act, layer):
    (lead, D, r), rng = shape, np.random.default_rng(seed)
    forward, backward = {"bottleneck": (bottleneck_forward, bottleneck_backward),
                         "adapter": (adapter_forward, adapter_backward),
                         "adapter_ln": (adapter_ln_forward, adapter_ln_backward)}[layer]  # fmt: skip
    inputs = layer_inputs(rng, lead, D, r, layer == "adapter_ln")
    out, cache = forward(*inputs, act=act)
    if act == "relu":  # ReLU has a kink at 0: a finite difference across it measures nothing
        u = cache[-1][0][0] if layer == "adapter_ln" else cache[0][0]  # the input of W_down's linear
        n = u @ inputs[-4].T + inputs[-3]  # u·W_downᵀ + b_down, the input of f
        assume(np.abs(n).min() > 1e-4)
    dout = rng.normal(size=out.shape)
    grads = backward(dout, cache)
    assert len(grads) == len(inputs)
    for i, (x, g) in enumerate(zip(inputs, grads, strict=True)):
        assert g.shape == x.shape, (layer, i)
        num = numerical_vjp(lambda: forward(*inputs, act=act)[0], x, dout)
        assert_grad_close(f"{layer}/{act} input {i} {x.shape}", g, num, tol=1e-7)


def test_relu_pair():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 3.0])
    out, cache = relu_forward(x)
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0, 0.5, 3.0])
    np.testing.assert_array_equal(relu_backward(np.full(5, 2.0), cache), [0.0, 0.0, 0.0, 2.0, 2.0])


def test_a_frozen_gradient_is_not_formed():
    rng = np.random.default_rng(0)
    inputs = layer_inputs(rng, (3,), 6, 2, ln=True)
    out, cache = adapter_ln_forward(*inputs)
    dx, dgamma, dbeta, dW_down, db_down, dW_up, db_up = adapter_ln_backward(
        np.ones_like(out), cache, need_dgamma=False, need_dW_down=False, need_db_up=False)  # fmt: skip
    assert dgamma is None and dW_down is None and db_up is None
    assert dbeta.shape == (6,) and db_down.shape == (2,) and dW_up.shape == (6, 2) and dx.shape == (3, 6)


@pytest.mark.parametrize("ln", [False, True])
def test_an_adapter_at_init_is_exactly_the_identity(ln):
    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=6, n_heads=2, n_layers=1, d_mlp=8)
    lora = LoraConfig(r=3, method="adapter_l" if ln else "adapter_h")
    a = init_lora(cfg, lora, seed=0)
    p = "blocks.0.adapter." if ln else "blocks.0.adapter_attn."
    assert not np.any(a[p + "W_up"]) and not np.any(a[p + "b_up"]) and np.any(a[p + "W_down"])
    h = np.random.default_rng(1).normal(size=(2, 4, 6)) * 50  # any scale: out = h + 0
    w = [a[p + k] for k in ("W_down", "b_down", "W_up", "b_up")]
    out = adapter_ln_forward(h, a[p + "ln.gamma"], a[p + "ln.beta"], *w)[0] if ln else adapter_forward(h, *w)[0]
    np.testing.assert_array_equal(out, h)


@pytest.mark.parametrize("method", METHODS)
def test_w_down_starts_with_variance_one_over_d_so_w_down_h_keeps_the_scale_of_h(method):
    """W_down ~ N(0, 1/D): then each entry of W_down·h, a sum of D products, has the variance of
    one entry of h (D · 1/D · Var(h)), and ∂L/∂W_up = g·f(W_down·h)ᵀ is not small at step 0.
    Seeded Monte Carlo on at least 16,384 entries: the variance's relative standard error is
    ~1% (6% allowed), the fourth moment's ~0.04 (0.2 allowed)."""
    D, r = 64, 32
    cfg = ModelConfig(vocab_size=5, context_length=4, d_model=D, n_heads=2, n_layers=8, d_mlp=8)
    a = init_lora(cfg, LoraConfig(r=r, method=method), seed=0)
    W_down = [v for k, v in a.items() if k.endswith(".W_down")]
    assert len(W_down) == (16 if method == "adapter_h" else 8) and all(w.shape == (r, D) for w in W_down)
    entries = np.concatenate([w.ravel() for w in W_down])
    assert abs(entries.mean()) < 4 / np.sqrt(D * entries.size) and abs(entries.var() * D - 1) < 0.06
    # normal, not uniform: a normal's fourth moment is 3σ⁴ (a uniform's 1.8σ⁴)
    assert abs(np.mean(entries**4) / entries.var() ** 2 - 3) < 0.2
    h = np.random.default_rng(2).normal(size=(2048, D))  # Var(h) = 1
    assert abs(np.mean([(h @ w.T).var() for w in W_down]) - 1) < 0.06  # (2048, r): W_down·h at the scale of h


@pytest.mark.parametrize("method", METHODS)
def test_the_model_starts_as_exactly_the_base(method):
    params = init_params(CFG, seed=0)
    start, adapters = init_adapters(params, LoraConfig(r=3, method=method), seed=1)
    assert start is params  # nothing of the base is replaced
    for train_mode in (False, True):  # no dropout either way
        logits, _ = model_forward(params, TOKENS, adapters, LoraConfig(r=3, method=method), train=train_mode)
        np.testing.assert_array_equal(logits, model_forward(params, TOKENS)[0])


@pytest.mark.parametrize("method", METHODS)
def test_whole_model_gradients_with_adapters_match_finite_differences(method):
    lora = LoraConfig(r=3, method=method)
    rng = np.random.default_rng(2)
    params = init_params(CFG, seed=0)
    params.update({k: v + 0.1 * rng.normal(size=v.shape) for k, v in params.items()})  # biases, betas off 0
    adapters = moved(init_lora(CFG, lora, seed=1))
    # every adapter array, and base weights before, inside and after the adapted sublayers
    base_names = ["blocks.0.W_o", "blocks.0.b_2", "blocks.1.ln2.gamma", "blocks.1.W_1", "ln_f.beta", "W_e", "W_p"]
    trainable = list(adapters) + base_names
    logits, cache = model_forward(params, TOKENS, adapters, lora)
    dlogits = rng.normal(size=logits.shape)
    grads = model_backward(dlogits, cache, trainable)
    assert set(grads) == set(trainable)
    for name in trainable:
        x = adapters[name] if name in adapters else params[name]
        assert grads[name].shape == x.shape, name
        num = numerical_vjp(lambda: model_forward(params, TOKENS, adapters, lora)[0], x, dlogits)
        assert_grad_close(f"{method}: {name}", grads[name], num, tol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_only_the_names_asked_for_get_a_gradient(method):
    lora = LoraConfig(r=2, method=method)
    adapters = moved(init_lora(CFG, lora, seed=0))
    logits, cache = model_forward(init_params(CFG, seed=0), TOKENS, adapters, lora)
    assert set(model_backward(np.ones_like(logits), cache)) == set(adapters)  # default: every adapter array
    some = [k for k in adapters if k.endswith((".W_up", ".ln.beta"))]
    assert set(model_backward(np.ones_like(logits), cache, some)) == set(some)


@pytest.mark.parametrize("method, n_adapter, n_ln", [("adapter_h", 2, 0), ("adapter_l", 1, 1)])
@pytest.mark.parametrize("r", [1, 4, 8])
def test_trainable_numbers_are_the_papers_formula(method, n_adapter, n_ln, r):
    # Section 5.1: |Θ| = L̂_Adpt·(2·d_model·r + r + d_model) + 2·L̂_LN·d_model
    cfg = ModelConfig(vocab_size=11, context_length=8, d_model=8, n_heads=2, n_layers=3, d_mlp=12)
    D, L_adpt, L_ln = cfg.d_model, n_adapter * cfg.n_layers, n_ln * cfg.n_layers
    adapters = init_lora(cfg, LoraConfig(r=r, method=method), seed=0)
    assert sum(a.size for a in adapters.values()) == L_adpt * (2 * D * r + r + D) + 2 * L_ln * D


@pytest.mark.parametrize("method", METHODS)
def test_combinations_that_mean_nothing_for_an_adapter_are_refused(method):
    assert LoraConfig(method=method).targets == ()  # the default targets are dropped: nothing is adapted
    assert LoraConfig(method=method, targets=()) == LoraConfig(method=method)
    with pytest.raises(ValueError, match=r"adapts no weight: targets must be \(\) or left at its default"):
        LoraConfig(method=method, targets=("W_q",))
    for field, value in (("alpha", 8.0), ("dropout", 0.1), ("init", "kaiming"), ("rslora", True),
                         ("lr_ratio", 16.0), ("base_quant", "nf4")):  # fmt: skip
        with pytest.raises(ValueError, match=f"leave alpha, dropout, .* at their defaults, got {field}="):
            LoraConfig(method=method, **{field: value})
    with pytest.raises(ValueError, match="bottleneck width of method='adapter_.' and must be between 1 and "
                                         "d_model = 8, got r=9"):  # fmt: skip
        init_lora(CFG, LoraConfig(r=9, method=method), seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_merging_adapters_is_refused(method):
    lora = LoraConfig(r=2, method=method)
    params = init_params(CFG, seed=0)
    adapters = moved(init_lora(CFG, lora, seed=0))
    for fn in (merge, unmerge):
        with pytest.raises(ValueError, match=r"adapters cannot be (un)?merged: an adapter is an extra layer"):
            fn(params, adapters, lora)


@pytest.mark.parametrize("method", METHODS)
def test_the_trainer_trains_adapters_only_and_checkpoints_keep_them(method, tmp_path):
    lora = LoraConfig(r=2, method=method)
    params = init_params(CFG, seed=0)
    before = {k: v.copy() for k, v in params.items()}
    _, adapters = init_adapters(params, lora, seed=1)
    assert set(trainable_names(params, adapters, lora)) == set(adapters)
    ids = np.tile(np.arange(CFG.vocab_size), 40)  # a stream with a pattern to learn: 0 1 2 ... 10 0 1 ...
    x, y = ids[None, :-1][:, :8], ids[None, 1:][:, :8]
    loss0, _ = loss_and_grads(params, x, y, adapters, lora)
    start = {k: v.copy() for k, v in adapters.items()}
    train(params, ids, AdamW(adapters, lr=3e-2), adapters=adapters, lora=lora, steps=30, batch_size=4,
          block_size=8, seed=0, log_every=0)  # fmt: skip
    # a random tiny base learns slowly through any adapter (LoRA too: 2.41 -> 2.36 here); it must learn
    assert loss_and_grads(params, x, y, adapters, lora)[0] < loss0 - 0.02
    assert all(not np.array_equal(adapters[k], start[k]) for k in adapters)  # W_down too, once W_up moved
    assert all(np.array_equal(params[k], before[k]) for k in params)  # the base is frozen
    path = save_adapters(tmp_path / "adapter.npz", adapters, lora, params)
    loaded, lora2 = load_adapters(path, params)
    assert lora2 == lora and set(loaded) == set(adapters)
    np.testing.assert_array_equal(model_forward(params, x, loaded, lora2)[0], model_forward(params, x, adapters,
                                                                                          lora)[0])  # fmt: skip


def test_latency_benchmark_structure_and_invariants():
    res = measure_latency(quick=True)
    assert [(c["batch"], c["seq_len"]) for c in res["cells"]] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    for c in res["cells"]:
        assert c["tokens"] == c["batch"] * c["seq_len"] and set(c["variants"]) == set(VARIANTS)
        for t in c["variants"].values():
            assert len(t["wall_s"]) == len(t["cpu_s"]) == res["meta"]["reps"]
            assert t["median_s"] > 0 and t["cpu_median_s"] >= 0
            assert t["per_token_us"] == pytest.approx(t["median_s"] / c["tokens"] * 1e6)
        assert c["variants"]["base"]["vs_base"] == c["variants"]["base"]["cpu_vs_base"] == 1.0
    # an adapter or LoRA at init changes nothing; merged LoRA is the base's architecture, and unmerged's logits
    assert res["checks"]["init_max_abs_diff"] == {"lora": 0.0, "adapter_h": 0.0, "adapter_l": 0.0}
    assert res["checks"]["merged_same_arrays"] is True and res["checks"]["merged_max_abs_diff"] < 1e-5
    D, L, r = res["meta"]["model"]["d_model"], res["meta"]["model"]["n_layers"], res["meta"]["r"]
    assert res["extra_params"] == {"base": 0, "merged_lora": 0, "lora": L * 2 * 2 * D * r,  # W_q, W_v: A and B
                                   "adapter_h": 2 * L * (2 * D * r + r + D),
                                   "adapter_l": L * (2 * D * r + r + D) + 2 * L * D}  # fmt: skip
    json.dumps(res)  # JSON-ready
    text = latency_table(res)
    assert "AdapterH" in text and "merged LoRA" in text and "unmerged LoRA" in text


@pytest.mark.parametrize("method, label", [("adapter_h", "AdapterH r=4"), ("adapter_l", "AdapterL r=4")])
def test_the_demo_runs_each_adapter(tmp_path, method, label):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lora_np", "--method", method, "--steps", "3", "--pretrain-steps",
                        "3", "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert label in r.stdout and f"{label} closes" in r.stdout and "cannot be merged" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["merge_max_abs_diff"] is None
    D, L = 64, 2  # the demo's model
    want = 2 * L * (2 * D * 4 + 4 + D) if method == "adapter_h" else L * (2 * D * 4 + 4 + D) + 2 * L * D
    assert res["rows"]["lora"]["trainable"] == want
    r = subprocess.run([sys.executable, "-m", "lora_np", "--method", method, "--alpha", "8", "--out",
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "leave alpha" in r.stderr


def test_the_committed_results_fit_the_code():
    from lora_np.studies.adapter_baselines import QUALITY_METHODS, load_results

    res = load_results(NOTEBOOKS / "adapters_results.json")  # raises, saying how to regenerate it, if the demo's recipe changed
    assert set(res["runs"]) == set(QUALITY_METHODS) and res["latency"]["checks"]["merged_same_arrays"]


def test_the_latency_command_runs_on_its_own(tmp_path):
    """`python -m lora_np latency` (earlier `python -m lora_np.bench_latency`): the table, and its JSON if asked."""
    out = tmp_path / "latency.json"
    r = subprocess.run([sys.executable, "-m", "lora_np", "latency", "--quick", "--out", str(out)], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "microseconds per token" in r.stdout
    assert set(json.loads(out.read_text())["checks"]) >= {"merged_same_arrays"}
