"""Section 7 of the paper in miniature: which weights, what rank, and how ΔW relates to W.

The paper asks three questions of LoRA on GPT-3 175B; we ask them of the demo's tiny GPT, on
its fine-tuning domain (Yoda word order), with bases pretrained by the demo's recipe:

1. budget_table (Table 5, Section 7.1): one fixed number of trainable parameters, spent as
   r = 8 on one of W_q, W_k, W_v, W_o, r = 4 on two, r = 2 on all four; and, since our model's
   MLP is as easy to adapt, on W_1, W_2 at the integer rank whose count is nearest the budget.
2. rank_sweep (Table 6, Section 7.2): r = 1, 2, 4, 8, 64 for W_q; W_q, W_v; and all four.
3. subspace_maps (Figures 3 and 4, Section 7.2): φ(A_{r=8}, A_{r=64}, i, j) for every seed, the
   same map at initialization (the baseline), and φ(A_{r=64}, A'_{r=64}, i, j) for every pair of
   seeds, against two random Gaussian matrices.
4. amplification_table (Table 7, Section 7.3): ||U_rᵀ W V_r||_F for the top-r directions of
   ΔW, of W itself and of a random matrix; ||W||_F, ||ΔW||_F and their ratio.
5. weight_maps (Figure 8, Appendix H.3): φ between the top-i singular directions of W_q and the
   top-j of ΔW_q, and of a random matrix.

Two kinds of seed, so that two kinds of spread can be reported:
- base_seeds: full replicates. Base b is the demo's recipe run with seed b: its own sentences
  (both domains), its own initialization and its own pretraining batches. Fine-tuned losses differ
  more between bases than between seeds on one base, and the same seed on another machine is
  another base too (float32 sums in another order grow into a different model over 800 steps), so
  the spread over bases is the error bar a reader elsewhere should expect.
- seeds: fine-tuning seeds on each base. A seed orders the batches, so runs with one seed on one
  base see the same batches whatever they adapt: a paired comparison. A is drawn from its own
  stream for each (seed, rank), init_seed, so adapters of different rank start independent
  (with one stream, the first weight's A_{r=8}, blocks.0.W_q's, would start as the first 8 rows of
  its A_{r=64}, and Figure 3 would measure that shared start as much as anything learned).

Every function is seeded and returns plain numbers (dicts of floats and lists). Fine-tuning runs
are shared through a `memo` dict, so `run_all` trains each run once. The measurements themselves
live in lora_np.analysis; this module only trains and collects.

The whole study takes about half an hour on one core, too long for a notebook, so its results are
kept in notebooks/section7_results.json, rewritten by ONE command, run in notebooks/ (the file
goes to the current folder, or to --out):

    cd notebooks && python -m lora_np experiments

The file records the configuration; `load_results` refuses a file whose configuration or format
is not the code's, so a stale file cannot pass for fresh results.

Dimension legend: L layers, D model width, M MLP width, r rank, d_in / d_out a weight's input /
output width; i, j how many top singular directions.

References
- Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685v2,
  Section 7, Tables 5-7, Figures 3-4, Appendix G and H (H.3: Figure 8).
"""

import math
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from ..core.lora import delta_weight
from ..training.analysis import (
    amplification_factor,
    projection_norm,
    random_projection_norm,
    subspace_similarity_grid,
    weight_similarity_grid,
)
from ..training.checkpoint import fingerprint
from .cli import results_command
from .results import read_checked, save_results
from .section7 import (
    ANALYSIS_TARGETS,
    BUDGET_SETS,
    DEFAULT_CACHE,
    MLP_SETS,
    SWEEP_SETS,
    WEIGHT_TARGET,
    Section7Config,
    finetune,
    init_seed,
    initial_adapters,
    prepare,
    ready,
    val_loss,
)

FORMAT_VERSION = 2  # 2: replicate bases, independent A per rank, φ at init, Figure 8
DEFAULT_RESULTS = Path("section7_results.json")  # in the current folder; the notebooks run beside theirs


# ----------------------------------------------------------------------------
# the bases, the data, and one fine-tuning run


# ----------------------------------------------------------------------------
# 1. a fixed budget: which weights (Table 5)


def rank_for_budget(model, targets, budget_rank):
    """The rank at which `targets` cost what budget_rank costs on one D x D matrix, per layer.

    One D x D matrix at rank R holds R·2D adapter numbers; targets at rank r hold
    r·Σ(d_in + d_out). Equal budgets need r = R·2D / Σ(d_in + d_out): 8 / n for n attention
    matrices, but 8·2D / (M + D) = 3.2 for W_1 or W_2 alone and 1.6 for both when M = 4D.

    Returns:
    - exact: float, the rank that would match the budget
    - r: int >= 1, the integer rank whose count is nearest it (ties go up)
    """
    per_rank = sum(sum(model.linear_shape(t)) for t in targets)  # Σ (d_out + d_in), one layer
    exact = budget_rank * 2 * model.d_model / per_rank
    return exact, max(1, math.floor(exact + 0.5))


def budget_table(cfg=Section7Config(), setups=None, memo=None, cache_dir=DEFAULT_CACHE, log=print):
    """Validation loss of LoRA on each target set of Table 5 (and the MLP), one budget, every base and seed.

    Returns:
    - {"budget": int (trainable numbers, whole model), "base_seeds": [int], "seeds": [int],
       "base_val_loss": [float, one a base],
       "rows": [{"targets": [str], "r": int, "exact_rank": float, "trainable": int,
                 "budget_ratio": float (trainable / budget),
                 "val_loss": [[float, one a seed], one a base]}]}
    """
    setups = ready(cfg, setups, cache_dir, log)
    model = setups[0].base.config
    budget = cfg.budget_rank * 2 * model.d_model * model.n_layers
    rows = []
    for targets in BUDGET_SETS + MLP_SETS:
        exact, r = rank_for_budget(model, targets, cfg.budget_rank)
        runs = [[finetune(su, cfg, targets, r, s, memo, log) for s in cfg.seeds] for su in setups]
        rows.append({"targets": list(targets), "r": r, "exact_rank": exact, "trainable": runs[0][0]["trainable"],
                     "budget_ratio": runs[0][0]["trainable"] / budget,
                     "val_loss": [[x["val_loss"] for x in per_base] for per_base in runs]})  # fmt: skip
    return {"budget": budget, "base_seeds": list(cfg.base_seeds), "seeds": list(cfg.seeds),
            "base_val_loss": [val_loss(su, cfg) for su in setups], "rows": rows}  # fmt: skip


# ----------------------------------------------------------------------------
# 2. what rank (Table 6)


def rank_sweep(cfg=Section7Config(), setups=None, memo=None, cache_dir=DEFAULT_CACHE, log=print):
    """Validation loss against r for W_q; W_q, W_v; and all four attention matrices, every base and seed.

    Returns:
    - {"ranks": [int], "base_seeds": [int], "seeds": [int], "base_val_loss": [float, one a base],
       "rows": [{"targets": [str], "trainable": [int, one a rank],
                 "val_loss": [[[float, one a rank], one a seed], one a base]}]}
    """
    setups = ready(cfg, setups, cache_dir, log)
    rows = []
    for targets in SWEEP_SETS:
        runs = [[[finetune(su, cfg, targets, r, s, memo, log) for r in cfg.ranks] for s in cfg.seeds] for su in setups]
        losses = [[[x["val_loss"] for x in per_seed] for per_seed in per_base] for per_base in runs]
        rows.append({"targets": list(targets), "trainable": [x["trainable"] for x in runs[0][0]], "val_loss": losses})
    return {"ranks": list(cfg.ranks), "base_seeds": list(cfg.base_seeds), "seeds": list(cfg.seeds),
            "base_val_loss": [val_loss(su, cfg) for su in setups], "rows": rows}  # fmt: skip


# ----------------------------------------------------------------------------
# 3. subspace similarity of the learned A (Figures 3 and 4)


def random_gaussian_grid(cfg, d_in):
    """φ grid of two random Gaussian (r, d_in) matrices, r = the large rank: Figure 4's right panel.

    For independent uniformly random subspaces E||V1_iᵀ V2_j||_F² = i·j/d_in, so chance level is
    φ ≈ max(i, j)/d_in: near 0 for GPT-3's d = 12,288, but not for our d = 64. It is also exactly
    what Figure 4 would show at initialization: two seeds' A start as independent Gaussian matrices.
    """
    G = np.random.default_rng(cfg.random_seed).standard_normal((2, cfg.subspace_ranks[1], d_in))  # (2, r, d_in)
    return subspace_similarity_grid(G[0], G[1])


def subspace_maps(cfg=Section7Config(), setups=None, memo=None, cache_dir=DEFAULT_CACHE, log=print):
    """φ(A1, A2, i, j) grids (eq. 4) for the A of W_q and W_v in every layer, from {W_q, W_v} runs.

    Figure 3 (rank against rank, one seed): the trained A_{r=8} against the trained A_{r=64}; the
    same two A at initialization, the baseline they started from; and a control, "shared": r = 8 runs
    drawn from the r = 64 run's stream (a_seed = init_seed(seed, 64)), as one seed for both ranks
    did before, trained and at initialization. init_lora draws blocks.0.W_q.A first, so there the
    r = 8 start is the first 8 rows of the r = 64 start; the later weights' starts are unrelated.
    Figure 4 (seed against seed, one rank): the trained A_{r=64} of every pair of seeds.

    Returns:
    - {"small_rank": int, "large_rank": int, "corner": int, "base_seeds": [int], "seeds": [int],
       "pairs": [[int, int], ...] (pairs of seeds, for "seed_seed"),
       "layers": [{"W_q": maps, "W_v": maps}, one a layer],
       "random": (corner, corner) grid of two random Gaussian matrices}
      maps = {"small_large": [[grid, one a seed], one a base], "init": [grid, one a seed],
              "shared": [[grid, one a seed], one a base], "shared_init": [grid, one a seed],
              "seed_seed": [[grid, one a pair], one a base]}
      Grids are lists of lists, [i - 1][j - 1] = φ(·, ·, i, j): (r_small, corner) for the first
      four (initialization does not depend on the base), (corner, corner) for "seed_seed".
    """
    setups = ready(cfg, setups, cache_dir, log)
    small, large = cfg.subspace_ranks
    k = cfg.corner
    model = setups[0].base.config
    pairs = list(combinations(cfg.seeds, 2))
    layers = [{t: {"small_large": [], "init": [], "shared": [], "shared_init": [], "seed_seed": []}
               for t in ANALYSIS_TARGETS} for _ in range(model.n_layers)]  # fmt: skip

    def grid(A1, A2, cols):  # φ for the top rows x top `cols` directions
        return subspace_similarity_grid(A1, A2)[:, :cols].tolist()

    for s in cfg.seeds:  # at initialization: the same for every base
        a_small, _ = initial_adapters(model, cfg, ANALYSIS_TARGETS, small, init_seed(s, small))
        a_shared, _ = initial_adapters(model, cfg, ANALYSIS_TARGETS, small, init_seed(s, large))
        a_large, _ = initial_adapters(model, cfg, ANALYSIS_TARGETS, large, init_seed(s, large))
        for l, per_target in enumerate(layers):
            for t, maps in per_target.items():
                name = f"blocks.{l}.{t}.A"
                maps["init"].append(grid(a_small[name], a_large[name], k))
                maps["shared_init"].append(grid(a_shared[name], a_large[name], k))
    for su in setups:
        trained = {}
        for s in cfg.seeds:
            shared = finetune(su, cfg, ANALYSIS_TARGETS, small, s, memo, log, a_seed=init_seed(s, large))
            trained[s] = (finetune(su, cfg, ANALYSIS_TARGETS, small, s, memo, log)["adapters"],
                          finetune(su, cfg, ANALYSIS_TARGETS, large, s, memo, log)["adapters"],
                          shared["adapters"])  # fmt: skip
        for l, per_target in enumerate(layers):
            for t, maps in per_target.items():
                name = f"blocks.{l}.{t}.A"
                maps["small_large"].append([grid(trained[s][0][name], trained[s][1][name], k) for s in cfg.seeds])
                maps["shared"].append([grid(trained[s][2][name], trained[s][1][name], k) for s in cfg.seeds])
                maps["seed_seed"].append([[row[:k] for row in grid(trained[a][1][name], trained[b][1][name], k)[:k]]
                                          for a, b in pairs])  # fmt: skip
    random = [row[:k] for row in random_gaussian_grid(cfg, model.d_model)[:k].tolist()]
    return {"small_rank": small, "large_rank": large, "corner": k, "base_seeds": list(cfg.base_seeds),
            "seeds": list(cfg.seeds), "pairs": [list(p) for p in pairs], "layers": layers,
            "random": random}  # fmt: skip


# ----------------------------------------------------------------------------
# 4. ΔW against W (Table 7)


def amplification_table(cfg=Section7Config(), setups=None, memo=None, cache_dir=DEFAULT_CACHE, log=print):
    """Table 7 for W_q and W_v of every layer, at every rank of the {W_q, W_v} sweep, every base and seed.

    For each: ||U_rᵀ W V_r||_F with U_r, V_r the top-r singular vectors of ΔW ("dW"), of W itself
    ("W") and of a random Gaussian matrix ("random", mean over cfg.random_draws draws); ||W||_F,
    ||ΔW||_F and the amplification factor ||ΔW||_F / ||U_rᵀ W V_r||_F (Section 7.3; Appendix H.4).
    W is the frozen pretrained weight; ΔW = s·B·A includes the scaling s = α/r.

    Returns:
    - {"ranks": [int], "base_seeds": [int], "seeds": [int],
       "runs": [[{"layers": [{"W_q": [row, one a rank], "W_v": [...]}, one a layer]}, one a seed], one a base]}
      with row = {"r", "proj_dW", "proj_W", "proj_random", "norm_W", "norm_dW", "factor"}
    """
    setups = ready(cfg, setups, cache_dir, log)
    out = []
    for su in setups:
        per_base = []
        for s in cfg.seeds:
            runs = {r: finetune(su, cfg, ANALYSIS_TARGETS, r, s, memo, log) for r in cfg.ranks}
            layers = []
            for l in range(su.base.config.n_layers):
                per_target = {}
                for t in ANALYSIS_TARGETS:
                    W = su.base[f"blocks.{l}.{t}"].astype(np.float64)  # (d_out, d_in)
                    rows = []
                    for r, run in runs.items():
                        dW = delta_weight(run["adapters"], run["lora"], f"blocks.{l}.{t}").astype(np.float64)
                        rand = [random_projection_norm(W, r, cfg.random_seed + k) for k in range(cfg.random_draws)]
                        rows.append({"r": r, "proj_dW": projection_norm(W, dW, r), "proj_W": projection_norm(W, W, r),
                                     "proj_random": float(np.mean(rand)), "norm_W": float(np.linalg.norm(W)),
                                     "norm_dW": float(np.linalg.norm(dW)),
                                     "factor": amplification_factor(W, dW, r)})  # fmt: skip
                    per_target[t] = rows
                layers.append(per_target)
            per_base.append({"layers": layers})
        out.append(per_base)
    return {"ranks": list(cfg.ranks), "base_seeds": list(cfg.base_seeds), "seeds": list(cfg.seeds), "runs": out}


# ----------------------------------------------------------------------------
# 5. the directions of W that ΔW acts on (Figure 8, Appendix H.3)


def weight_maps(cfg=Section7Config(), setups=None, memo=None, cache_dir=DEFAULT_CACHE, log=print):
    """φ(W_q, ΔW_q, i, j): W_q's top-i right singular directions against ΔW_q's top-j, every layer,
    at both subspace ranks, every base and seed, from the {W_q, W_v} runs; and W_q against a random
    Gaussian matrix of its shape, the figure's baseline. i runs over all D directions of W_q (its
    weakest included), j over the small rank's (the larger ΔW's top ones).

    Returns:
    - {"target": "W_q", "ranks": [r_small, r_large], "j_max": r_small, "base_seeds", "seeds",
       "layers": [{"dW": [[[grid, one a rank], one a seed], one a base],
                   "random": [grid, one a base]}, one a layer]}
      grids (D, j_max), [i - 1][j - 1] = φ(W_q, M, i, j) (lora_np.analysis.weight_similarity_grid)
    """
    setups = ready(cfg, setups, cache_dir, log)
    model = setups[0].base.config
    D, j_max = model.d_model, cfg.subspace_ranks[0]
    G = np.random.default_rng(cfg.random_seed).standard_normal(model.linear_shape(WEIGHT_TARGET))  # (d_out, d_in)
    layers = [{"dW": [], "random": []} for _ in range(model.n_layers)]
    for su in setups:
        runs = [[finetune(su, cfg, ANALYSIS_TARGETS, r, s, memo, log) for r in cfg.subspace_ranks] for s in cfg.seeds]
        for l, out in enumerate(layers):
            name = f"blocks.{l}.{WEIGHT_TARGET}"
            W = su.base[name].astype(np.float64)  # (d_out, d_in)
            out["random"].append(weight_similarity_grid(W, G, D, j_max).tolist())
            dWs = [[delta_weight(run["adapters"], run["lora"], name).astype(np.float64) for run in per_seed]
                   for per_seed in runs]  # fmt: skip
            out["dW"].append(
                [[weight_similarity_grid(W, dW, D, j_max).tolist() for dW in per_seed] for per_seed in dWs]
            )
    return {"target": WEIGHT_TARGET, "ranks": list(cfg.subspace_ranks), "j_max": j_max,
            "base_seeds": list(cfg.base_seeds), "seeds": list(cfg.seeds), "layers": layers}  # fmt: skip


# ----------------------------------------------------------------------------
# all five, and the results file

EXPERIMENTS = (("budget", budget_table), ("rank_sweep", rank_sweep), ("subspace", subspace_maps),
               ("amplification", amplification_table), ("weight_similarity", weight_maps))  # fmt: skip


def run_all(cfg=Section7Config(), cache_dir=DEFAULT_CACHE, log=print):
    """Every experiment, each fine-tuning run done once; returns the results file's contents."""
    t0 = time.perf_counter()
    setups = prepare(cfg, cache_dir, log)
    memo = {}
    results = {"format_version": FORMAT_VERSION, "config": cfg.to_dict()}
    for name, fn in EXPERIMENTS:
        log(f"{name}:")
        results[name] = fn(cfg, setups, memo, log=log)
    results["provenance"] = {  # not part of the configuration: what the run was, not what it depends on
        "command": "python -m lora_np experiments",
        "base_fingerprints": [fingerprint(su.base) for su in setups],
        "finetuning_runs": len(memo),
        "seconds": round(time.perf_counter() - t0, 1),
        "numpy": np.__version__,
    }
    return results


GRID_SECTIONS = ("subspace", "weight_similarity")  # φ grids only: most of the file's bytes


EXPECTED_KEYS = {
    "budget": {"budget", "base_seeds", "seeds", "base_val_loss", "rows"},
    "rank_sweep": {"ranks", "base_seeds", "seeds", "base_val_loss", "rows"},
    "subspace": {"small_rank", "large_rank", "corner", "base_seeds", "seeds", "pairs", "layers", "random"},
    "amplification": {"ranks", "base_seeds", "seeds", "runs"},
    "weight_similarity": {"target", "ranks", "j_max", "base_seeds", "seeds", "layers"},
}


def load_results(path=DEFAULT_RESULTS, cfg=Section7Config()):
    """The results file, after checking its format version, that its configuration is cfg's, and
    that every experiment's keys are there. Raises ValueError saying what does not match and how to
    regenerate the file."""
    command = "python -m lora_np experiments"
    results, fix = read_checked(path, cfg.to_dict(), FORMAT_VERSION, command)
    for name, keys in EXPECTED_KEYS.items():
        missing = keys - set(results.get(name, {}))
        if missing:
            raise ValueError(f"{path}: results[{name!r}] lacks {sorted(missing)}; {fix}")
    return results


def main(argv=None, prog="python -m lora_np experiments"):
    """`python -m lora_np experiments [--out FILE] [--cache-dir DIR] [--check] [--threads N]`."""

    def run(cache_dir, out):
        results = run_all(Section7Config(), cache_dir)
        prov = results["provenance"]
        path = save_results(results, out, grid_sections=GRID_SECTIONS)
        return f"wrote {path} ({prov['finetuning_runs']} fine-tuning runs, {prov['seconds']:.0f}s)"

    return results_command(
        argv, prog, "Rerun the Section 7 experiments (Tables 5-7, Figures 3, 4 and 8 on the tiny model) behind "
        "notebooks/05_what_lora_learns.ipynb and write their results file (about half an hour on one core, "
        "one BLAS thread by default: the same numbers bit for bit on one machine).",
        default_out=DEFAULT_RESULTS, default_cache=DEFAULT_CACHE, check=load_results, run=run,
        d_model=Section7Config().demo.model.d_model,
    )


if __name__ == "__main__":
    sys.exit(main())
