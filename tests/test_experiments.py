"""Section 7 experiments: structure, determinism, budgets by independent arithmetic, the results file.

The experiments run here on a tiny model (D = 16, one layer) for two steps, so the numbers mean
nothing; what is checked holds whatever they are: equal budgets, φ in [0, 1], theorems about the
projections, the same numbers from the same seed, and that the committed results file fits the code.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from lora_np.analysis import subspace_similarity_grid
from lora_np.data import VOCAB, make_splits

from lora_np import LoraConfig, ModelConfig, init_lora
from lora_np.studies.experiments import (
    DEFAULT_RESULTS,
    EXPECTED_KEYS,
    FORMAT_VERSION,
    GRID_SECTIONS,
    amplification_table,
    budget_table,
    load_results,
    main,
    rank_for_budget,
    rank_sweep,
    run_all,
    subspace_maps,
    weight_maps,
)
from lora_np.studies.recipe import DemoConfig
from lora_np.studies.results import save_results
from lora_np.studies.section7 import Section7Config, init_seed, prepare

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"  # the committed results files

TINY_MODEL = ModelConfig(vocab_size=len(VOCAB), context_length=16, d_model=16, n_heads=2, n_layers=1, d_mlp=64)
TINY = Section7Config(
    demo=DemoConfig(pretrain_steps=3, batch_size=4, model=TINY_MODEL, n_lines=(200, 200)),
    base_seeds=(0, 1),
    steps=2,
    batch_size=4,
    seeds=(0, 1, 2),
    budget_rank=4,
    ranks=(1, 2, 16),
    subspace_ranks=(2, 16),
    corner=16,
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
def setups(tmp_path_factory):
    return prepare(TINY, tmp_path_factory.mktemp("cache"), log=lambda *a: None)


def quiet(*_):
    pass


# ----------------------------------------------------------------------------
# replicates and initialization


def test_bases_are_replicates_with_their_own_data_and_weights(setups):
    assert [su.seed for su in setups] == [0, 1]
    a, b = setups
    assert not np.array_equal(a.val_ids[:200], b.val_ids[:200])  # each base generates its own sentences
    assert not np.array_equal(a.base["blocks.0.W_q"], b.base["blocks.0.W_q"])
    # base 0 is the demo's own recipe: the data its seed generates
    assert np.array_equal(a.val_ids, make_splits("finetune", 200, 0)[1])


def test_adapters_of_two_ranks_start_independent_unless_they_share_a_stream():
    model = DemoConfig().model
    # the confound, with init_lora alone: one seed draws blocks.0.W_q.A first at either rank, so
    # the r = 8 start is the first 8 rows of the r = 64 start
    lora8, lora64 = (LoraConfig(r=r, alpha=4.0, targets=("W_q", "W_v")) for r in (8, 64))
    a8, a64 = init_lora(model, lora8, 5), init_lora(model, lora64, 5)
    assert np.array_equal(a8["blocks.0.W_q.A"], a64["blocks.0.W_q.A"][:8])
    # init_seed gives each (seed, rank) its own stream: no row of one start appears in the other
    s8, s64 = init_seed(5, 8), init_seed(5, 64)
    assert len({s8, s64, init_seed(6, 8), init_seed(5, 1)}) == 4
    b8, b64 = init_lora(model, lora8, s8), init_lora(model, lora64, s64)
    u8, u64 = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (b8["blocks.0.W_q.A"], b64["blocks.0.W_q.A"]))
    cos = np.abs(u8 @ u64.T)  # (8, 64)
    assert cos.max() < 0.7, cos.max()  # a shared row would give 1; independent Gaussian rows in R^64 ~0.13 ± 0.1
    assert init_seed(5, 8) == init_seed(5, 8)  # a seed, not a draw


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


def test_budget_table_spends_equal_budgets(setups):
    res = budget_table(TINY, setups, {}, log=quiet)
    L, D, M = 1, 16, 64
    assert res["budget"] == adapter_count(L, D, M, {"W_q": 4}) == 128
    assert (res["base_seeds"], res["seeds"]) == ([0, 1], [0, 1, 2]) and len(res["base_val_loss"]) == 2
    assert [row["targets"] for row in res["rows"]] == ATTENTION_ROWS + MLP_ROWS
    for row in res["rows"]:
        ranks = dict.fromkeys(row["targets"], row["r"])
        assert row["trainable"] == adapter_count(L, D, M, ranks), row
        assert row["budget_ratio"] == row["trainable"] / res["budget"]
        assert np.array(row["val_loss"]).shape == (2, 3) and np.all(np.isfinite(row["val_loss"]))
    attention = res["rows"][: len(ATTENTION_ROWS)]
    assert [row["r"] for row in attention] == [4, 4, 4, 4, 2, 2, 1]
    assert all(row["trainable"] == res["budget"] for row in attention)  # exactly equal, by construction
    # the MLP's nearest ranks: 4·32/80 = 1.6 -> 2 alone, 0.8 -> 1 together
    assert [row["r"] for row in res["rows"][len(ATTENTION_ROWS) :]] == [2, 2, 1]


def test_rank_sweep_counts(setups):
    res = rank_sweep(TINY, setups, {}, log=quiet)
    assert res["ranks"] == [1, 2, 16] and res["seeds"] == [0, 1, 2] and res["base_seeds"] == [0, 1]
    assert [row["targets"] for row in res["rows"]] == [["W_q"], ["W_q", "W_v"], ["W_q", "W_k", "W_v", "W_o"]]
    for row in res["rows"]:
        want = [adapter_count(1, 16, 64, dict.fromkeys(row["targets"], r)) for r in res["ranks"]]
        assert row["trainable"] == want
        assert np.array(row["val_loss"]).shape == (2, 3, 3) and np.all(np.isfinite(row["val_loss"]))


# ----------------------------------------------------------------------------
# subspaces and projections


def test_subspace_maps_shapes_range_and_baselines(setups):
    res = subspace_maps(TINY, setups, {}, log=quiet)
    assert (res["small_rank"], res["large_rank"], res["corner"]) == (2, 16, 16)
    assert res["pairs"] == [[0, 1], [0, 2], [1, 2]]
    grids = [np.array(res["random"])]
    assert grids[0].shape == (16, 16)
    for per_target in res["layers"]:
        assert set(per_target) == {"W_q", "W_v"}
        for maps in per_target.values():
            assert np.array(maps["small_large"]).shape == np.array(maps["shared"]).shape == (2, 3, 2, 16)
            assert np.array(maps["init"]).shape == np.array(maps["shared_init"]).shape == (3, 2, 16)
            assert np.array(maps["seed_seed"]).shape == (2, 3, 16, 16)
            for key in ("small_large", "shared", "seed_seed"):
                grids += [np.array(g) for per_base in maps[key] for g in per_base]
            grids += [np.array(g) for g in maps["init"] + maps["shared_init"]]
    for g in grids:
        assert np.all(g >= 0.0) and np.all(g <= 1.0 + 1e-12)
        # r = 16 = d_in: the large adapter's top-16 directions span all of R^16, so the last
        # column contains any subspace: φ = 1 there by construction
        assert np.allclose(g[:, -1], 1.0, atol=1e-12)
    # the baselines, recomputed from init_lora: "init" from each rank's own stream, "shared_init"
    # from the large rank's, whose first rows the small start then is
    model = TINY.demo.model
    for k, s in enumerate(TINY.seeds):
        lora2, lora16 = (LoraConfig(r=r, alpha=TINY.alpha, targets=("W_q", "W_v")) for r in (2, 16))
        a2, a16 = init_lora(model, lora2, init_seed(s, 2)), init_lora(model, lora16, init_seed(s, 16))
        shared = init_lora(model, lora2, init_seed(s, 16))
        # init_lora draws blocks.0.W_q.A first, so only its small start is the large one's first rows
        assert np.array_equal(shared["blocks.0.W_q.A"], a16["blocks.0.W_q.A"][:2])
        assert not np.array_equal(shared["blocks.0.W_v.A"], a16["blocks.0.W_v.A"][:2])
        for t in ("W_q", "W_v"):
            name = f"blocks.0.{t}.A"
            for key, A in (("init", a2[name]), ("shared_init", shared[name])):
                want = subspace_similarity_grid(A.astype(np.float32), a16[name].astype(np.float32))
                assert np.allclose(res["layers"][0][t][key][k], want, atol=1e-6), (key, s, t)


def test_weight_maps_shapes_and_range(setups):
    res = weight_maps(TINY, setups, {}, log=quiet)
    assert (res["target"], res["ranks"], res["j_max"]) == ("W_q", [2, 16], 2)
    for per_layer in res["layers"]:
        assert np.array(per_layer["dW"]).shape == (2, 3, 2, 16, 2)  # base, seed, rank, i, j
        assert np.array(per_layer["random"]).shape == (2, 16, 2)
        for g in [np.array(per_layer["random"]), np.array(per_layer["dW"])]:
            assert np.all(g >= 0.0) and np.all(g <= 1.0 + 1e-12)
            assert np.allclose(g[..., -1, :], 1.0, atol=1e-12)  # i = 16 = D: all of W's directions contain anything


def test_amplification_rows_obey_the_theorems(setups):
    res = amplification_table(TINY, setups, {}, log=quiet)
    assert res["ranks"] == [1, 2, 16]
    assert [len(per_base) for per_base in res["runs"]] == [3, 3]
    for run in (run for per_base in res["runs"] for run in per_base):
        for per_target in run["layers"]:
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


def test_same_seed_same_numbers(setups):
    for fn in (budget_table, rank_sweep, subspace_maps, amplification_table, weight_maps):
        assert fn(TINY, setups, {}, log=quiet) == fn(TINY, setups, {}, log=quiet), fn.__name__
    # another seed changes the numbers (the seed is used), and so does another base
    other = Section7Config(**{**vars(TINY), "seeds": (3, 4, 5)})
    sweep = rank_sweep(TINY, setups, {}, log=quiet)
    assert rank_sweep(other, setups, {}, log=quiet)["rows"] != sweep["rows"]
    assert sweep["base_val_loss"][0] != sweep["base_val_loss"][1]


def test_results_file_round_trip_and_refusals(tmp_path):
    results = run_all(TINY, tmp_path / "cache", log=quiet)
    path = save_results(results, tmp_path / "r.json", grid_sections=GRID_SECTIONS)
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed
    loaded = load_results(path, TINY)
    assert loaded["format_version"] == FORMAT_VERSION and loaded["config"] == TINY.to_dict()
    # a base: 10 budget rows x 3 seeds, 3 x 3 sweep runs a seed of which W_q,W_v r=2 and all four
    # r=1 are budget runs, and the shared-start control at the small rank a seed; the memo trains
    # each (base, targets, r, seed, A's seed) once
    assert loaded["provenance"]["finetuning_runs"] == 2 * (10 * 3 + (3 * 3 - 2) * 3 + 3)
    assert len(loaded["provenance"]["base_fingerprints"]) == 2
    # losses keep 6 digits, φ grids 4
    got, want = loaded["budget"]["rows"][0]["val_loss"], results["budget"]["rows"][0]["val_loss"]
    assert np.allclose(got, want, rtol=1e-5, atol=0) and got != want  # rounded, to 6 significant digits
    got, want = loaded["subspace"]["layers"][0]["W_q"]["init"][0], results["subspace"]["layers"][0]["W_q"]["init"][0]
    assert np.allclose(got, want, rtol=0, atol=5e-5) and not np.allclose(got, want, rtol=0, atol=1e-6)  # to 4

    with pytest.raises(ValueError, match=r"another configuration \(differs in \['steps'\]\)"):
        load_results(path, Section7Config(**{**vars(TINY), "steps": 3}))
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['base_seeds', 'pretrain'\]\)"):
        load_results(path, Section7Config(**{**vars(TINY), "base_seeds": (0, 2)}))
    stale = json.loads(path.read_text())
    stale["format_version"] = FORMAT_VERSION - 1  # the format before replicate bases
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="format_version"):
        load_results(tmp_path / "stale.json", TINY)
    del stale["weight_similarity"]["layers"]
    stale["format_version"] = FORMAT_VERSION
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match=r"results\['weight_similarity'\] lacks \['layers'\]"):
        load_results(tmp_path / "stale.json", TINY)
    with pytest.raises(ValueError, match="no results file"):
        load_results(tmp_path / "missing.json", TINY)


def test_committed_results_fit_the_code():
    cfg = Section7Config()
    res = load_results(NOTEBOOKS / DEFAULT_RESULTS.name, cfg)  # format version, configuration, every key
    for name, keys in EXPECTED_KEYS.items():
        assert keys <= set(res[name]), name
    D, L, M = 64, 2, 256
    n_bases, n_seeds = len(cfg.base_seeds), len(cfg.seeds)
    assert n_bases >= 3 and n_seeds >= 3
    rows = res["budget"]["rows"]
    assert [row["targets"] for row in rows] == ATTENTION_ROWS + MLP_ROWS
    assert res["budget"]["budget"] == adapter_count(L, D, M, {"W_q": 8}) == 2048
    for row in rows:
        assert row["trainable"] == adapter_count(L, D, M, dict.fromkeys(row["targets"], row["r"]))
        assert np.array(row["val_loss"]).shape == (n_bases, n_seeds)
    assert all(row["trainable"] == 2048 for row in rows[:7])
    for row in res["rank_sweep"]["rows"]:
        assert np.array(row["val_loss"]).shape == (n_bases, n_seeds, len(cfg.ranks))
    sub = res["subspace"]
    assert len(sub["layers"]) == L and np.array(sub["random"]).shape == (16, 16)
    for per_target in sub["layers"]:
        for maps in per_target.values():
            for key, shape in (("small_large", (n_bases, n_seeds, 8, 16)), ("shared", (n_bases, n_seeds, 8, 16)),
                               ("init", (n_seeds, 8, 16)), ("shared_init", (n_seeds, 8, 16)),
                               ("seed_seed", (n_bases, 3, 16, 16))):  # fmt: skip
                g = np.array(maps[key])
                assert g.shape == shape and g.min() >= 0.0 and g.max() <= 1.0, key
    for per_layer in res["weight_similarity"]["layers"]:
        assert np.array(per_layer["dW"]).shape == (n_bases, n_seeds, 2, D, 8)
    assert np.array(res["amplification"]["runs"]).shape == (n_bases, n_seeds)
    assert main(["--check", "--out", str(NOTEBOOKS / DEFAULT_RESULTS.name)]) == 0


def test_bad_configurations_are_refused_before_any_work(tmp_path, capsys):
    for change, message in (
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"lr": -1.0}, "lr must be a finite number > 0, got -1.0"),
        ({"seeds": (0,)}, "seeds needs at least two seeds"),
        ({"seeds": (1, 0)}, "seeds must be a non-empty tuple of distinct, increasing ints"),
        ({"base_seeds": ()}, "base_seeds must be a non-empty tuple"),
        ({"base_seeds": (1, 2)}, r"demo.seed must be base_seeds\[0\]"),
        ({"ranks": (1, 2, 128)}, "ranks must not exceed d_model = 64"),
        ({"ranks": ()}, "ranks must be a non-empty tuple"),
        ({"subspace_ranks": (8, 32)}, "subspace_ranks must be two of ranks"),
        ({"corner": 4}, r"corner must lie between the two subspace_ranks \(8, 64\), got 4"),
        ({"budget_rank": 6}, "budget_rank must be a multiple of 4"),
    ):
        with pytest.raises(ValueError, match=message):
            prepare(Section7Config(**change), tmp_path / "never", log=quiet)
    assert not (tmp_path / "never").exists()
    assert main(["--check", "--out", str(tmp_path / "missing.json")]) == 1
    assert "no results file" in capsys.readouterr().err
