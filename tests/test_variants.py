"""LoRA's successors in the whole model: every gradient against finite differences, every start.

The layer pairs have their own tests (test_dora.py, test_vera.py, test_pissa.py, test_nf4.py);
these check what the model makes of them: the adapted model's gradients for each method, in
float64, against centered finite differences of model_forward; that each method starts as the
base model (exactly, or to round-off where an SVD or a 4-bit base is involved); merge against
the unmerged model; LoRA+'s learning rates; and the demo's flags.
"""

import subprocess
import sys

import numpy as np
import pytest
from lora_np.counting import count_arrays, method_params
from lora_np.gradcheck import assert_grad_close, numerical_vjp
from lora_np.lora import trainable_adapters
from lora_np.nf4 import NF4Tensor
from lora_np.optim import AdamW
from lora_np.variants import dora_norms, init_adapters, lr_scales

from lora_np import LoraConfig, ModelConfig, init_params, merge, model_backward, model_forward, unmerge

CFG = ModelConfig(vocab_size=11, context_length=8, d_model=8, n_heads=2, n_layers=2, d_mlp=12)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 5))
TARGETS = ("W_q", "W_v", "W_1", "W_2")  # square and non-square, both ways

METHODS = {
    "lora": {},
    "dora (norm constant)": {"method": "dora"},
    "dora (exact)": {"method": "dora", "dora_exact_norm": True},
    "vera": {"method": "vera"},
    "pissa": {"init": "pissa"},
    "qlora": {"base_quant": "nf4"},
    "qlora double quant": {"base_quant": "nf4", "double_quant": True},
}


def trained(params, lora, seed=1):
    """Adapters moved off their start, so no gradient is checked where it is trivially zero."""
    base, adapters = init_adapters(params, lora, seed)
    rng = np.random.default_rng(seed)
    for k in trainable_adapters(adapters):
        adapters[k] = adapters[k] + 0.2 * rng.normal(size=adapters[k].shape)
    return base, adapters


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_trainable_gradient_matches_finite_differences(name):
    lora = LoraConfig(r=2, alpha=3.0, targets=TARGETS, **METHODS[name])
    base, adapters = trained(init_params(CFG, seed=0), lora)
    logits, cache = model_forward(base, TOKENS, adapters, lora)
    dlogits = np.random.default_rng(3).normal(size=logits.shape)
    grads = model_backward(dlogits, cache)
    assert set(grads) == set(trainable_adapters(adapters))  # VeRA's shared matrices and W0 get none
    # DoRA with the norm held constant differentiates another function than the forward: its
    # gradient is checked against the norm-constant forward in test_dora.py; here A and B are
    # skipped for it and m (which does not go through the norm) is checked.
    skip = (".A", ".B") if name == "dora (norm constant)" else ()
    for k in sorted(grads):
        if k.endswith(skip):
            continue
        num = numerical_vjp(lambda: model_forward(base, TOKENS, adapters, lora)[0], adapters[k], dlogits)
        assert_grad_close(f"{name}: {k}", grads[k], num, tol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_starts_as_the_base_model(name):
    lora = LoraConfig(r=2, targets=TARGETS, **METHODS[name])
    params = init_params(CFG, seed=0)
    base_logits, _ = model_forward(params, TOKENS)
    start, adapters = init_adapters(params, lora, seed=1)
    logits, _ = model_forward(start, TOKENS, adapters, lora)
    if "qlora" in name:  # the start is the 4-bit base: its own logits, exactly
        quantized, _ = model_forward(start, TOKENS)
        np.testing.assert_array_equal(logits, quantized)
        assert all(isinstance(start[f"blocks.{l}.{t}"], NF4Tensor) for l in range(2) for t in ("W_q", "W_o", "W_2"))
    elif name == "pissa":  # an SVD: W_res + s·B·A is W0 to round-off
        assert np.abs(logits - base_logits).max() < 1e-12
    else:
        np.testing.assert_array_equal(logits, base_logits)


@pytest.mark.parametrize("name", ["lora", "dora (exact)", "vera", "pissa", "qlora"])
def test_merge_equals_unmerged_and_unmerge_goes_back(name):
    lora = LoraConfig(r=2, alpha=3.0, targets=TARGETS, **METHODS[name])
    base, adapters = trained(init_params(CFG, seed=0), lora)
    merged = merge(base, adapters, lora)
    np.testing.assert_allclose(model_forward(merged, TOKENS)[0], model_forward(base, TOKENS, adapters, lora)[0],
                               atol=1e-12, rtol=1e-12)  # fmt: skip
    norms = dora_norms(base, adapters, lora) if lora.method == "dora" else None
    back = unmerge(merged, adapters, lora, norms=norms)
    for k in base:
        w0 = base[k].dequantize() if isinstance(base[k], NF4Tensor) else base[k]
        np.testing.assert_allclose(back[k], w0, atol=1e-12, rtol=0, err_msg=k)


def test_dora_unmerge_without_the_norms_is_refused():
    lora = LoraConfig(r=2, targets=TARGETS, method="dora")
    base, adapters = trained(init_params(CFG, seed=0), lora)
    with pytest.raises(ValueError, match="keeps V's direction but not its norm"):
        unmerge(merge(base, adapters, lora), adapters, lora)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trainable_numbers_match_the_formula(name):
    lora = LoraConfig(r=2, targets=TARGETS, **METHODS[name])
    _, adapters = init_adapters(init_params(CFG, seed=0), lora, seed=1)
    assert count_arrays({k: adapters[k] for k in trainable_adapters(adapters)}) == method_params(CFG, lora)


def test_loraplus_moves_B_lambda_times_as_far_as_A():
    # Adam's first step moves every entry by lr·g/(|g| + eps) ≈ lr: the ratio of B's step to A's is λ
    lora = LoraConfig(r=2, targets=TARGETS, lr_ratio=16.0)
    base, adapters = trained(init_params(CFG, seed=0), lora)
    before = {k: v.copy() for k, v in adapters.items()}
    opt = AdamW(adapters, lr=1e-3, lr_scale=lr_scales(adapters, lora))
    logits, cache = model_forward(base, TOKENS, adapters, lora)
    opt.step(model_backward(np.ones_like(logits), cache))
    step = {k: np.abs(adapters[k] - before[k]).max() for k in adapters}
    for k in adapters:
        want = 16e-3 if k.endswith(".B") else 1e-3
        assert abs(step[k] / want - 1) < 1e-4, (k, step[k])


def test_a_quantized_or_shared_frozen_weight_cannot_be_trained():
    lora = LoraConfig(r=2, targets=TARGETS, base_quant="nf4")
    base, adapters = init_adapters(init_params(CFG, seed=0), lora, seed=1)
    logits, cache = model_forward(base, TOKENS, adapters, lora)
    with pytest.raises(ValueError, match=r"stored in another format than an array \(a quantized base\)"):
        model_backward(np.ones_like(logits), cache, trainable=["blocks.0.W_o"])
    lora = LoraConfig(r=2, targets=TARGETS, method="vera")
    base, adapters = init_adapters(init_params(CFG, seed=0), lora, seed=1)
    logits, cache = model_forward(base, TOKENS, adapters, lora)
    with pytest.raises(ValueError, match="adapter arrays that the method keeps frozen by definition"):
        model_backward(np.ones_like(logits), cache, trainable=["vera.8x8.A"])


@pytest.mark.parametrize("flags, row", [(["--method", "dora"], "DoRA r=4"), (["--method", "vera"], "VeRA r=4"),
                                        (["--init", "pissa"], "PiSSA r=4"), (["--loraplus", "16"], "LoRA+ r=4 λ=16"),
                                        (["--nf4", "--double-quant"], "QLoRA r=4")])  # fmt: skip
def test_the_demo_runs_each_method(tmp_path, flags, row):
    r = subprocess.run([sys.executable, "-m", "lora_np", *flags, "--steps", "3", "--pretrain-steps", "3",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert row in r.stdout and "closes" in r.stdout


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_base_bytes_formula_against_the_stored_tensors(double_quant):
    from lora_np.counting import nf4_base_bytes
    from lora_np.params import cast

    cfg = ModelConfig(vocab_size=11, context_length=8, d_model=64, n_heads=2, n_layers=2, d_mlp=256)
    lora = LoraConfig(r=2, base_quant="nf4", double_quant=double_quant)
    base, _ = init_adapters(cast(init_params(cfg, seed=0), np.float32), lora, seed=1)
    stored = sum(a.nbytes for a in base.values())  # what the arrays and NF4Tensors really hold
    # the formula counts the paper's bits per parameter; the stored tensors add one float32 mean per
    # double-quantized weight (and its last partial group of scales): a few bytes per weight
    assert 0 <= stored - nf4_base_bytes(cfg, double_quant) <= 12 * cfg.n_layers * 6
    assert nf4_base_bytes(cfg, double_quant) < 4 * sum(a.size for a in init_params(cfg, seed=0).values()) / 2


def test_compare_methods_runs_each_method_from_the_same_base(tmp_path):
    """The runs behind notebooks 07 and 08 on a tiny configuration, checked by invariants: full
    fine-tuning closes exactly its own gap, LoRA and the adapters start from exactly the base (B = 0,
    W_up = 0), and each trains the numbers its count says."""
    from lora_np.counting import adapter_params, config_lora_params
    from lora_np.data import VOCAB

    from lora_np.studies.recipe import DemoConfig
    from lora_np.studies.successors import SuccessorsConfig, compare_methods

    model = ModelConfig(vocab_size=len(VOCAB), context_length=16, d_model=16, n_heads=2, n_layers=1, d_mlp=32)
    cfg = SuccessorsConfig(seeds=(0, 1), steps=3, demo=DemoConfig(model=model, pretrain_steps=3, n_lines=(200, 100)))
    methods = {"full fine-tuning": None, "LoRA": {}, "AdapterH": {"method": "adapter_h"}}
    base, out = compare_methods(cfg, methods, tmp_path, log=lambda *a: None)
    assert list(out["runs"]) == list(methods) and all(len(rows) == 2 for rows in out["runs"].values())
    for r in out["runs"]["full fine-tuning"]:
        assert r["gap_closed"] == 1.0 and r["trainable"] == count_arrays(base)
    for label in ("LoRA", "AdapterH"):
        for r in out["runs"][label]:
            assert r["start"] == out["base"]["new"]  # the adapted model at step 0 is the base, exactly
    assert {r["trainable"] for r in out["runs"]["LoRA"]} == {config_lora_params(model, cfg.lora({}))}
    assert {r["trainable"] for r in out["runs"]["AdapterH"]} == {adapter_params(2 * model.n_layers, model.d_model, 4)}
