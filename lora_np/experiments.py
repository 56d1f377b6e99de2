"""Section 7 of the paper in miniature: which weights, what rank, and how ΔW relates to W.

The paper asks three questions of LoRA on GPT-3 175B; we ask them of the demo's tiny GPT, on
its fine-tuning domain (Yoda word order), with the same base model the demo pretrains:

1. budget_table (Table 5, Section 7.1): one fixed number of trainable parameters, spent as
   r = 8 on one of W_q, W_k, W_v, W_o, r = 4 on two, r = 2 on all four; and, since our model's
   MLP is as easy to adapt, on W_1, W_2 at the integer rank whose count is nearest the budget.
2. rank_sweep (Table 6, Section 7.2): r = 1, 2, 4, 8, 64 for W_q; W_q, W_v; and all four.
3. subspace_maps (Figures 3 and 4, Section 7.2): φ(A_{r=8}, A_{r=64}, i, j) and
   φ(A_{r=64}, A'_{r=64}, i, j) for two seeds, against two random Gaussian matrices.
4. amplification_table (Table 7, Section 7.3): ||U_rᵀ W V_r||_F for the top-r directions of
   ΔW, of W itself and of a random matrix; ||W||_F, ||ΔW||_F and their ratio.

Every function is seeded and returns plain numbers (dicts of floats and lists). Fine-tuning runs
are shared through a `memo` dict, so `run_all` trains each (targets, r, seed) once. The
measurements themselves live in lora_np.analysis; this module only trains and collects.

The whole study takes about two minutes on two cores, too long for a notebook, so its results
are kept in notebooks/section7_results.json, rewritten by ONE command:

    python -m lora_np.experiments            (or: python -m lora_np experiments)

The file records the configuration; `load_results` refuses a file whose configuration is not
the code's, so a stale file cannot pass for fresh results.

Dimension legend: L layers, D model width, M MLP width, r rank, d_in / d_out a weight's input /
output width; i, j how many top singular directions.

References
- Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685v2,
  Section 7, Tables 5-7, Figures 3-4, Appendix G and H.
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from .analysis import (
    amplification_factor,
    projection_norm,
    random_projection_norm,
    subspace_similarity_grid,
)
from .checkpoint import fingerprint, write_atomic
from .cli import Parser, check_out_dir, check_out_file, fail
from .config import LoraConfig
from .counting import count_arrays
from .data import make_splits
from .demo import PRETRAIN_RECIPE, DemoConfig, pretrain_or_load
from .lora import delta_weight, init_lora
from .optim import AdamW
from .params import cast
from .train import evaluate, train

FORMAT_VERSION = 1
DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "notebooks" / "section7_results.json"
DEFAULT_CACHE = "runs/demo/cache"  # where the demo keeps its pretrained base

ATTENTION = ("W_q", "W_k", "W_v", "W_o")
# Table 5's columns, in the paper's order; then the MLP, which the paper leaves to future work
BUDGET_SETS = (("W_q",), ("W_k",), ("W_v",), ("W_o",), ("W_q", "W_k"), ("W_q", "W_v"), ATTENTION)
MLP_SETS = (("W_1",), ("W_2",), ("W_1", "W_2"))
# Table 6's rows
SWEEP_SETS = (("W_q",), ("W_q", "W_v"), ATTENTION)
# Figures 3, 4 and Table 7 read the adapters of the {W_q, W_v} runs, as the paper does
ANALYSIS_TARGETS = ("W_q", "W_v")


@dataclass(frozen=True)
class Section7Config:
    """Everything the numbers depend on. The defaults are the committed results file's."""

    demo: DemoConfig = field(default_factory=DemoConfig)  # base model, pretraining, data: the demo's
    steps: int = 200  # fine-tuning steps per run; the loss is still creeping down, but slowly
    batch_size: int = 16  # half the demo's: 2.5x faster a step here, for a loss ~0.003 higher
    lr: float = 1e-2  # AdamW, cosine decay to 10%; the demo's LoRA rate
    alpha: float = 4.0  # fixed for every r, so s = α/r falls as r grows (paper Section 4.1)
    seeds: tuple = (0, 1, 2)  # adapter init and batch order; seeds[0] for single-seed runs
    budget_rank: int = 8  # the rank that spends the whole budget on one D x D matrix
    ranks: tuple = (1, 2, 4, 8, 64)  # Table 6's
    subspace_ranks: tuple = (8, 64)  # Figure 3's small and large rank; Figure 4 uses the large
    eval_windows: int = 256  # validation windows of T tokens (the demo's split has ~190: all of it)
    random_seed: int = 0  # the random Gaussian matrices of Figure 4 and Table 7
    random_draws: int = 10  # Table 7's "Random" column: mean over this many random matrices

    def validate(self):
        """Raise a clear error for a bad value, before any training."""
        if not isinstance(self.demo, DemoConfig):
            raise TypeError(f"demo must be a DemoConfig, got {type(self.demo).__name__}")
        self.demo.validate()
        for name in ("steps", "batch_size", "budget_rank", "eval_windows", "random_draws", "random_seed"):
            v, low = getattr(self, name), 0 if name == "random_seed" else 1
            if not isinstance(v, Integral) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("lr", "alpha"):
            v = getattr(self, name)
            if not (isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        D = self.demo.model.d_model
        for name in ("seeds", "ranks", "subspace_ranks"):
            v = getattr(self, name)
            ok = isinstance(v, tuple) and v and all(isinstance(x, Integral) and not isinstance(x, bool) for x in v)
            if not ok or len(set(v)) != len(v) or list(v) != sorted(v) or v[0] < (0 if name == "seeds" else 1):
                raise ValueError(f"{name} must be a non-empty tuple of distinct, increasing ints, got {v!r}")
        if len(self.seeds) < 2:
            raise ValueError(f"seeds needs at least two seeds (Figure 4 compares two runs), got {self.seeds!r}")
        if self.ranks[-1] > D:
            raise ValueError(f"ranks must not exceed d_model = {D}, got {self.ranks!r}")
        if len(self.subspace_ranks) != 2 or not set(self.subspace_ranks) <= set(self.ranks):
            raise ValueError(f"subspace_ranks must be two of ranks {self.ranks}, got {self.subspace_ranks!r}")
        if self.budget_rank % len(ATTENTION) or self.budget_rank > D:
            raise ValueError(
                f"budget_rank must be a multiple of 4 (so 1, 2 and 4 attention matrices split it exactly) "
                f"and at most d_model = {D}, got {self.budget_rank!r}"
            )

    def to_dict(self):
        """The configuration as JSON-ready values: what the results file records and is checked by."""
        d = self.demo
        pretrain = {"key": d.pretrain_key(), "recipe": PRETRAIN_RECIPE, "steps": d.pretrain_steps, "lr": d.pretrain_lr,
                    "batch_size": d.batch_size, "n_lines": d.n_lines[0]}  # fmt: skip
        cfg = {k: v for k, v in vars(self).items() if k != "demo"}
        cfg.update(model=vars(d.model), pretrain=pretrain, data_seed=d.seed, finetune_lines=d.n_lines[1],
                   dtype="float32", optimizer="AdamW, weight_decay 0, cosine schedule to 10%",
                   lora_init="gaussian")  # fmt: skip
        return json.loads(json.dumps(cfg))  # tuples become lists, as they will be after a round trip


# ----------------------------------------------------------------------------
# the base model, the data, and one fine-tuning run


@dataclass(frozen=True)
class Setup:
    """The frozen base (float32 Params) and the fine-tuning domain's token streams."""

    base: dict
    train_ids: np.ndarray
    val_ids: np.ndarray


def prepare(cfg, cache_dir=DEFAULT_CACHE, log=print):
    """The demo's pretrained base (from the cache folder when it is there, else pretrained and
    saved: ~40 s) and the fine-tuning domain's train / validation streams."""
    cfg.validate()
    pre_train, _ = make_splits("pretrain", cfg.demo.n_lines[0], cfg.demo.seed)
    base, _ = pretrain_or_load(cfg.demo, pre_train, cache_dir, log)
    new_train, new_val = make_splits("finetune", cfg.demo.n_lines[1], cfg.demo.seed)
    return Setup(base, new_train, new_val)


def val_loss(setup, cfg, adapters=None, lora=None):
    """Mean cross-entropy (nats a character) on the fine-tuning domain's validation windows."""
    T = cfg.demo.model.context_length
    return float(evaluate(setup.base, setup.val_ids, adapters, lora, block_size=T, max_windows=cfg.eval_windows))


def finetune(setup, cfg, targets, r, seed, memo=None, log=print):
    """LoRA on `targets` at rank r from the frozen base: cfg.steps of AdamW, float32.

    `seed` draws A (init_lora) and the batches (train), so runs with the same seed see the same
    batches whatever they adapt: a paired comparison. With a memo dict, a run already done is
    returned from it; a memo belongs to one (setup, cfg) pair, as in run_all.

    Returns:
    - run: {"adapters": dict name -> float32 array, "lora": LoraConfig, "val_loss": float,
      "trainable": int}
    """
    key = (tuple(targets), int(r), int(seed))
    if memo is not None and key in memo:
        return memo[key]
    lora = LoraConfig(r=r, alpha=cfg.alpha, targets=tuple(targets))
    adapters = cast(init_lora(setup.base.config, lora, seed), np.float32)
    t0 = time.perf_counter()
    train(setup.base, setup.train_ids, AdamW(adapters, lr=cfg.lr), adapters=adapters, lora=lora, steps=cfg.steps,
          batch_size=cfg.batch_size, block_size=cfg.demo.model.context_length, seed=seed, log_every=0,
          label=f"{','.join(targets)} r={r}")  # fmt: skip
    run = {"adapters": adapters, "lora": lora, "val_loss": val_loss(setup, cfg, adapters, lora),
           "trainable": count_arrays(adapters)}  # fmt: skip
    log(f"  {','.join(targets):<20} r={r:<3} seed {seed}: val loss {run['val_loss']:.4f}  "
        f"({run['trainable']:,} trainable, {time.perf_counter() - t0:.1f}s)")  # fmt: skip
    if memo is not None:
        memo[key] = run
    return run


def _ready(cfg, setup, cache_dir, log):
    cfg.validate()
    return setup if setup is not None else prepare(cfg, cache_dir, log)


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


def budget_table(cfg=Section7Config(), setup=None, memo=None, cache_dir=DEFAULT_CACHE, log=print):
    """Validation loss of LoRA on each target set of Table 5 (and the MLP), one budget, every seed.

    Returns:
    - {"budget": int (trainable numbers, whole model), "base_val_loss": float, "seeds": [int],
       "rows": [{"targets": [str], "r": int, "exact_rank": float, "trainable": int,
                 "budget_ratio": float (trainable / budget), "val_loss": [float, one a seed]}]}
    """
    setup = _ready(cfg, setup, cache_dir, log)
    model = setup.base.config
    budget = cfg.budget_rank * 2 * model.d_model * model.n_layers
    rows = []
    for targets in BUDGET_SETS + MLP_SETS:
        exact, r = rank_for_budget(model, targets, cfg.budget_rank)
        runs = [finetune(setup, cfg, targets, r, s, memo, log) for s in cfg.seeds]
        n = runs[0]["trainable"]
        rows.append({"targets": list(targets), "r": r, "exact_rank": exact, "trainable": n,
                     "budget_ratio": n / budget, "val_loss": [x["val_loss"] for x in runs]})  # fmt: skip
    return {"budget": budget, "base_val_loss": val_loss(setup, cfg), "seeds": list(cfg.seeds), "rows": rows}


# ----------------------------------------------------------------------------
# 2. what rank (Table 6)


def rank_sweep(cfg=Section7Config(), setup=None, memo=None, cache_dir=DEFAULT_CACHE, log=print):
    """Validation loss against r for W_q; W_q, W_v; and all four attention matrices (seed cfg.seeds[0]).

    Returns:
    - {"ranks": [int], "seed": int, "base_val_loss": float,
       "rows": [{"targets": [str], "val_loss": [float, one a rank], "trainable": [int, one a rank]}]}
    """
    setup = _ready(cfg, setup, cache_dir, log)
    seed, rows = cfg.seeds[0], []
    for targets in SWEEP_SETS:
        runs = [finetune(setup, cfg, targets, r, seed, memo, log) for r in cfg.ranks]
        rows.append({"targets": list(targets), "val_loss": [x["val_loss"] for x in runs],
                     "trainable": [x["trainable"] for x in runs]})  # fmt: skip
    return {"ranks": list(cfg.ranks), "seed": seed, "base_val_loss": val_loss(setup, cfg), "rows": rows}


# ----------------------------------------------------------------------------
# 3. subspace similarity of the learned A (Figures 3 and 4)


def random_gaussian_grid(cfg, d_in):
    """φ grid of two random Gaussian (r, d_in) matrices, r = the large rank: Figure 4's right panel.

    For independent uniformly random subspaces E||V1_iᵀ V2_j||_F² = i·j/d_in, so chance level is
    φ ≈ max(i, j)/d_in: near 0 for GPT-3's d = 12,288, but not for our d = 64.
    """
    G = np.random.default_rng(cfg.random_seed).standard_normal((2, cfg.subspace_ranks[1], d_in))  # (2, r, d_in)
    return subspace_similarity_grid(G[0], G[1])


def subspace_maps(cfg=Section7Config(), setup=None, memo=None, cache_dir=DEFAULT_CACHE, log=print):
    """φ(A1, A2, i, j) grids (eq. 4) for the A of W_q and W_v in every layer, from {W_q, W_v} runs.

    Returns:
    - {"small_rank": int, "large_rank": int, "seeds": [int, int],
       "layers": [{"W_q": {"small_large": (r_small, r_large) grid, "seed_seed": (r_large, r_large)
                           grid}, "W_v": {...}}, one a layer],
       "random": (r_large, r_large) grid of two random Gaussian matrices}
      Grids are lists of lists, [i - 1][j - 1] = φ(·, ·, i, j).
    - "small_large": A of the small-rank run (rows i) against A of the large-rank run (columns j),
      both seeds[0] (Figure 3); "seed_seed": the large rank, seeds[0] against seeds[1] (Figure 4).
    """
    setup = _ready(cfg, setup, cache_dir, log)
    small, large = cfg.subspace_ranks
    s0, s1 = cfg.seeds[0], cfg.seeds[1]
    a_small = finetune(setup, cfg, ANALYSIS_TARGETS, small, s0, memo, log)["adapters"]
    a_large = finetune(setup, cfg, ANALYSIS_TARGETS, large, s0, memo, log)["adapters"]
    a_other = finetune(setup, cfg, ANALYSIS_TARGETS, large, s1, memo, log)["adapters"]
    layers = []
    for l in range(setup.base.config.n_layers):
        per_target = {}
        for t in ANALYSIS_TARGETS:
            name = f"blocks.{l}.{t}.A"
            per_target[t] = {"small_large": subspace_similarity_grid(a_small[name], a_large[name]).tolist(),
                             "seed_seed": subspace_similarity_grid(a_large[name], a_other[name]).tolist()}  # fmt: skip
        layers.append(per_target)
    random = random_gaussian_grid(cfg, setup.base.config.d_model).tolist()
    return {"small_rank": small, "large_rank": large, "seeds": [s0, s1], "layers": layers, "random": random}


# ----------------------------------------------------------------------------
# 4. ΔW against W (Table 7)


def amplification_table(cfg=Section7Config(), setup=None, memo=None, cache_dir=DEFAULT_CACHE, log=print):
    """Table 7 for W_q and W_v of every layer, at every rank of the {W_q, W_v} sweep (seeds[0]).

    For each: ||U_rᵀ W V_r||_F with U_r, V_r the top-r singular vectors of ΔW ("dW"), of W itself
    ("W") and of a random Gaussian matrix ("random", mean over cfg.random_draws draws); ||W||_F,
    ||ΔW||_F and the amplification factor ||ΔW||_F / ||U_rᵀ W V_r||_F (Section 7.3; Appendix H.4).
    W is the frozen pretrained weight; ΔW = s·B·A includes the scaling s = α/r.

    Returns:
    - {"ranks": [int], "seed": int, "layers": [{"W_q": [row, one a rank], "W_v": [...]}, one a layer]}
      with row = {"r", "proj_dW", "proj_W", "proj_random", "norm_W", "norm_dW", "factor"}
    """
    setup = _ready(cfg, setup, cache_dir, log)
    seed, layers = cfg.seeds[0], []
    runs = {r: finetune(setup, cfg, ANALYSIS_TARGETS, r, seed, memo, log) for r in cfg.ranks}
    for l in range(setup.base.config.n_layers):
        per_target = {}
        for t in ANALYSIS_TARGETS:
            W = setup.base[f"blocks.{l}.{t}"].astype(np.float64)  # (d_out, d_in)
            rows = []
            for r, run in runs.items():
                dW = delta_weight(run["adapters"], run["lora"], f"blocks.{l}.{t}").astype(np.float64)  # (d_out, d_in)
                rand = [random_projection_norm(W, r, cfg.random_seed + k) for k in range(cfg.random_draws)]
                rows.append({"r": r, "proj_dW": projection_norm(W, dW, r), "proj_W": projection_norm(W, W, r),
                             "proj_random": float(np.mean(rand)), "norm_W": float(np.linalg.norm(W)),
                             "norm_dW": float(np.linalg.norm(dW)),
                             "factor": amplification_factor(W, dW, r)})  # fmt: skip
            per_target[t] = rows
        layers.append(per_target)
    return {"ranks": list(cfg.ranks), "seed": seed, "layers": layers}


# ----------------------------------------------------------------------------
# all four, and the results file


def run_all(cfg=Section7Config(), cache_dir=DEFAULT_CACHE, log=print):
    """Every experiment, each fine-tuning run done once; returns the results file's contents."""
    t0 = time.perf_counter()
    setup = prepare(cfg, cache_dir, log)
    memo = {}
    results = {"format_version": FORMAT_VERSION, "config": cfg.to_dict()}
    for name, fn in (("budget", budget_table), ("rank_sweep", rank_sweep), ("subspace", subspace_maps),
                     ("amplification", amplification_table)):  # fmt: skip
        log(f"{name}:")
        results[name] = fn(cfg, setup, memo, log=log)
    results["provenance"] = {  # not part of the configuration: what the run was, not what it depends on
        "command": "python -m lora_np.experiments",
        "base_fingerprint": fingerprint(setup.base),
        "finetuning_runs": len(memo),
        "seconds": round(time.perf_counter() - t0, 1),
        "numpy": np.__version__,
    }
    return results


def _rounded(x, digits, grid_digits):
    # significant digits, not decimals: a projection norm can be 1e-3 and must keep its digits
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _rounded(v, digits, grid_digits) for k, v in x.items()}
    if isinstance(x, list) and x and isinstance(x[0], list):  # a φ grid: most of the file's bytes
        return [_rounded(v, grid_digits, grid_digits) for v in x]
    if isinstance(x, list):
        return [_rounded(v, digits, grid_digits) for v in x]
    return x


def save_results(results, path=DEFAULT_RESULTS, digits=6, grid_digits=4):
    """Write results as JSON, atomically (tmp + rename). Floats keep `digits` significant digits,
    φ grids `grid_digits` (a heatmap cannot show more, and the file stays ~150 kB)."""
    path = Path(path)
    text = (json.dumps(_rounded(results, digits, grid_digits), separators=(",", ":")) + "\n").encode()
    write_atomic(path, lambda f: f.write(text))
    return path


EXPECTED_KEYS = {
    "budget": {"budget", "base_val_loss", "seeds", "rows"},
    "rank_sweep": {"ranks", "seed", "base_val_loss", "rows"},
    "subspace": {"small_rank", "large_rank", "seeds", "layers", "random"},
    "amplification": {"ranks", "seed", "layers"},
}


def read_checked(path, config, version, command):
    """A cached results file, after checking its format version and that its "config" is `config`
    (a JSON-ready dict). Raises ValueError saying what does not match and the command that
    regenerates the file. Returns (results, the advice to print with any later complaint)."""
    path = Path(path)
    fix = f"regenerate it with `{command}`"
    if not path.exists():
        raise ValueError(f"no results file at {path}; {fix}")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:  # a file cut short or edited by hand
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds a JSON {type(results).__name__}, not a results object; {fix}")
    if results.get("format_version") != version:
        raise ValueError(f"{path} has format_version {results.get('format_version')!r}, the code reads "
                         f"{version}; {fix}")  # fmt: skip
    got = results.get("config")
    if got != config:
        diff = sorted(k for k in set(config) | set(got or {}) if (got or {}).get(k) != config.get(k))
        raise ValueError(f"{path} was computed with another configuration (differs in {diff}); {fix}")
    return results, fix


def load_results(path=DEFAULT_RESULTS, cfg=Section7Config()):
    """The results file, after checking its format version, that its configuration is cfg's, and
    that every experiment's keys are there. Raises ValueError saying what does not match and how to
    regenerate the file."""
    results, fix = read_checked(path, cfg.to_dict(), FORMAT_VERSION, "python -m lora_np.experiments")
    for name, keys in EXPECTED_KEYS.items():
        missing = keys - set(results.get(name, {}))
        if missing:
            raise ValueError(f"{path}: results[{name!r}] lacks {sorted(missing)}; {fix}")
    return results


def main(argv=None):
    """`python -m lora_np.experiments [--out FILE] [--cache-dir DIR] [--check]`."""
    p = Parser(
        prog="python -m lora_np.experiments",
        description="Rerun the Section 7 experiments (Tables 5-7, Figures 3-4 on the tiny model) behind "
        "notebooks/05_what_lora_learns.ipynb and write their results file (about two minutes).",
    )
    p.add_argument("--out", default=str(DEFAULT_RESULTS), help=f"results file (default {DEFAULT_RESULTS})")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"the pretrained base's cache (default {DEFAULT_CACHE})")
    p.add_argument("--check", action="store_true", help="only check that the results file fits the code")
    a = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if a.check:
        try:
            load_results(a.out)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{a.out} fits the code's configuration")
        return 0
    try:  # before two minutes of training, not after
        check_out_file("--out", a.out)
        check_out_dir("--cache-dir", a.cache_dir)
    except ValueError as e:
        fail(p.prog, str(e))
    results = run_all(Section7Config(), a.cache_dir)
    path = save_results(results, a.out)
    prov = results["provenance"]
    print(f"wrote {path} ({prov['finetuning_runs']} fine-tuning runs, {prov['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
