"""Optimizers against steps computed by hand; the training loop's guarantees."""

import io

import numpy as np
import pytest
from lora_np.data import VOCAB, make_splits, sample_batch
from lora_np.optim import SGD, AdamW
from lora_np.train import TrainingDiverged, evaluate, generate, loss_and_grads, train, trainable_names

from lora_np import LoraConfig, ModelConfig, Params, cast, init_lora, init_params

CFG = ModelConfig(vocab_size=len(VOCAB), context_length=16, d_model=16, n_heads=2, n_layers=2, d_mlp=32)


@pytest.fixture(scope="module")
def data():
    return make_splits("pretrain", 400, 0)


def test_adamw_matches_a_step_computed_by_hand():
    p = np.array([[1.0, -2.0], [0.5, 3.0]])
    g1, g2 = np.array([[0.1, -0.2], [0.3, 0.0]]), np.array([[-0.1, 0.4], [0.2, 1.0]])
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-8, 0.1
    opt = AdamW({"W": p}, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    expected = p.copy()
    m = v = 0.0
    for t, g in ((1, g1), (2, g2)):
        opt.step({"W": g})
        # by hand, entry by entry, in the order of Loshchilov & Hutter's Algorithm 2
        expected = expected - lr * wd * expected
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        expected = expected - lr * mhat / (np.sqrt(vhat) + eps)
        np.testing.assert_allclose(p, expected, rtol=1e-15, atol=1e-15)
    # the first step moves every entry with a non-zero gradient by lr (Adam's normalized step)
    q = np.zeros(3)
    AdamW({"b": q}, lr=0.1).step({"b": np.array([5.0, -1e-3, 0.0])})
    np.testing.assert_allclose(q, [-0.1, 0.1, 0.0], rtol=1e-4)


def test_sgd_momentum_matches_by_hand():
    p = np.array([1.0, 2.0])
    opt = SGD({"w": p}, lr=0.1, momentum=0.5)
    opt.step({"w": np.array([1.0, -1.0])})  # v = g
    opt.step({"w": np.array([1.0, 0.0])})  # v = 0.5·v + g = [1.5, -0.5]
    np.testing.assert_allclose(p, [1.0 - 0.1 - 0.15, 2.0 + 0.1 + 0.05])
    assert SGD({"w": np.zeros(3)}, lr=0.1).state_bytes() == 0


def test_optimizer_state_only_for_trainable_entries():
    params = init_params(CFG, 0)
    lora = LoraConfig(r=2)
    adapters = init_lora(CFG, lora, 0)
    opt = AdamW(adapters, lr=1e-3)
    assert set(opt.state) == set(adapters)
    # two moments per trainable number, float64: 16 bytes each
    assert opt.state_bytes() == 16 * sum(a.size for a in adapters.values())
    full = AdamW(params, lr=1e-3)
    assert full.state_bytes() == 16 * sum(a.size for a in params.values())


@pytest.mark.parametrize("bad", [{"lr": 0.0}, {"lr": -1.0}, {"lr": float("nan")}, {"betas": (1.0, 0.9)}])
def test_optimizer_bad_hyperparameters(bad):
    kwargs = {"lr": 1e-3, **bad}
    with pytest.raises(ValueError, match=next(iter(bad)).split("s")[0]):
        AdamW({"w": np.zeros(2)}, **kwargs)


def test_trainable_names_bias_options():
    params = init_params(CFG, 0)
    lora = LoraConfig(r=2, targets=("W_q", "W_v"))
    adapters = init_lora(CFG, lora, 0)
    assert trainable_names(params) == list(params)
    assert set(trainable_names(params, adapters, lora, "none")) == set(adapters)
    extra = set(trainable_names(params, adapters, lora, "lora_only")) - set(adapters)
    assert extra == {f"blocks.{l}.b_{w}" for l in range(2) for w in "qv"}
    extra = set(trainable_names(params, adapters, lora, "all")) - set(adapters)
    assert extra == {n for n in params if n.split(".")[-1].startswith("b_") or n.endswith(".beta")}
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"):
        trainable_names(params, adapters, lora, "some")


def _fit_one_batch(adapters=None, lora=None, lr=1e-2, steps=60):
    params = init_params(CFG, 0)
    if adapters is not None:
        # A fresh W_u (std 0.02) keeps every logit near 0 whatever the frozen body does; a
        # pretrained head is larger. Scale it so the adapters have something to steer.
        params["W_u"] *= 20
    x, y = sample_batch(make_splits("pretrain", 100, 1)[0], 4, 16, np.random.default_rng(0))
    trained = adapters if adapters is not None else params
    opt = AdamW(trained, lr=lr)
    losses = []
    for _ in range(steps):
        loss, grads = loss_and_grads(params, x, y, adapters, lora)
        opt.step(grads)
        losses.append(loss)
    return losses


def test_overfitting_one_batch_full():
    losses = _fit_one_batch()
    assert losses[0] > 3.0  # about log(V) = log(30) at init
    assert losses[-1] < 0.2 * losses[0]


def test_overfitting_one_batch_lora():
    lora = LoraConfig(r=4, alpha=8.0, targets=("W_q", "W_k", "W_v", "W_o", "W_1", "W_2"))
    losses = _fit_one_batch(init_lora(CFG, lora, 1), lora, lr=1e-2, steps=100)
    assert losses[-1] < 0.2 * losses[0]


def test_lora_training_leaves_base_bit_identical_and_changes_every_adapter(data):
    params = cast(init_params(CFG, 0), np.float32)
    before = {k: v.copy() for k, v in params.items()}
    lora = LoraConfig(r=2, targets=("W_q", "W_k", "W_v", "W_o", "W_1", "W_2"))
    adapters = cast(init_lora(CFG, lora, 0), np.float32)
    initial = {k: v.copy() for k, v in adapters.items()}
    opt = AdamW(adapters, lr=1e-2)
    train(params, data[0], opt, adapters=adapters, lora=lora, steps=3, batch_size=4, block_size=16, seed=0, log_every=0)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    for k in adapters:
        assert not np.array_equal(adapters[k], initial[k]), f"{k} did not change"


def _run(data, seed):
    params = cast(init_params(CFG, 0), np.float32)
    lora = LoraConfig(r=2, dropout=0.1)
    adapters = cast(init_lora(CFG, lora, 0), np.float32)
    opt = AdamW(adapters, lr=1e-2)
    kw = dict(adapters=adapters, lora=lora, steps=5, batch_size=4, block_size=16, seed=seed, log_every=0)
    return train(params, data[0], opt, **kw)["loss"], adapters


def test_same_seed_same_history_bit_for_bit(data):
    (h1, a1), (h2, a2), (h3, _) = _run(data, 3), _run(data, 3), _run(data, 4)
    assert h1 == h2  # float equality: bit for bit, dropout included
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)
    assert h1 != h3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's own inf/nan warnings: expected here
def test_non_finite_loss_stops_with_the_step_and_keeps_last_good_state(data):
    params = init_params(CFG, 0)
    opt = AdamW(params, lr=1e-3)
    train(params, data[0], opt, steps=2, batch_size=2, block_size=8, seed=0, log_every=0)
    params["W_u"][0, 0] = np.inf  # poison a weight: the next forward pass is not finite
    snapshot = {k: v.copy() for k, v in params.items()}
    with pytest.raises(
        TrainingDiverged,
        match=r"non-finite .* at step 0; nothing was updated at this step, the parameters hold the values this call",
    ) as e:
        train(params, data[0], opt, steps=3, batch_size=2, block_size=8, seed=0, log_every=0, label="full")
    assert e.value.step == 0
    for k in params:  # nothing was updated by the failing step
        np.testing.assert_array_equal(params[k], snapshot[k])


def test_progress_lines_when_not_a_terminal(data):
    params = init_params(CFG, 0)
    out = io.StringIO()
    h = train(params, data[0], AdamW(params, lr=1e-3), steps=4, batch_size=2, block_size=8, seed=0, log_every=2,
              label="demo", stream=out)  # fmt: skip
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("demo step 2/4  loss ") and "tok/s" in lines[0]
    assert len(h["loss"]) == 4 and len(h["time"]) == 4 and h["tokens_per_s"] > 0


def test_evaluate_and_generate_are_deterministic(data):
    params = init_params(CFG, 0)
    assert evaluate(params, data[1], block_size=16) == evaluate(params, data[1], block_size=16)
    a = generate(params, np.array([1, 2]), 20, temperature=0.8, seed=5)
    b = generate(params, np.array([1, 2]), 20, temperature=0.8, seed=5)
    assert np.array_equal(a, b) and a.shape == (22,) and a[:2].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        generate(params, np.array([1]), 3, temperature=0)


def test_training_arguments_checked(data):
    params = init_params(CFG, 0)
    opt = AdamW(params, lr=1e-3)
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got 0"):
        train(params, data[0], opt, steps=0, batch_size=2, block_size=8, seed=0)
    lora = LoraConfig(r=2)
    with pytest.raises(ValueError, match=r"optimizer must hold exactly the trainable arrays"):
        train(params, data[0], opt, adapters=init_lora(CFG, lora, 0), lora=lora, steps=1, batch_size=2,
              block_size=8, seed=0)  # fmt: skip
    assert isinstance(params, Params)


def test_an_optimizer_on_a_copy_is_refused():
    """AdamW(cast(adapters, ...)) would train a copy: the loss would never move."""
    params = cast(init_params(CFG, 0), np.float32)
    lora = LoraConfig(r=2)
    adapters = cast(init_lora(CFG, lora, 0), np.float32)
    opt = AdamW(cast(adapters, np.float32), lr=1e-2)
    with pytest.raises(ValueError, match=r"optimizer\.arrays\['blocks\.0\.W_q\.A'\] is a copy"):
        train(params, make_splits("pretrain", 100, 0)[0], opt, adapters=adapters, lora=lora, steps=1, batch_size=2,
              block_size=8, seed=0)  # fmt: skip


def test_optimizer_checks_gradient_shapes_and_decays_only_matrices():
    W, b = np.ones((2, 2)), np.ones(2)
    opt = AdamW({"W": W, "b": b}, lr=0.1, weight_decay=0.5)
    with pytest.raises(ValueError, match=r"grads\['W'\] must have shape \(2, 2\) and dtype float64, got \(2,\)"):
        opt.step({"W": np.zeros(2), "b": np.zeros(2)})
    opt.step({"W": np.zeros((2, 2)), "b": np.zeros(2)})  # zero gradients: only the decay moves anything
    np.testing.assert_array_equal(W, np.full((2, 2), 1 - 0.1 * 0.5))
    np.testing.assert_array_equal(b, np.ones(2))  # vectors (biases, LayerNorm gains) are not decayed
    p = np.array([1.0, -2.0])
    SGD({"p": p}, lr=0.5).step({"p": np.array([2.0, 2.0])})  # plain SGD: p - lr·g
    np.testing.assert_array_equal(p, [0.0, -3.0])


def test_evaluate_is_the_mean_over_all_windows_whatever_the_batch_size(data):
    """Arithmetic done another way: one cross-entropy over every window at once."""
    from lora_np.data import eval_windows
    from lora_np.layers import cross_entropy_forward
    from lora_np.model import model_forward

    params = init_params(CFG, 0)
    x, y = eval_windows(data[1], 16, 10)
    whole = cross_entropy_forward(model_forward(params, x)[0], y)[0]
    assert evaluate(params, data[1], block_size=16, max_windows=10, batch_size=3) == pytest.approx(whole, rel=1e-12)
