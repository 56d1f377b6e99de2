"""Section 4.1's "generalization of full fine-tuning": the exact part (any ΔW is s·B·A at full rank)
against matrices whose singular values we chose, and the study's plumbing on a tiny config.

The training study runs here on a tiny model (D = 16, one layer) for two steps, so its numbers
mean nothing; what is checked holds whatever they are: which names train, the lr chosen on dev,
the run shared by the paper's and rsLoRA's scaling when they coincide, determinism, and that the
committed results file fits the code.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_np.config import LORA_TARGETS, LoraConfig
from lora_np.data import VOCAB
from lora_np.model import model_forward
from lora_np.params import Params, init_params

from lora_np import ModelConfig
from lora_np.studies.fullrank import (
    DEFAULT_RESULTS,
    FullRankConfig,
    adapters_from_delta,
    full_ranks,
    load_results,
    lora_span_names,
    prepare,
    run_all,
    split_validation,
    svd_factors,
)
from lora_np.studies.recipe import DemoConfig
from lora_np.studies.results import save_results

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"  # the committed results files

TINY_MODEL = ModelConfig(vocab_size=len(VOCAB), context_length=16, d_model=16, n_heads=2, n_layers=1, d_mlp=64)
TINY = FullRankConfig(
    demo=DemoConfig(pretrain_steps=3, batch_size=4, model=TINY_MODEL, n_lines=(200, 200)),
    steps=2, batch_size=4, ranks=(1, 4, 16), lrs=(1e-2, 3e-2), full_lrs=(1e-3,), paper_ranks=(1, 4, 16),
    alpha=2.0, paper_alpha=4.0, paper_lr=1e-2, eval_windows=4,
)  # fmt: skip


def quiet(*_):
    pass


# ----------------------------------------------------------------------------
# 1. expressiveness


@settings(max_examples=40, deadline=None)
@given(d_out=st.integers(1, 24), d_in=st.integers(1, 24), s=st.floats(0.01, 100.0), seed=st.integers(0, 10_000))
def test_any_delta_is_reachable_at_full_rank(d_out, d_in, s, seed):
    delta = np.random.default_rng(seed).standard_normal((d_out, d_in))
    A, B = svd_factors(delta, s)
    r = min(d_out, d_in)
    assert A.shape == (r, d_in) and B.shape == (d_out, r)
    err = np.linalg.norm(s * B @ A - delta) / np.linalg.norm(delta)
    assert err < 1e-13 * max(d_out, d_in), f"s·B·A misses ΔW {delta.shape} by {err:.2e} (relative, Frobenius)"


@settings(max_examples=30, deadline=None)
@given(d_out=st.integers(2, 20), d_in=st.integers(2, 20), seed=st.integers(0, 10_000), data=st.data())
def test_lower_rank_keeps_exactly_the_top_singular_values(d_out, d_in, seed, data):
    # ΔW = U·diag(σ)·Vᵀ built from singular values WE chose: the rank-r error must be the tail
    # sqrt(Σ_{i>r} σ_i²) (Eckart-Young), computed here without any SVD
    rng = np.random.default_rng(seed)
    k = min(d_out, d_in)
    U = np.linalg.qr(rng.standard_normal((d_out, k)))[0]  # (d_out, k), orthonormal columns
    V = np.linalg.qr(rng.standard_normal((d_in, k)))[0]  # (d_in, k)
    sigma = np.sort(rng.uniform(0.5, 3.0, size=k))[::-1] * (1.0 + np.arange(k)[::-1])  # distinct, decreasing
    delta = (U * sigma) @ V.T
    r = data.draw(st.integers(1, k))
    A, B = svd_factors(delta, 0.5, r)
    err = np.linalg.norm(delta - 0.5 * B @ A)
    tail = np.sqrt(np.sum(sigma[r:] ** 2))
    assert abs(err - tail) < 1e-10 * sigma[0], f"rank {r}: error {err} against the tail {tail}"
    assert np.linalg.matrix_rank(B @ A) == r


def test_svd_factors_errors():
    with pytest.raises(ValueError, match=r"r must be an int in \[1, min\(d_out, d_in\)\] = \[1, 3\] .* got 4"):
        svd_factors(np.ones((3, 5)), 1.0, 4)
    with pytest.raises(ValueError, match="scaling must be a finite number > 0, got 0"):
        svd_factors(np.ones((3, 5)), 0)
    with pytest.raises(ValueError, match="delta must be a 2-D float array"):
        svd_factors(np.ones(5), 1.0)
    with pytest.raises(ValueError, match="delta must be finite"):
        svd_factors(np.full((2, 2), np.nan), 1.0)


def test_full_rank_of_each_target_by_hand():
    assert full_ranks(DemoConfig().model) == {t: 64 for t in LORA_TARGETS}  # M = 256 >= D = 64
    narrow = ModelConfig(vocab_size=30, context_length=8, d_model=16, n_heads=2, n_layers=1, d_mlp=8)
    assert full_ranks(narrow) == {"W_q": 16, "W_k": 16, "W_v": 16, "W_o": 16, "W_1": 8, "W_2": 8}


def test_span_names_by_hand():
    params = init_params(TINY_MODEL, 0)
    b = "blocks.0."
    want = [b + n for n in ("ln1.beta", "W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o", "ln2.beta", "W_1",
                            "b_1", "W_2", "b_2")] + ["ln_f.beta"]  # fmt: skip
    assert sorted(lora_span_names(params)) == sorted(want)
    # what full fine-tuning trains beyond it: the lookups, the head and the LayerNorm gains
    rest = sorted(set(params) - set(want))
    assert rest == sorted(["W_e", "W_p", "W_u", b + "ln1.gamma", b + "ln2.gamma", "ln_f.gamma"])


def test_full_rank_lora_reproduces_any_change_of_the_span():
    # change every span weight and bias of a model at random; LoRA at r = D on the base, with those
    # biases, must give the changed model's logits (float64)
    cfg = ModelConfig(vocab_size=len(VOCAB), context_length=8, d_model=16, n_heads=2, n_layers=2, d_mlp=32)
    base = init_params(cfg, 0)
    rng = np.random.default_rng(1)
    span = set(lora_span_names(base))
    tuned = Params(cfg, {k: v + 0.3 * rng.standard_normal(v.shape) if k in span else v for k, v in base.items()})
    lora = LoraConfig(r=16, alpha=2.0, targets=LORA_TARGETS, rslora=True)
    adapters = adapters_from_delta(base, tuned, lora)
    vectors = {k for k in span if k.rsplit(".", 1)[-1] not in LORA_TARGETS}
    hybrid = Params(cfg, {k: tuned[k] if k in vectors else base[k] for k in base})
    x = rng.integers(0, cfg.vocab_size, size=(3, 8))
    got, want = model_forward(hybrid, x, adapters, lora)[0], model_forward(tuned, x)[0]
    assert np.abs(got - want).max() < 1e-11 * np.abs(want).max()
    # one rank short of full, the same change is NOT reachable
    low = LoraConfig(r=15, alpha=2.0, targets=LORA_TARGETS, rslora=True)
    assert np.abs(model_forward(hybrid, x, adapters_from_delta(base, tuned, low), low)[0] - want).max() > 1e-6


def test_split_validation_keeps_lines_whole():
    ids = np.array([5, 6, 0, 7, 0, 8, 9, 9, 0, 4, 0])
    dev, test = split_validation(ids)
    np.testing.assert_array_equal(np.concatenate([dev, test]), ids)
    assert dev[-1] == 0 and test[-1] == 0 and abs(dev.size - ids.size // 2) <= 3
    with pytest.raises(ValueError, match="at least two lines"):
        split_validation(np.array([1, 2, 0]))


def test_config_validation():
    with pytest.raises(ValueError, match=r"ranks must not exceed the full rank min\(d_out, d_in\) = 64"):
        FullRankConfig(ranks=(1, 128)).validate()
    with pytest.raises(ValueError, match="lrs must be a non-empty tuple of distinct, increasing numbers"):
        FullRankConfig(lrs=(1e-2, 1e-3)).validate()


# ----------------------------------------------------------------------------
# 2. the study on a tiny config


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    setup = prepare(TINY, tmp_path_factory.mktemp("cache"), log=quiet)
    before = {k: v.copy() for k, v in setup.base.items()}
    res = run_all(TINY, log=quiet, setup=setup)
    assert all(np.array_equal(setup.base[k], before[k]) for k in before)  # no run trained the base itself
    return setup, res


def test_run_all_structure_and_selection(tiny_results):
    setup, res = tiny_results
    assert [row["r"] for row in res["lora"]] == [1, 4, 16]
    D, M, L = 16, 64, 1
    for row in res["lora"]:
        assert [x["lr"] for x in row["grid"]] == [1e-2, 3e-2]
        assert row["best"] == min(row["grid"], key=lambda x: x["dev"])  # chosen on dev, not on test
        r = row["r"]
        # adapters r·(d_in + d_out) per weight, plus the biases and β: by hand
        vectors = L * (4 * D + M + D + 2 * D) + D
        assert row["best"]["trainable"] == L * r * (4 * 2 * D + 2 * (D + M)) + vectors
        assert row["best"]["scaling"] == pytest.approx(2.0 / np.sqrt(r))
    assert res["full"]["best"]["trainable"] == sum(v.size for v in setup.base.values())
    assert res["span"]["best"]["trainable"] == L * (4 * D * D + 2 * D * M) + L * (4 * D + M + D + 2 * D) + D


def test_paper_scaling_shares_the_run_where_it_coincides(tiny_results):
    _, res = tiny_results
    paper = {x["r"]: x for x in res["paper"]}
    # r = 4: 4/4 = 2/√4 = 1 and the same lr: the very run of the rsLoRA grid
    assert paper[4]["reused"] and paper[4]["scaling"] == 1.0
    same = next(x for x in res["lora"][1]["grid"] if x["lr"] == TINY.paper_lr)
    assert (paper[4]["dev"], paper[4]["test"]) == (same["dev"], same["test"])
    assert not paper[1]["reused"] and paper[1]["scaling"] == 4.0 and paper[16]["scaling"] == 0.25


def test_truncation_at_full_rank_is_the_tuned_model(tiny_results):
    _, res = tiny_results
    tr = res["truncation"]
    assert tr["ranks"] == [1, 4, 16] and len(tr["test"]) == 3
    assert tr["max_abs_logit_diff"] < 1e-4  # float32 round-off
    assert tr["test"][-1] == pytest.approx(res["span"]["best"]["test"], abs=1e-5)
    for sv in tr["singular_values"].values():
        assert len(sv) == 16 and sv == sorted(sv, reverse=True)


def drop_timings(x):
    if isinstance(x, dict):
        return {k: drop_timings(v) for k, v in x.items() if k not in ("seconds", "provenance")}
    if isinstance(x, list):
        return [drop_timings(v) for v in x]
    return x


def test_same_seed_same_numbers(tiny_results):
    setup, res = tiny_results
    again = run_all(TINY, log=quiet, setup=setup)
    assert drop_timings(again) == drop_timings(res)


def test_results_file_round_trip(tiny_results, tmp_path):
    _, res = tiny_results
    path = save_results(res, tmp_path / "r.json")
    assert load_results(path, TINY)["lora"][0]["r"] == 1
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['steps'\]\)"):
        load_results(path, FullRankConfig(**{**vars(TINY), "steps": 3}))
    data = json.loads(path.read_text())
    del data["truncation"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"lacks \['truncation'\]"):
        load_results(path, TINY)


def test_committed_results_fit_the_code():
    res = load_results(NOTEBOOKS / DEFAULT_RESULTS.name)  # raises, naming the command, if the file is stale
    assert res["provenance"]["command"].endswith("python -m lora_np.fullrank")
