"""Section 4.1, "A Generalization of Full Fine-tuning", on the demo's tiny GPT.

The paper: "as we increase the number of trainable parameters, training LoRA roughly converges
to training the original model" once LoRA is applied to all weight matrices and all biases are
trained. Two things are behind that sentence, and this module shows each:

1. Expressiveness, exact. With r = min(d_out, d_in), s·B·A can be ANY (d_out, d_in) matrix ΔW:
   take its SVD ΔW = U·Σ·Vᵀ and set B = U·Σ^½ / √s, A = Σ^½·Vᵀ / √s (`svd_factors`). With r
   below the rank of ΔW, the same recipe keeps the top r singular triplets: the best rank-r
   approximation (Eckart-Young), and nothing of rank r does better.
2. Training, measured (`run_all`): LoRA on all six block weights, biases trained ("bias=all":
   every b and every LayerNorm β), r from 1 to D, against two lines:
   - full fine-tuning, every parameter;
   - full fine-tuning of exactly what LoRA at full rank can change: the six block weights, the
     biases and the LayerNorm β ("span", `lora_span_names`). Full fine-tuning also trains the
     embeddings W_e, W_p, the head W_u and the LayerNorm gains γ, which LoRA here never touches,
     so "span" is the line LoRA can reach; "full" is the paper's line.

What "full rank" means for each target: the rank of a (d_out, d_in) update is at most
min(d_out, d_in). The attention weights are (D, D); W_1 is (M, D) and W_2 is (D, M), and with
M >= D their rank is at most D too. So r = D is full rank for all six. At that rank LoRA trains
r·(d_in + d_out) numbers for a weight of d_in·d_out: 2·D² for a D x D weight (twice the weight),
D·(D + M) for W_1 (1.25 times it when M = 4D).

Learning rate and scaling. With Adam, the size of a step on B and A does not depend on the size
of their gradients, so a step on ΔW = s·B·A is about s·lr·|A|·√r: under the paper's s = α/r it
shrinks like 1/√r, and a large rank learns more slowly at the same lr (Section 4.1 says α/r
"helps to reduce the need to retune" the lr; it does not remove it). rsLoRA's s = α/√r
(Kalajdzievski 2023) keeps the step size independent of r. The sweep uses rsLoRA AND picks each
run's lr from a three-point grid, so that no curve is held back by a learning rate chosen for
another rank; the paper's α/r at the demo's fixed lr is run beside it, to show the difference.
The lr is chosen on one half of the validation sentences ("dev") and the loss reported on the
other half ("test"), so that the choice does not flatter the number reported.

The study takes about 20 minutes on one (shared) core, so its results are kept in
notebooks/fullrank_results.json, rewritten by one command, run in notebooks/ (the file goes to the
current folder, or to --out):

    cd notebooks && python -m lora_np fullrank

Dimension legend: L layers, D model width, M MLP width, r rank, d_in / d_out a weight's input /
output width.

References
- Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685v2,
  Section 4.1.
- Eckart & Young 1936, "The approximation of one matrix by another of lower rank".
- Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA),
  arXiv:2312.03732.
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from ..core.config import LORA_TARGETS, LoraConfig
from ..core.lora import init_lora
from ..core.model import model_forward
from ..core.params import Params, cast
from ..training.checkpoint import fingerprint
from ..training.counting import count_arrays
from ..training.data import make_splits
from ..training.optim import AdamW
from ..training.train import evaluate, train, trainable_names
from .cli import results_command
from .recipe import PRETRAIN_RECIPE, DemoConfig, pretrain_or_load
from .results import read_checked, save_results

FORMAT_VERSION = 1
DEFAULT_RESULTS = Path("fullrank_results.json")  # in the current folder; the notebooks run beside theirs
DEFAULT_CACHE = "runs/demo/cache"  # where the demo keeps its pretrained base
COMMAND = "python -m lora_np fullrank"


# ----------------------------------------------------------------------------
# 1. expressiveness: any ΔW is s·B·A at r = min(d_out, d_in)


def svd_factors(delta, scaling, r=None):
    """A (r, d_in) and B (d_out, r) with s·B·A the best rank-r approximation of ΔW.

    With ΔW = U·Σ·Vᵀ (singular values in decreasing order) and its top r triplets:

        B = U_r·Σ_r^½ / √s,   A = Σ_r^½·V_rᵀ / √s,   so s·B·A = U_r·Σ_r·V_rᵀ

    At r = min(d_out, d_in) (the default) that is ΔW itself, up to rounding. Splitting Σ^½
    between the two factors keeps them the same size, as training tends to.

    Inputs:
    - delta: (d_out, d_in) float array, any matrix
    - scaling: the LoRA scaling s > 0 the factors will be used with
    - r: 1 <= r <= min(d_out, d_in), or None for min(d_out, d_in)

    Returns:
    - A: (r, d_in), B: (d_out, r), in delta's dtype
    """
    if not isinstance(delta, np.ndarray) or delta.ndim != 2 or not np.issubdtype(delta.dtype, np.floating):
        got = f"{delta.dtype} {delta.shape}" if isinstance(delta, np.ndarray) else type(delta).__name__
        raise ValueError(f"delta must be a 2-D float array (d_out, d_in), got {got}")
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta must be finite: an SVD of inf or nan has no meaning")
    ok = isinstance(scaling, Real) and not isinstance(scaling, bool) and math.isfinite(scaling) and scaling > 0
    if not ok:
        raise ValueError(f"scaling must be a finite number > 0, got {scaling!r}")
    full = min(delta.shape)
    if r is None:
        r = full
    if not isinstance(r, Integral) or isinstance(r, bool) or not 1 <= r <= full:
        raise ValueError(f"r must be an int in [1, min(d_out, d_in)] = [1, {full}] for delta of shape "
                         f"{delta.shape}, got {r!r}")  # fmt: skip
    U, S, Vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    root = np.sqrt(S[:r] / scaling)  # (r,)   Σ_r^½ / √s
    B = U[:, :r] * root  # (d_out, r)
    A = root[:, None] * Vt[:r]  # (r, d_in)
    return A.astype(delta.dtype), B.astype(delta.dtype)


def full_ranks(cfg, targets=LORA_TARGETS):
    """{target: min(d_out, d_in)}: the rank at which s·B·A can be any update of that weight."""
    return {t: min(cfg.linear_shape(t)) for t in targets}


def lora_span_names(params, targets=LORA_TARGETS):
    """What LoRA on `targets` at full rank with bias="all" can change: those block weights, every
    bias b_* and every LayerNorm β. Full fine-tuning of these names alone is the line LoRA can reach.
    In the order of params."""
    names = []
    for name in params:
        leaf = name.rsplit(".", 1)[-1]
        if (name.startswith("blocks.") and leaf in targets) or leaf.startswith("b_") or leaf == "beta":
            names.append(name)
    return names


def adapters_from_delta(base, tuned, lora):
    """Adapters whose s·B·A is, weight by weight, the best rank-r approximation of tuned - base.

    Inputs:
    - base, tuned: Params of one config; tuned differs from base in the adapted weights (and perhaps
      elsewhere: only lora.targets are read)
    - lora: LoraConfig; its r and scaling are used

    Returns:
    - adapters: dict name -> array in base's dtype, as init_lora names them
    """
    adapters = {}
    for l in range(base.config.n_layers):
        for t in lora.targets:
            name = f"blocks.{l}.{t}"
            delta = tuned[name].astype(np.float64) - base[name].astype(np.float64)  # (d_out, d_in)
            A, B = svd_factors(delta, lora.scaling, lora.r)
            adapters[name + ".A"], adapters[name + ".B"] = A.astype(base[name].dtype), B.astype(base[name].dtype)
    return adapters


# ----------------------------------------------------------------------------
# 2. training: the configuration, the data, one run


@dataclass(frozen=True)
class FullRankConfig:
    """Everything the numbers depend on. The defaults are the committed results file's."""

    demo: DemoConfig = field(default_factory=DemoConfig)  # base model, pretraining, data: the demo's
    steps: int = 300  # the demo's fine-tuning steps, for every run
    batch_size: int = 32  # the demo's
    ranks: tuple = (1, 4, 16, 64)  # up to D = 64: full rank for all six weights
    alpha: float = 2.0  # rsLoRA, s = α/√r: s = 1 at the demo's r = 4, as the demo's α/r = 4/4 is
    lrs: tuple = (3e-3, 1e-2, 3e-2)  # LoRA's grid, around the demo's 1e-2
    full_lrs: tuple = (3e-4, 1e-3, 3e-3)  # full fine-tuning's grid, around the demo's 1e-3
    paper_alpha: float = 4.0  # the paper's s = α/r, the demo's α and lr, no tuning
    paper_lr: float = 1e-2
    paper_ranks: tuple = (1, 4, 16, 64)
    seed: int = 0  # A's initialization; the batches come from seed + 1, as in the demo
    eval_windows: int = 256  # validation windows of T tokens per half (each half has fewer: all of it)

    def validate(self):
        """Raise a clear error for a bad value, before any training."""
        if not isinstance(self.demo, DemoConfig):
            raise TypeError(f"demo must be a DemoConfig, got {type(self.demo).__name__}")
        self.demo.validate()
        for name in ("steps", "batch_size", "eval_windows", "seed"):
            v, low = getattr(self, name), 0 if name == "seed" else 1
            if not isinstance(v, Integral) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("alpha", "paper_alpha", "paper_lr"):
            v = getattr(self, name)
            if not (isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        top = min(full_ranks(self.demo.model).values())
        for name in ("ranks", "paper_ranks", "lrs", "full_lrs"):
            v = getattr(self, name)
            kind = Integral if "ranks" in name else Real
            ok = isinstance(v, tuple) and v and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)
            if not ok or len(set(v)) != len(v) or list(v) != sorted(v) or v[0] <= 0:
                raise ValueError(f"{name} must be a non-empty tuple of distinct, increasing numbers > 0, got {v!r}")
            if "ranks" in name and v[-1] > top:
                raise ValueError(f"{name} must not exceed the full rank min(d_out, d_in) = {top} of the six "
                                 f"weights, got {v!r}")  # fmt: skip

    def to_dict(self):
        """The configuration as JSON-ready values: what the results file records and is checked by."""
        d = self.demo
        pretrain = {"key": d.pretrain_key(), "recipe": PRETRAIN_RECIPE, "steps": d.pretrain_steps, "lr": d.pretrain_lr,
                    "batch_size": d.batch_size, "n_lines": d.n_lines[0]}  # fmt: skip
        cfg = {k: v for k, v in vars(self).items() if k != "demo"}
        cfg.update(model=vars(d.model), pretrain=pretrain, data_seed=d.seed, finetune_lines=d.n_lines[1],
                   targets=list(LORA_TARGETS), bias="all", dtype="float32", lora_init="gaussian",
                   optimizer="AdamW, weight_decay 0, cosine schedule to 10%",
                   selection="lr by dev loss (first half of the validation sentences), reported on test (second half)",
                   )  # fmt: skip
        return json.loads(json.dumps(cfg))  # tuples become lists, as they will be after a round trip


@dataclass(frozen=True)
class Setup:
    """The frozen base (float32 Params) and the fine-tuning domain's streams: train, dev, test."""

    base: dict
    train_ids: np.ndarray
    dev_ids: np.ndarray
    test_ids: np.ndarray


def split_validation(val_ids):
    """The validation stream cut in two at the line break nearest its middle: (dev, test).
    Every sentence goes whole to one half."""
    newlines = np.flatnonzero(val_ids == 0)  # id 0 is "\n", the end of every line
    if len(newlines) < 2:
        raise ValueError(f"val_ids must hold at least two lines to split, got {len(newlines)} line breaks")
    cut = int(newlines[np.argmin(np.abs(newlines - val_ids.size // 2))]) + 1
    return val_ids[:cut], val_ids[cut:]


def prepare(cfg, cache_dir=DEFAULT_CACHE, log=print):
    """The demo's pretrained base (from the cache folder when it is there, else pretrained and
    saved) and the fine-tuning domain's train, dev and test streams."""
    cfg.validate()
    pre_train, _ = make_splits("pretrain", cfg.demo.n_lines[0], cfg.demo.seed)
    base, _ = pretrain_or_load(cfg.demo, pre_train, cache_dir, log)
    new_train, new_val = make_splits("finetune", cfg.demo.n_lines[1], cfg.demo.seed)
    dev, test = split_validation(new_val)
    return Setup(base, new_train, dev, test)


def _losses(setup, cfg, params, adapters=None, lora=None):
    T = cfg.demo.model.context_length
    return {half: float(evaluate(params, ids, adapters, lora, block_size=T, max_windows=cfg.eval_windows))
            for half, ids in (("dev", setup.dev_ids), ("test", setup.test_ids))}  # fmt: skip


def finetune(setup, cfg, kind, lr, r=None, rslora=True, log=print):
    """One fine-tuning run from the frozen base: cfg.steps of AdamW (no weight decay), float32.

    kind: "full" (every parameter), "span" (lora_span_names: what full-rank LoRA can change) or
    "lora" (all six weights at rank r, bias="all"; rslora: s = α/√r with cfg.alpha, else the
    paper's s = α/r with cfg.paper_alpha). Every run sees the same batches (seed cfg.seed + 1).

    Returns:
    - run: {"kind", "r", "lr", "rslora", "scaling", "dev", "test" (validation losses), "train_tail"
      (mean training loss of the last 10% of steps), "trainable" (numbers), "seconds"},
      and "params", "adapters" (not JSON: dropped before saving)
    """
    params = Params(setup.base.config, {k: v.copy() for k, v in setup.base.items()})  # biases train in place
    adapters = lora = None
    if kind == "lora":
        lora = LoraConfig(r=r, alpha=cfg.alpha if rslora else cfg.paper_alpha, targets=LORA_TARGETS, rslora=rslora)
        adapters = cast(init_lora(params.config, lora, cfg.seed), np.float32)
        names = trainable_names(params, adapters, lora, bias="all")
    elif kind == "span":
        names = lora_span_names(params)
    elif kind == "full":
        names = list(params)
    else:
        raise ValueError(f"kind must be 'full', 'span' or 'lora', got {kind!r}")
    arrays = {n: adapters[n] if adapters is not None and n in adapters else params[n] for n in names}
    t0 = time.perf_counter()
    label = f"{kind} r={r}" if kind == "lora" else kind
    hist = train(params, setup.train_ids, AdamW(arrays, lr=lr), adapters=adapters, lora=lora, trainable=names,
                 steps=cfg.steps, batch_size=cfg.batch_size, block_size=cfg.demo.model.context_length,
                 seed=cfg.seed + 1, log_every=0, label=label)  # fmt: skip
    losses = _losses(setup, cfg, params, adapters, lora)
    tail = max(1, cfg.steps // 10)
    run = {"kind": kind, "r": r, "lr": lr, "rslora": rslora if kind == "lora" else None,
           "scaling": lora.scaling if lora else None, **losses,
           "train_tail": float(np.mean(hist["loss"][-tail:])), "trainable": count_arrays(arrays),
           "seconds": time.perf_counter() - t0, "params": params, "adapters": adapters}  # fmt: skip
    log(f"  {label:<12} lr {lr:<7g} dev {losses['dev']:.4f} test {losses['test']:.4f}  "
        f"({run['trainable']:,} trainable, {run['seconds']:.1f}s)")  # fmt: skip
    return run


def _public(run):
    return {k: v for k, v in run.items() if k not in ("params", "adapters")}


def _best(runs):
    return min(runs, key=lambda run: run["dev"])  # ties: the first, the smallest lr


# ----------------------------------------------------------------------------
# 3. everything, and the results file


def truncation_curve(setup, cfg, tuned):
    """What rank r can keep of a fine-tuned model's change to the six weights: its ΔW truncated to
    its top r singular directions (svd_factors, as LoRA adapters), the biases and β taken from it.

    Returns:
    - {"ranks": [int], "test": [float, one a rank], "max_abs_logit_diff": float (LoRA at the top
       rank against `tuned` itself on dev windows), "singular_values": {name: [float]}}
    """
    base, T = setup.base, cfg.demo.model.context_length
    # the base with the tuned biases and β; the tuned weights come in as adapters
    vectors = {n for n in lora_span_names(base) if n.rsplit(".", 1)[-1] not in LORA_TARGETS}
    hybrid = Params(base.config, {k: tuned[k] if k in vectors else base[k] for k in base})
    test, diff = [], None
    for r in cfg.ranks:
        lora = LoraConfig(r=r, alpha=cfg.alpha, targets=LORA_TARGETS, rslora=True)
        adapters = adapters_from_delta(base, tuned, lora)
        test.append(_losses(setup, cfg, hybrid, adapters, lora)["test"])
        if r == cfg.ranks[-1]:
            x = setup.dev_ids[: (setup.dev_ids.size // T) * T].reshape(-1, T)[:16]  # (16, T)
            diff = float(np.abs(model_forward(hybrid, x, adapters, lora)[0] - model_forward(tuned, x)[0]).max())
    sv = {}
    for l in range(base.config.n_layers):
        for t in LORA_TARGETS:
            name = f"blocks.{l}.{t}"
            delta = tuned[name].astype(np.float64) - base[name].astype(np.float64)
            sv[name] = np.linalg.svd(delta, compute_uv=False).tolist()
    return {"ranks": list(cfg.ranks), "test": test, "max_abs_logit_diff": diff, "singular_values": sv}


def run_all(cfg=FullRankConfig(), cache_dir=DEFAULT_CACHE, log=print, setup=None):
    """Every run of the study; returns the results file's contents.

    Returns:
    - {"format_version", "config",
       "base": {"dev", "test"},
       "full", "span": {"grid": [run, one an lr], "best": run},
       "lora": [{"r": int, "grid": [run, one an lr], "best": run}, one a rank in cfg.ranks],
       "paper": [run, one a rank in cfg.paper_ranks]  (s = α/r, fixed lr),
       "truncation": truncation_curve of the best "span" run,
       "full_ranks": {target: min(d_out, d_in)}, "provenance"}
      with run = {"kind", "r", "lr", "rslora", "scaling", "dev", "test", "train_tail", "trainable", "seconds"}
    """
    cfg.validate()
    t0 = time.perf_counter()
    setup = setup if setup is not None else prepare(cfg, cache_dir, log)
    results = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "base": _losses(setup, cfg, setup.base),
               "full_ranks": full_ranks(setup.base.config)}  # fmt: skip
    span_best = None
    for kind in ("full", "span"):
        log(f"{kind} fine-tuning:")
        runs = [finetune(setup, cfg, kind, lr, log=log) for lr in cfg.full_lrs]
        best = _best(runs)
        if kind == "span":
            span_best = best
        results[kind] = {"grid": [_public(x) for x in runs], "best": _public(best)}
    log("LoRA on all six weights, bias=all, rsLoRA:")
    results["lora"], done = [], {}
    for r in cfg.ranks:
        runs = [finetune(setup, cfg, "lora", lr, r, log=log) for lr in cfg.lrs]
        done.update({(r, x["lr"], x["scaling"]): x for x in runs})
        results["lora"].append({"r": r, "grid": [_public(x) for x in runs], "best": _public(_best(runs))})
    log("LoRA with the paper's s = α/r at a fixed lr:")
    results["paper"] = []
    for r in cfg.paper_ranks:
        s = cfg.paper_alpha / r
        # the same r, lr and s as a run above (e.g. 4/4 = 2/√4): the same run, batch for batch; not run twice
        run = done.get((r, cfg.paper_lr, s)) or finetune(setup, cfg, "lora", cfg.paper_lr, r, rslora=False, log=log)
        results["paper"].append({**_public(run), "rslora": False, "reused": run["rslora"] is True})
    results["truncation"] = truncation_curve(setup, cfg, span_best["params"])
    results["provenance"] = {  # what the run was, not what it depends on
        "command": COMMAND,
        "base_fingerprint": fingerprint(setup.base),
        "seconds": round(time.perf_counter() - t0, 1),
        "numpy": np.__version__,
    }
    return results


EXPECTED_KEYS = ("base", "full", "span", "lora", "paper", "truncation", "full_ranks", "provenance")


def load_results(path=DEFAULT_RESULTS, cfg=FullRankConfig()):
    """The results file, after checking its format version, that its configuration is cfg's, and that
    every part is there. Raises ValueError saying what does not match and how to regenerate the file."""
    results, fix = read_checked(path, cfg.to_dict(), FORMAT_VERSION, COMMAND)
    missing = [k for k in EXPECTED_KEYS if k not in results]
    if missing:
        raise ValueError(f"{path} lacks {missing}; {fix}")
    ranks = [row["r"] for row in results["lora"]]
    if ranks != list(cfg.ranks):
        raise ValueError(f"{path} has LoRA rows for ranks {ranks}, the configuration says {list(cfg.ranks)}; {fix}")
    return results


def main(argv=None, prog="python -m lora_np fullrank"):
    """`python -m lora_np fullrank [--out FILE] [--cache-dir DIR] [--check] [--threads N]`."""

    def run(cache_dir, out):
        results = run_all(FullRankConfig(), cache_dir)
        return f"wrote {save_results(results, out)} ({results['provenance']['seconds']:.0f}s)"

    return results_command(
        argv, prog, "Rerun Section 4.1's 'generalization of full fine-tuning' study (LoRA on all six weights, "
        "r up to D, against full fine-tuning) behind notebooks/09_full_rank_and_serving.ipynb and write its "
        "results file (about 20 minutes on one core).",
        default_out=DEFAULT_RESULTS, default_cache=DEFAULT_CACHE, check=load_results, run=run,
        d_model=FullRankConfig().demo.model.d_model,
    )


if __name__ == "__main__":
    sys.exit(main())
