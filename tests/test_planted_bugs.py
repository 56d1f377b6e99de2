"""Tests that can fail: each bug of a table is planted in a copy of the code, and the checks
written to catch it must fail on the copy and pass on the real code.

A bug is planted in one of two ways, both undone after the test (pytest's monkeypatch):
- an edit of the source text of lora_np/layers.py, executed as a module of its own, whose
  function then replaces the real one where the check looks it up. An edit that no longer
  matches the source fails loudly, rather than planting nothing;
- a wrapper around a layer's backward, in lora_np.model, that passes the model's flags on
  wrongly (swapped, or ignored).

The checks are the tests of test_layers.py and test_model.py (or their helpers) with fixed
arguments, so each runs in a fraction of a second.
"""

import inspect
import math
import types
from functools import partial

import lora_np.layers
import lora_np.model
import numpy as np
import pytest
import test_layers  # tests/ is on sys.path: pytest puts a test file's folder there
import test_model

from lora_np import LORA_TARGETS, LoraConfig, ModelConfig


def layers_with(*edits):
    """lora_np.layers with each (old, new) edit made to its source: a module of its own."""
    src = inspect.getsource(lora_np.layers)
    for old, new in edits:
        assert src.count(old) == 1, f"the planted edit no longer matches lora_np/layers.py once: {old!r}"
        src = src.replace(old, new)
    mod = types.ModuleType("lora_np.layers_with_a_planted_bug")
    exec(compile(src, mod.__name__, "exec"), mod.__dict__)
    return mod


def in_layers(fn, *edits, model=False):
    """Plant: the edited `fn` where test_layers finds it, and where model_backward does if `model`."""

    def plant(monkeypatch):
        buggy = getattr(layers_with(*edits), fn)
        monkeypatch.setattr(test_layers, fn, buggy)
        if model:
            monkeypatch.setattr(lora_np.model, fn, buggy)

    return plant


def flags_passed(fn, transform):
    """Plant: model_backward calls layer backward `fn` with its flags transformed (a dict -> dict)."""

    def plant(monkeypatch):
        real = getattr(lora_np.model, fn)
        monkeypatch.setattr(lora_np.model, fn, lambda dout, cache, **flags: real(dout, cache, **transform(flags)))

    return plant


def swap(a, b):
    return lambda flags: {**flags, a: flags[b], b: flags[a]}


def scaling(fn):
    """Plant: LoraConfig.scaling computed by fn(alpha, r, rslora)."""

    def plant(monkeypatch):
        monkeypatch.setattr(LoraConfig, "scaling", property(lambda self: fn(self.alpha, self.r, self.rslora)))

    return plant


def merge_from_block_0(params, adapters, lora):
    """A merge that adds s·B·A of block 0 to every block: shapes fit, ranks are <= r."""
    merged = params.copy()
    for l in range(params.config.n_layers):
        for t in lora.targets:
            B, A = adapters[f"blocks.0.{t}.B"], adapters[f"blocks.0.{t}.A"]
            merged[f"blocks.{l}.{t}"] = params[f"blocks.{l}.{t}"] + lora.scaling * (B @ A)
    return merged


def rank_one_delta_weight(adapters, lora, name):
    """ΔW from the first rank-1 term of B·A only: right shape, rank <= r, wrong rank."""
    B, A = adapters[name + ".B"], adapters[name + ".A"]
    return lora.scaling * np.outer(B[:, 0], A[0])


ZERO_INIT = (ModelConfig(vocab_size=5, context_length=4, d_model=4, n_heads=2, n_layers=2, d_mlp=6),
             LoraConfig(r=2, alpha=3.0, targets=LORA_TARGETS), 3)  # fmt: skip
ZERO_INIT_RS = (ZERO_INIT[0], LoraConfig(r=2, alpha=3.0, targets=LORA_TARGETS, rslora=True), 3)

# (issue item, the bug, how to plant it, the checks that must catch it)
BUGS = [
    ("8", "cross_entropy_backward ignores dloss",
     in_layers("cross_entropy_backward", ("dlogits *= float(dloss) / targets.size", "dlogits *= 1.0 / targets.size")),
     [partial(test_layers.test_cross_entropy_scales_by_dloss, 0.37),
      partial(test_layers.test_cross_entropy_scales_by_dloss, -2.0)]),
    ("8", "cross_entropy_backward writes into the cached probabilities",
     in_layers("cross_entropy_backward", ("dlogits = probs.copy()", "dlogits = probs")),
     [test_layers.test_cross_entropy_backward_leaves_its_cache_alone]),
    ("9", "model passes LayerNorm's need_dgamma and need_dbeta swapped",
     flags_passed("layernorm_backward", swap("need_dgamma", "need_dbeta")),
     [partial(test_model.check_partial, "B without A, betas without gammas"),
      partial(test_model.check_partial, "gammas without betas"),
      partial(test_model.check_partial, "trainable_names(bias='all')")]),
    ("9", "layernorm_backward returns dbeta in dgamma's slot and dgamma in dbeta's",
     in_layers("layernorm_backward", ("return dx, dgamma, dbeta", "return dx, dbeta, dgamma"), model=True),
     [partial(test_model.check_partial, "B without A, betas without gammas"),
      partial(test_model.check_partial, "gammas without betas")]),
    ("9", "model passes the adapters' need_dA and need_dB swapped",
     flags_passed("lora_linear_backward", swap("need_dA", "need_dB")),
     [partial(test_model.check_partial, "A without B"),
      partial(test_model.check_partial, "B without A, betas without gammas")]),
    ("9", "model differentiates every adapter whatever is trainable",
     flags_passed("lora_linear_backward", lambda flags: {}),
     [partial(test_model.check_partial, "A without B"),
      partial(test_model.check_partial, "B without A, betas without gammas"),
      partial(test_model.check_partial, "gammas without betas")]),
    ("10", "linear_backward forms dW and then drops it when need_dW is False",
     in_layers("linear_backward", ("dW = g.T @ x.reshape(-1, W.shape[1]) if need_dW else None",
                                   "dW = g.T @ x.reshape(-1, W.shape[1]); dW = dW if need_dW else None")),
     [partial(test_layers.test_linear_frozen_gradients_are_never_formed, False, True),
      partial(test_layers.test_linear_frozen_gradients_are_never_formed, False, False)]),
    ("10", "linear_backward sums db and then drops it when need_db is False",
     in_layers("linear_backward", ("db = g.sum(axis=0) if (need_db and has_bias) else None",
                                   "db = g.sum(axis=0) if has_bias else None; db = db if need_db else None")),
     [partial(test_layers.test_linear_frozen_gradients_are_never_formed, True, False)]),
    ("10", "lora_linear_backward forms dA and then drops it when need_dA is False",
     in_layers("lora_linear_backward", ("dA = dxA.T @ xd if need_dA else None",
                                        "dA = dxA.T @ xd; dA = dA if need_dA else None")),
     [partial(test_layers.test_lora_linear_frozen_adapter_is_never_formed, False, True)]),
    ("10", "lora_linear_backward forms dB and then drops it when need_dB is False",
     in_layers("lora_linear_backward", ("dB = scaling * (g.T @ xA) if need_dB else None",
                                        "dB = scaling * (g.T @ xA); dB = dB if need_dB else None")),
     [partial(test_layers.test_lora_linear_frozen_adapter_is_never_formed, True, False)]),
    ("10", "layernorm_backward forms dgamma and then drops it when need_dgamma is False",
     in_layers("layernorm_backward",
               ("dgamma = (dout * xhat).sum(axis=lead) if need_dgamma else None",
                "dgamma = (dout * xhat).sum(axis=lead); dgamma = dgamma if need_dgamma else None")),
     [partial(test_layers.test_layernorm_frozen_gradients_are_never_formed, False, True)]),
    ("10", "layernorm_backward sums dbeta and then drops it when need_dbeta is False",
     in_layers("layernorm_backward", ("dbeta = dout.sum(axis=lead) if need_dbeta else None",
                                      "dbeta = dout.sum(axis=lead); dbeta = dbeta if need_dbeta else None")),
     [partial(test_layers.test_layernorm_frozen_gradients_are_never_formed, True, False)]),
    ("11", "dB forgets the scaling s (still non-zero at B = 0, still dA = 0 there)",
     in_layers("lora_linear_backward", ("dB = scaling * (g.T @ xA) if need_dB", "dB = (g.T @ xA) if need_dB"),
               model=True),
     [partial(test_model.check_zero_init, *ZERO_INIT), partial(test_model.check_zero_init, *ZERO_INIT_RS)]),
    ("11", "dB with its sign flipped",
     in_layers("lora_linear_backward",
               ("dB = scaling * (g.T @ xA) if need_dB", "dB = -scaling * (g.T @ xA) if need_dB"), model=True),
     [partial(test_model.check_zero_init, *ZERO_INIT)]),
    ("11", "s = α/√r without rslora (rsLoRA's scaling for everyone)",
     scaling(lambda alpha, r, rslora: alpha / math.sqrt(r)),
     [partial(test_model.test_adapted_forward_equals_dense_weight_written_by_hand, r, False) for r in (2, 4, 8)]),
    ("11", "s = α/r with rslora too (the flag ignored)",
     scaling(lambda alpha, r, rslora: alpha / r),
     [partial(test_model.test_adapted_forward_equals_dense_weight_written_by_hand, r, True) for r in (2, 4, 8)]),
    ("11", "s = α (no division by r)",
     scaling(lambda alpha, r, rslora: alpha),
     [partial(test_model.test_adapted_forward_equals_dense_weight_written_by_hand, r, rs)
      for r in (2, 8) for rs in (False, True)]),
    ("11", "merge adds block 0's s·B·A to every block",
     lambda monkeypatch: monkeypatch.setattr(test_model, "merge", merge_from_block_0),
     [partial(test_model.test_adapted_forward_equals_dense_weight_written_by_hand, 2, False)]),
    ("11", "ΔW built from the first rank-1 term of B·A only",
     lambda monkeypatch: monkeypatch.setattr(test_model, "delta_weight", rank_one_delta_weight),
     [partial(test_model.test_rank_of_delta_w_is_r_and_drops_with_a_zero_column_of_b, r) for r in (2, 3)]),
]  # fmt: skip


@pytest.mark.parametrize("item, bug, plant, checks", BUGS, ids=[f"item{i}: {b}" for i, b, _, _ in BUGS])
def test_planted_bug_is_caught(item, bug, plant, checks, monkeypatch):
    for check in checks:
        check()  # the real code passes
    plant(monkeypatch)
    for check in checks:
        try:
            check()
        except AssertionError:  # a check's own assertion: not a crash, which would prove less
            continue
        pytest.fail(f"{bug}: the check {check} passes with the bug planted")
