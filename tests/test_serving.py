"""Multi-adapter serving: each row of a batch with its own adapter, unmerged.

The reference is independent of lora_np.methods.serving: each row run alone through
lora_np.model.model_forward with its own adapter set and LoraConfig, and each task's merged model
(lora_np.lora.merge). Both strategies must agree with it, in float64 to round-off, over random
shapes, ranks, scalings and row assignments.
"""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_np.config import LoraConfig
from lora_np.data import VOCAB
from lora_np.lora import init_lora, merge
from lora_np.model import model_forward
from lora_np.params import cast, init_params

from lora_np import ModelConfig
from lora_np.methods.serving import STRATEGIES, adapter_bank, merged_forward, multi_lora_forward, multi_lora_linear
from lora_np.studies.serving_study import bench_serving, serving_table

CFG = ModelConfig(vocab_size=len(VOCAB), context_length=8, d_model=16, n_heads=2, n_layers=2, d_mlp=32)


def trained_like(cfg, lora, seed, scale=0.3):
    """Adapters with B drawn at random (not 0): B = 0 would make every adapter the base model."""
    ad = init_lora(cfg, lora, seed)
    rng = np.random.default_rng(seed + 1000)
    for k in ad:
        if k.endswith(".B"):
            ad[k] = rng.normal(0.0, scale, size=ad[k].shape)
    return ad


def per_row_reference(params, tokens, sets, loras, index):
    """Row i alone through model_forward with adapter set index[i]: no batching, no bank."""
    return np.concatenate([model_forward(params, tokens[i : i + 1], sets[k], loras[k])[0]
                           for i, k in enumerate(index)])  # fmt: skip


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 6),
    T=st.integers(1, 8),
    ranks=st.lists(st.integers(1, 16), min_size=1, max_size=4),
    alphas=st.lists(st.floats(0.5, 16.0), min_size=4, max_size=4),
    rslora=st.booleans(),
    targets=st.sets(st.sampled_from(("W_q", "W_k", "W_v", "W_o", "W_1", "W_2")), min_size=1).map(sorted),
)
def test_each_row_gets_its_own_adapter(seed, batch, T, ranks, alphas, rslora, targets):
    params = init_params(CFG, seed)  # float64
    loras = [LoraConfig(r=r, alpha=alphas[k], targets=tuple(targets), rslora=rslora) for k, r in enumerate(ranks)]
    sets = [trained_like(CFG, lora, seed + k) for k, lora in enumerate(loras)]
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, size=(batch, T))
    index = rng.integers(0, len(sets), size=batch)
    ref = per_row_reference(params, tokens, sets, loras, index)
    bank = adapter_bank(params, sets, loras)
    for strategy in STRATEGIES:
        got = multi_lora_forward(params, tokens, bank, index, strategy)
        assert got.shape == (batch, T, CFG.vocab_size) and got.dtype == np.float64
        err = rel_err(got, ref)
        assert err < 1e-12, f"{strategy}: logits off by {err:.2e} relative to the per-row reference"
    # and against what a merged deployment computes: one merged model per task, each on its rows
    merged = [merge(params, a, lora) for a, lora in zip(sets, loras, strict=True)]
    assert rel_err(merged_forward(merged, tokens, index), ref) < 1e-12


def test_rows_really_differ_by_adapter():
    # guards against a forward that ignores index: the same tokens in two rows with two adapters
    # must give different logits, and the same adapter the same logits
    params = init_params(CFG, 0)
    lora = LoraConfig(r=4, alpha=4.0, targets=("W_q", "W_v"))
    sets = [trained_like(CFG, lora, 1), trained_like(CFG, lora, 2)]
    tokens = np.tile(np.arange(CFG.context_length) % CFG.vocab_size, (3, 1))  # (3, T), identical rows
    bank = adapter_bank(params, sets, lora)
    for strategy in STRATEGIES:
        out = multi_lora_forward(params, tokens, bank, np.array([0, 1, 0]), strategy)
        assert np.abs(out[0] - out[1]).max() > 1e-3
        np.testing.assert_array_equal(out[0], out[2])
        assert np.abs(out[0] - model_forward(params, tokens[:1])[0][0]).max() > 1e-3  # not the base model


def test_without_a_bank_it_is_the_plain_model():
    # the cache-free forward that times the base and the merged models must be model_forward's model
    params = init_params(CFG, 4)
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, size=(3, CFG.context_length))
    assert rel_err(multi_lora_forward(params, tokens, None, None), model_forward(params, tokens)[0]) < 1e-13
    with pytest.raises(ValueError, match="index was given without a bank"):
        multi_lora_forward(params, tokens, None, np.array([0, 0, 0]))


def test_zero_padding_to_the_largest_rank_adds_nothing():
    params = init_params(CFG, 3)
    small, big = LoraConfig(r=2, alpha=2.0, targets=("W_1",)), LoraConfig(r=16, alpha=16.0, targets=("W_1",))
    sets = [trained_like(CFG, small, 4), trained_like(CFG, big, 5)]
    bank = adapter_bank(params, sets, [small, big])
    A = bank["A"]["blocks.0.W_1"]  # (K, 16, d_in)
    assert A.shape == (2, 16, CFG.d_model) and not A[0, 2:].any() and not bank["B"]["blocks.0.W_1"][0, :, 2:].any()
    np.testing.assert_array_equal(A[0, :2], sets[0]["blocks.0.W_1.A"])
    assert bank["ranks"] == [2, 16] and list(bank["scalings"]) == [1.0, 1.0]


def test_one_linear_layer_against_the_formula():
    # h_i = W0·x_i + b + s_k·B_k·A_k·x_i written out row by row and position by position
    rng = np.random.default_rng(7)
    K, r, d_in, d_out, Bsz, T = 3, 4, 5, 6, 4, 2
    x = rng.standard_normal((Bsz, T, d_in))
    W, b = rng.standard_normal((d_out, d_in)), rng.standard_normal(d_out)
    A, B = rng.standard_normal((K, r, d_in)), rng.standard_normal((K, d_out, r))
    s, index = np.array([0.5, 2.0, 1.5]), np.array([2, 0, 2, 1])
    want = np.array([[W @ x[i, t] + b + s[index[i]] * B[index[i]] @ (A[index[i]] @ x[i, t]) for t in range(T)]
                     for i in range(Bsz)])  # fmt: skip
    for strategy in STRATEGIES:
        np.testing.assert_allclose(multi_lora_linear(x, W, b, A, B, s, index, strategy=strategy), want, rtol=1e-13)


def test_float32_stays_float32_and_matches_the_merged_model():
    params = cast(init_params(CFG, 1), np.float32)
    lora = LoraConfig(r=4, alpha=8.0, targets=("W_q", "W_v"))
    sets = [cast(trained_like(CFG, lora, k, scale=0.05), np.float32) for k in range(3)]
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(5, CFG.context_length))
    index = np.array([0, 1, 2, 1, 0])
    ref = merged_forward([merge(params, a, lora) for a in sets], tokens, index)
    for strategy in STRATEGIES:
        got = multi_lora_forward(params, tokens, adapter_bank(params, sets, lora), index, strategy)
        assert got.dtype == np.float32
        assert rel_err(got, ref) < 50 * np.finfo(np.float32).eps  # merging rounds W0 + s·B·A: a few eps


# ----------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def served():
    params = init_params(CFG, 0)
    lora = LoraConfig(r=2, alpha=2.0, targets=("W_q", "W_v"))
    return params, lora, [trained_like(CFG, lora, k) for k in range(2)]


def test_index_errors_name_the_argument_and_the_range(served):
    params, lora, sets = served
    bank = adapter_bank(params, sets, lora)
    tokens = np.zeros((3, 4), dtype=np.int64)
    with pytest.raises(ValueError, match=r"index holds adapter 2; the bank has K=2 adapters.*\[0, 2\)"):
        multi_lora_forward(params, tokens, bank, np.array([0, 2, 1]))
    with pytest.raises(ValueError, match=r"index holds adapter -1"):
        multi_lora_forward(params, tokens, bank, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"index must have shape \(3,\)"):
        multi_lora_forward(params, tokens, bank, np.array([0, 1]))
    with pytest.raises(TypeError, match="index must be a numpy integer array"):
        multi_lora_forward(params, tokens, bank, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="index must be a numpy integer array"):
        multi_lora_forward(params, tokens, bank, [0, 1, 1])
    with pytest.raises(ValueError, match="strategy must be one of"):
        multi_lora_forward(params, tokens, bank, np.array([0, 1, 1]), strategy="loop")
    with pytest.raises(ValueError, match="tokens contains id"):
        multi_lora_forward(params, tokens + CFG.vocab_size, bank, np.array([0, 1, 1]))


def test_mismatched_adapter_sets_are_refused(served):
    params, lora, sets = served
    other = LoraConfig(r=2, alpha=2.0, targets=("W_q", "W_k"))
    with pytest.raises(ValueError, match=r"same weights: loras\[0\] has targets \('W_q', 'W_v'\), loras\[1\] has"):
        adapter_bank(params, [sets[0], trained_like(CFG, other, 3)], [lora, other])
    with pytest.raises(ValueError, match=r"adapter_sets\[1\]: adapter blocks.0.W_q.A must have shape"):
        adapter_bank(params, sets, [lora, LoraConfig(r=3, alpha=2.0, targets=("W_q", "W_v"))])
    with pytest.raises(ValueError, match=r"loras must be one LoraConfig or a list of 2, .* got 3 configs"):
        adapter_bank(params, sets, [lora] * 3)
    with pytest.raises(ValueError, match=r"loras\[0\] must be plain LoRA .* init='pissa'"):
        adapter_bank(params, sets, LoraConfig(r=2, alpha=2.0, targets=("W_q", "W_v"), init="pissa"))
    with pytest.raises(ValueError, match=r"adapter_sets must be a non-empty list"):
        adapter_bank(params, [], lora)
    with pytest.raises(ValueError, match=r"adapter_sets\[0\]: adapter .* has dtype float32"):
        adapter_bank(params, [cast(sets[0], np.float32)], lora)
    small = ModelConfig(vocab_size=len(VOCAB), context_length=8, d_model=8, n_heads=2, n_layers=2, d_mlp=32)
    bank = adapter_bank(params, sets, lora)
    with pytest.raises(ValueError, match="bank was built for"):
        multi_lora_forward(init_params(small, 0), np.zeros((2, 4), dtype=np.int64), bank, np.array([0, 1]))


def test_merged_forward_refuses_mixed_models(served):
    params, lora, sets = served
    small = ModelConfig(vocab_size=len(VOCAB), context_length=8, d_model=8, n_heads=2, n_layers=2, d_mlp=32)
    with pytest.raises(ValueError, match="one ModelConfig"):
        merged_forward([params, init_params(small, 0)], np.zeros((2, 4), dtype=np.int64), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"index holds adapter 1; the bank has K=1"):
        merged_forward([params], np.zeros((2, 4), dtype=np.int64), np.array([0, 1]))


# ----------------------------------------------------------------------------
# the cost measurement: structure only (timings are never asserted)


def test_bench_serving_quick_structure():
    res = bench_serving(quick=True, log=lambda *a: None)
    assert set(res) == {"meta", "sizes"} and res["meta"]["quick"] is True and res["meta"]["reps"] == 1
    (size,) = res["sizes"]
    assert size["name"] == "q32" and [row["tasks"] for row in size["rows"]] == [1, 2]
    for row in size["rows"]:
        for way in ("base", "merged", "group", "gather", "merge_one"):
            assert row[way]["median_s"] > 0 and row[way]["cpu_median_s"] >= 0
        # the three ways compute the same logits (float32): the timing compares like with like
        assert max(row["max_abs_diff"].values()) < 1e-4
    # bytes by hand: r = 8 on W_q, W_v of a D = 32, L = 2 model, float32
    D, L, r = 32, 2, 8
    assert size["bytes"]["adapter"] == L * 2 * (r * D + D * r) * 4
    assert size["bytes"]["merged_copy"] == L * 2 * D * D * 4
    text = serving_table(res)
    assert "q32" in text and "merged/base" in text
    with pytest.raises(ValueError, match="sizes must be a non-empty list of names"):
        bench_serving(sizes=("nope",))
    with pytest.raises(ValueError, match="reps must be an int >= 1"):
        bench_serving(sizes=("q32",), reps=0)


def test_command_quick_writes_only_where_told(tmp_path, capsys):
    from lora_np.studies.serving_study import DEFAULT_OUT, main

    before = DEFAULT_OUT.stat().st_mtime_ns if DEFAULT_OUT.exists() else None
    assert main(["--quick"]) == 0  # a smoke test: prints, and leaves the notebook's results file alone
    assert (DEFAULT_OUT.stat().st_mtime_ns if DEFAULT_OUT.exists() else None) == before
    out = tmp_path / "s.json"
    assert main(["--quick", "--out", str(out)]) == 0
    assert [row["tasks"] for row in json.loads(out.read_text())["sizes"][0]["rows"]] == [1, 2]
    assert "merged/base" in capsys.readouterr().out
