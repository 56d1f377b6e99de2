"""Section 7 experiments: structure, determinism, budgets by independent arithmetic, the results file.

The experiments run here on a tiny model (D = 16, one layer) for two steps, so the numbers mean
nothing; what is checked holds whatever they are: equal budgets, φ in [0, 1], theorems about the
projections, the same numbers from the same seed, and that the committed results file fits the code.
"""

import json

import numpy as np
import pytest

from lora_np import ModelConfig
from lora_np.data import VOCAB
from lora_np.demo import DemoConfig
from lora_np.experiments import (
    DEFAULT_RESULTS,
    EXPECTED_KEYS,
    FORMAT_VERSION,
    Section7Config,
    amplification_table,
    budget_table,
    load_results,
    main,
    prepare,
    rank_for_budget,
    rank_sweep,
    run_all,
    save_results,
    subspace_maps,
)

TINY_MODEL = ModelConfig(vocab_size=len(VOCAB), context_length=16, d_model=16, n_heads=2, n_layers=1, d_mlp=64)
TINY = Section7Config(
    demo=DemoConfig(pretrain_steps=3, batch_size=4, model=TINY_MODEL, n_lines=(200, 200)),
    steps=2,
    batch_size=4,
    seeds=(0, 1),
    budget_rank=4,
    ranks=(1, 2, 16),
    subspace_ranks=(2, 16),
    eval_windows=4,
    random_draws=2,
)
ATTENTION_ROWS = [["W_q"], ["W_k"], ["W_v"], ["W_o"], ["W_q", "W_k"], ["W_q", "W_v"], ["W_q", "W_k", "W_v", "W_o"]]
MLP_ROWS = [["W_1"], ["W_2"], ["W_1", "W_2"]]


def adapter_count(L, D, M, ranks):
    """Adapter numbers by hand: per layer, A (r, d_in) + B (d_out, r) for each adapted weight."""
    shapes = {"W_q": (D, D), "W_k": (D, D), "W_v": (D, D), "W_o": (D, D), "W_1": (M, D), "W_2": (D, M)}
    return L * sum(r * shapes[t][1] + shapes[t][0] * r for t, r in ranks.items())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return prepare(TINY, tmp_path_factory.mktemp("cache"), log=lambda *a: None)


def quiet(*_):
    pass


# ----------------------------------------------------------------------------
# budgets


def test_rank_for_budget_against_hand_arithmetic():
    model = DemoConfig().model  # D = 64, M = 256
    budget = 8 * (64 + 64)  # one layer: r = 8 on one (64, 64) matrix
    for targets, n in ((("W_q",), 1), (("W_q", "W_v"), 2), (("W_q", "W_k", "W_v", "W_o"), 4)):
        exact, r = rank_for_budget(model, targets, 8)
        assert (exact, r) == (8 / n, 8 // n) and n * r * (64 + 64) == budget
    # W_1 is (256, 64) and W_2 (64, 256): 320 numbers a rank each, so no integer rank fits 1024
    assert rank_for_budget(model, ("W_1",), 8) == (1024 / 320, 3)  # 3.2 -> 3: 960 numbers
    assert rank_for_budget(model, ("W_2",), 8) == (1024 / 320, 3)
    assert rank_for_budget(model, ("W_1", "W_2"), 8) == (1024 / 640, 2)  # 1.6 -> 2: 1280 numbers


def test_budget_table_spends_equal_budgets(setup):
    res = budget_table(TINY, setup, {}, log=quiet)
    L, D, M = 1, 16, 64
    assert res["budget"] == adapter_count(L, D, M, {"W_q": 4}) == 128
    assert [row["targets"] for row in res["rows"]] == ATTENTION_ROWS + MLP_ROWS
    for row in res["rows"]:
        ranks = dict.fromkeys(row["targets"], row["r"])
        assert row["trainable"] == adapter_count(L, D, M, ranks), row
        assert row["budget_ratio"] == row["trainable"] / res["budget"]
        assert len(row["val_loss"]) == len(TINY.seeds) and all(np.isfinite(row["val_loss"]))
    attention = res["rows"][: len(ATTENTION_ROWS)]
    assert [row["r"] for row in attention] == [4, 4, 4, 4, 2, 2, 1]
    assert all(row["trainable"] == res["budget"] for row in attention)  # exactly equal, by construction
    # the MLP's nearest ranks: 4·32/80 = 1.6 -> 2 alone, 0.8 -> 1 together
    assert [row["r"] for row in res["rows"][len(ATTENTION_ROWS) :]] == [2, 2, 1]


def test_rank_sweep_counts(setup):
    res = rank_sweep(TINY, setup, {}, log=quiet)
    assert res["ranks"] == [1, 2, 16] and res["seed"] == 0
    assert [row["targets"] for row in res["rows"]] == [["W_q"], ["W_q", "W_v"], ["W_q", "W_k", "W_v", "W_o"]]
    for row in res["rows"]:
        want = [adapter_count(1, 16, 64, dict.fromkeys(row["targets"], r)) for r in res["ranks"]]
        assert row["trainable"] == want and len(row["val_loss"]) == 3 and all(np.isfinite(row["val_loss"]))


# ----------------------------------------------------------------------------
# subspaces and projections


def test_subspace_maps_shapes_and_range(setup):
    res = subspace_maps(TINY, setup, {}, log=quiet)
    assert (res["small_rank"], res["large_rank"], res["seeds"]) == (2, 16, [0, 1])
    grids = [np.array(res["random"])]
    assert grids[0].shape == (16, 16)
    for per_target in res["layers"]:
        assert set(per_target) == {"W_q", "W_v"}
        for maps in per_target.values():
            small_large, seed_seed = np.array(maps["small_large"]), np.array(maps["seed_seed"])
            assert small_large.shape == (2, 16) and seed_seed.shape == (16, 16)
            grids += [small_large, seed_seed]
    for g in grids:
        assert np.all(g >= 0.0) and np.all(g <= 1.0 + 1e-12)
        # r = 16 = d_in: the large adapter's top-16 directions span all of R^16, so the last
        # column contains any subspace: φ = 1 there by construction
        assert np.allclose(g[:, -1], 1.0, atol=1e-12)


def test_amplification_rows_obey_the_theorems(setup):
    res = amplification_table(TINY, setup, {}, log=quiet)
    assert res["ranks"] == [1, 2, 16]
    for per_target in res["layers"]:
        for rows in per_target.values():
            assert [row["r"] for row in rows] == [1, 2, 16]
            for row in rows:
                # Ky Fan: over r orthonormal pairs, ||UᵀWV||_F is largest for W's own top-r
                # directions, where it is sqrt(σ1² + ... + σr²) <= ||W||_F
                tol = 1e-9 * row["norm_W"]
                assert row["proj_dW"] <= row["proj_W"] + tol and row["proj_random"] <= row["proj_W"] + tol
                assert row["proj_W"] <= row["norm_W"] + tol
                assert row["factor"] == pytest.approx(row["norm_dW"] / row["proj_dW"], rel=1e-12)
            full = rows[-1]  # r = d: U, V span everything, so all three projections are ||W||_F
            for key in ("proj_dW", "proj_W", "proj_random"):
                assert full[key] == pytest.approx(full["norm_W"], rel=1e-9)


# ----------------------------------------------------------------------------
# determinism and the results file


def test_same_seed_same_numbers(setup):
    for fn in (budget_table, rank_sweep, subspace_maps, amplification_table):
        assert fn(TINY, setup, {}, log=quiet) == fn(TINY, setup, {}, log=quiet), fn.__name__
    # another seed for the first run changes the numbers (the seed is used)
    other = Section7Config(**{**vars(TINY), "seeds": (2, 3)})
    assert rank_sweep(other, setup, {}, log=quiet)["rows"] != rank_sweep(TINY, setup, {}, log=quiet)["rows"]


def test_results_file_round_trip_and_refusals(tmp_path):
    results = run_all(TINY, tmp_path / "cache", log=quiet)
    path = save_results(results, tmp_path / "r.json")
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed
    loaded = load_results(path, TINY)
    assert loaded["format_version"] == FORMAT_VERSION and loaded["config"] == TINY.to_dict()
    # 10 budget rows x 2 seeds, 3 x 3 sweep runs of which W_q,W_v r=2 and all four r=1 are budget runs,
    # and one more seed at the large rank: the memo trains each (targets, r, seed) once
    assert loaded["provenance"]["finetuning_runs"] == 10 * 2 + (3 * 3 - 2) + 1
    assert loaded["budget"]["rows"][0]["val_loss"] == pytest.approx(results["budget"]["rows"][0]["val_loss"])

    with pytest.raises(ValueError, match=r"another configuration \(differs in \['steps'\]\)"):
        load_results(path, Section7Config(**{**vars(TINY), "steps": 3}))
    stale = json.loads(path.read_text())
    stale["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="format_version"):
        load_results(tmp_path / "stale.json", TINY)
    del stale["amplification"]["layers"]
    stale["format_version"] = FORMAT_VERSION
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match=r"results\['amplification'\] lacks \['layers'\]"):
        load_results(tmp_path / "stale.json", TINY)
    with pytest.raises(ValueError, match="no results file"):
        load_results(tmp_path / "missing.json", TINY)


def test_committed_results_fit_the_code():
    cfg = Section7Config()
    res = load_results(DEFAULT_RESULTS, cfg)  # format version, configuration, every key
    for name, keys in EXPECTED_KEYS.items():
        assert keys <= set(res[name]), name
    D, L, M = 64, 2, 256
    rows = res["budget"]["rows"]
    assert [row["targets"] for row in rows] == ATTENTION_ROWS + MLP_ROWS
    assert res["budget"]["budget"] == adapter_count(L, D, M, {"W_q": 8}) == 2048
    for row in rows:
        assert row["trainable"] == adapter_count(L, D, M, dict.fromkeys(row["targets"], row["r"]))
        assert len(row["val_loss"]) == len(cfg.seeds)
    assert all(row["trainable"] == 2048 for row in rows[:7])
    assert [len(row["val_loss"]) for row in res["rank_sweep"]["rows"]] == [len(cfg.ranks)] * 3
    sub = res["subspace"]
    assert len(sub["layers"]) == L and np.array(sub["random"]).shape == (64, 64)
    for per_target in sub["layers"]:
        for maps in per_target.values():
            for key, shape in (("small_large", (8, 64)), ("seed_seed", (64, 64))):
                g = np.array(maps[key])
                assert g.shape == shape and g.min() >= 0.0 and g.max() <= 1.0
    assert [len(per_target["W_q"]) for per_target in res["amplification"]["layers"]] == [len(cfg.ranks)] * L
    assert main(["--check", "--out", str(DEFAULT_RESULTS)]) == 0


def test_bad_configurations_are_refused_before_any_work(tmp_path, capsys):
    for change, message in (
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"lr": -1.0}, "lr must be a finite number > 0, got -1.0"),
        ({"seeds": (0,)}, "seeds needs at least two seeds"),
        ({"seeds": (1, 0)}, "seeds must be a non-empty tuple of distinct, increasing ints"),
        ({"ranks": (1, 2, 128)}, "ranks must not exceed d_model = 64"),
        ({"ranks": ()}, "ranks must be a non-empty tuple"),
        ({"subspace_ranks": (8, 32)}, "subspace_ranks must be two of ranks"),
        ({"budget_rank": 6}, "budget_rank must be a multiple of 4"),
    ):
        with pytest.raises(ValueError, match=message):
            prepare(Section7Config(**change), tmp_path / "never", log=quiet)
    assert not (tmp_path / "never").exists()
    assert main(["--check", "--out", str(tmp_path / "missing.json")]) == 1
    assert "no results file" in capsys.readouterr().err
