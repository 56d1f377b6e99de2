"""The core's one seam: a method plugs in from its own module, and the core is not edited.

A toy method is registered here, as lora_np/methods/ registers DoRA, VeRA and the adapters:
"toy" trains P (d_out, r) and Q (r, d_in) on each adapted weight, h = W0·x + b + P·Q·x (LoRA
without its scaling, under other names), and inserts a gate after each block, x ↦ (1 + g)·x
with one number g a block, starting at 0. Both start as exactly the base model. The model must
then run it: the forward, the gradients (against finite differences), merging, refusing what
register must refuse.
"""

import numpy as np
import pytest

from lora_np import LoraConfig, ModelConfig, cast, init_params, merge, model_backward, model_forward
from lora_np.core import config, lora
from lora_np.core.gradcheck import numerical_vjp, rel_error

CFG = ModelConfig(vocab_size=11, context_length=6, d_model=8, n_heads=2, n_layers=2, d_mlp=16)
TOKENS = np.random.default_rng(0).integers(0, 11, size=(2, 5))


def gate_forward(h, adapters, prefix):
    g = adapters[prefix + "gate"]  # (1,)
    return h * (1.0 + g), (h, g)


def gate_backward(dout, cache, prefix, want, grads):
    h, g = cache
    if prefix + "gate" in want:  # ∂L/∂g = Σ dout ⊙ h
        grads[prefix + "gate"] = np.array([np.sum(dout * h)])
    return dout * (1.0 + g)  # ∂L/∂h


class Toy(lora.Method):
    layers = {"after_block": (gate_forward, gate_backward)}

    def names(self, cfg, lora_cfg):
        names = {}
        for l in range(cfg.n_layers):
            for t in lora_cfg.targets:
                d_out, d_in = cfg.linear_shape(t)
                names.update({f"blocks.{l}.{t}.P": (d_out, lora_cfg.r), f"blocks.{l}.{t}.Q": (lora_cfg.r, d_in)})
            names[f"blocks.{l}.gate"] = (1,)
        return names

    def init(self, cfg, lora_cfg, seed):
        rng = np.random.default_rng(seed)
        return {n: (rng.normal(0, 0.3, s) if n.endswith(".Q") else np.zeros(s))
                for n, s in self.names(cfg, lora_cfg).items()}  # fmt: skip

    def linear_forward(self, x, W, b, adapters, name, lora_cfg, dropout, rng):
        P, Q = adapters[name + ".P"], adapters[name + ".Q"]
        xQ = x @ Q.T  # (..., r)
        return x @ np.asarray(W).T + b + xQ @ P.T, (x, np.asarray(W), P, Q, xQ)

    def linear_backward(self, dout, cache, name, want):
        x, W, P, Q, xQ = cache
        g2, x2, xQ2 = dout.reshape(-1, dout.shape[-1]), x.reshape(-1, x.shape[-1]), xQ.reshape(-1, xQ.shape[-1])
        grads = {}
        if name + ".P" in want:
            grads[name + ".P"] = g2.T @ xQ2  # ∂L/∂P = g·(Q·x)ᵀ
        if name + ".Q" in want:
            grads[name + ".Q"] = (g2 @ P).T @ x2  # ∂L/∂Q = Pᵀ·g·xᵀ
        return dout @ W + (dout @ P) @ Q, grads

    def merge(self, params, adapters, lora_cfg):
        merged = params.with_merged(adapters, lora_cfg)
        for l in range(params.config.n_layers):
            for t in lora_cfg.targets:
                n = f"blocks.{l}.{t}"
                merged[n] = params[n] + adapters[n + ".P"] @ adapters[n + ".Q"]
        return merged


@pytest.fixture
def toy():
    lora.register("toy", config.Extension(methods=("toy",)), {"toy": Toy()})
    try:
        yield LoraConfig(r=2, targets=("W_q", "W_1"), method="toy")
    finally:  # the registry is shared by every test in this process
        del config.EXTENSIONS["toy"], lora.METHODS["toy"]


def test_a_registered_method_starts_as_the_base_model(toy):
    params = init_params(CFG, 0)
    adapters = lora.init_lora(CFG, toy, 1)
    assert np.array_equal(model_forward(params, TOKENS, adapters, toy)[0], model_forward(params, TOKENS)[0])


def test_a_registered_methods_gradients_match_finite_differences(toy):
    params = init_params(CFG, 0)
    rng = np.random.default_rng(2)
    adapters = {n: rng.normal(0, 0.3, a.shape) for n, a in lora.init_lora(CFG, toy, 1).items()}
    dout = rng.normal(size=(*TOKENS.shape, CFG.vocab_size))
    grads = model_backward(dout, model_forward(params, TOKENS, adapters, toy)[1])
    assert set(grads) == set(adapters)  # every array of the method, its gate included, and nothing else
    for name in ("blocks.0.W_q.P", "blocks.1.W_1.Q", "blocks.0.gate", "blocks.1.gate"):
        num = numerical_vjp(lambda: model_forward(params, TOKENS, adapters, toy)[0], adapters[name], dout)
        assert rel_error(grads[name], num) < 1e-7, name


def test_a_registered_method_merges_through_the_core(toy):
    params = cast(init_params(CFG, 0), np.float64)
    rng = np.random.default_rng(3)
    adapters = {n: rng.normal(0, 0.3, a.shape) for n, a in lora.init_lora(CFG, toy, 1).items()}
    adapters.update({f"blocks.{l}.gate": np.zeros(1) for l in range(CFG.n_layers)})  # a gate cannot be merged
    merged = merge(params, adapters, toy)
    np.testing.assert_allclose(model_forward(merged, TOKENS)[0], model_forward(params, TOKENS, adapters, toy)[0],
                               rtol=0, atol=1e-12)  # fmt: skip


def test_register_refuses_what_would_fail_later():
    with pytest.raises(ValueError, match=r"inserts layers at \['after_blok'\]; the slots are"):
        bad = Toy()
        bad.layers = {"after_blok": (gate_forward, gate_backward)}
        lora.register("bad", config.Extension(methods=("bad",)), {"bad": bad})
    with pytest.raises(ValueError, match=r"adds methods \['bad'\] but Methods are given for \[\]"):
        lora.register("bad", config.Extension(methods=("bad",)))
    assert "bad" not in config.EXTENSIONS and "bad" not in lora.METHODS
