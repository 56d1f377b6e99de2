"""Section 7 on the tiny GPT, its setup: the configuration every number depends on, the pretrained
bases, and one fine-tuning run. The experiments themselves, and their results file, are
studies/experiments.py (`python -m lora_np experiments`).
"""

import json
import math
import time
from dataclasses import dataclass, field, replace
from numbers import Integral, Real

import numpy as np

from ..core.config import LoraConfig
from ..core.lora import init_lora
from ..core.params import cast
from ..training.counting import count_arrays
from ..training.data import make_splits
from ..training.optim import AdamW
from ..training.train import evaluate, train
from .recipe import PRETRAIN_RECIPE, DemoConfig, pretrain_or_load

DEFAULT_CACHE = "runs/demo/cache"  # where the demo keeps its pretrained bases


ATTENTION = ("W_q", "W_k", "W_v", "W_o")


# Table 5's columns, in the paper's order; then the MLP, which the paper leaves to future work
BUDGET_SETS = (("W_q",), ("W_k",), ("W_v",), ("W_o",), ("W_q", "W_k"), ("W_q", "W_v"), ATTENTION)


MLP_SETS = (("W_1",), ("W_2",), ("W_1", "W_2"))


# Table 6's rows
SWEEP_SETS = (("W_q",), ("W_q", "W_v"), ATTENTION)


# Figures 3, 4 and Table 7 read the adapters of the {W_q, W_v} runs, as the paper does
ANALYSIS_TARGETS = ("W_q", "W_v")


WEIGHT_TARGET = "W_q"  # Figure 8 is W_q's


@dataclass(frozen=True)
class Section7Config:
    """Everything the numbers depend on. The defaults are the committed results file's."""

    demo: DemoConfig = field(default_factory=DemoConfig)  # model, pretraining, data: the demo's (seed: base_seeds[0])
    base_seeds: tuple = (0, 1, 2)  # full replicates: base b is the demo's recipe with seed b (0 is the demo's own)
    steps: int = 200  # fine-tuning steps per run; the loss is still creeping down, but slowly
    batch_size: int = 16  # half the demo's: 2.5x faster a step here, for a loss ~0.003 higher
    lr: float = 1e-2  # AdamW, cosine decay to 10%; the demo's LoRA rate
    alpha: float = 4.0  # fixed for every r, so s = α/r falls as r grows (paper Section 4.1)
    seeds: tuple = (0, 1, 2)  # fine-tuning seeds on every base: batch order, and with the rank A's init
    budget_rank: int = 8  # the rank that spends the whole budget on one D x D matrix
    ranks: tuple = (1, 2, 4, 8, 64)  # Table 6's
    subspace_ranks: tuple = (8, 64)  # Figure 3's small and large rank; Figure 4 uses the large
    corner: int = 16  # the r=64 maps are kept for their top corner x corner directions only (file size)
    eval_windows: int = 256  # validation windows of T tokens (the demo's split has ~190: all of it)
    random_seed: int = 0  # the random Gaussian matrices of Figures 4, 8 and Table 7
    random_draws: int = 10  # Table 7's "Random" column: mean over this many random matrices

    def validate(self):
        """Raise a clear error for a bad value, before any training."""
        if not isinstance(self.demo, DemoConfig):
            raise TypeError(f"demo must be a DemoConfig, got {type(self.demo).__name__}")
        self.demo.validate()
        for name in ("steps", "batch_size", "budget_rank", "corner", "eval_windows", "random_draws", "random_seed"):
            v, low = getattr(self, name), 0 if name == "random_seed" else 1
            if not isinstance(v, Integral) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("lr", "alpha"):
            v = getattr(self, name)
            if not (isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        D = self.demo.model.d_model
        for name in ("base_seeds", "seeds", "ranks", "subspace_ranks"):
            v = getattr(self, name)
            ok = isinstance(v, tuple) and v and all(isinstance(x, Integral) and not isinstance(x, bool) for x in v)
            if not ok or len(set(v)) != len(v) or list(v) != sorted(v) or v[0] < (1 if "ranks" in name else 0):
                raise ValueError(f"{name} must be a non-empty tuple of distinct, increasing ints, got {v!r}")
        if self.demo.seed != self.base_seeds[0]:
            raise ValueError(f"demo.seed must be base_seeds[0] (the bases' seeds are base_seeds), "
                             f"got demo.seed={self.demo.seed!r} and base_seeds={self.base_seeds!r}")  # fmt: skip
        if len(self.seeds) < 2:
            raise ValueError(f"seeds needs at least two seeds (Figure 4 compares two runs), got {self.seeds!r}")
        if self.ranks[-1] > D:
            raise ValueError(f"ranks must not exceed d_model = {D}, got {self.ranks!r}")
        if len(self.subspace_ranks) != 2 or not set(self.subspace_ranks) <= set(self.ranks):
            raise ValueError(f"subspace_ranks must be two of ranks {self.ranks}, got {self.subspace_ranks!r}")
        if not self.subspace_ranks[0] <= self.corner <= self.subspace_ranks[1]:
            raise ValueError(
                f"corner must lie between the two subspace_ranks {self.subspace_ranks}, got {self.corner!r}"
            )
        if self.budget_rank % len(ATTENTION) or self.budget_rank > D:
            raise ValueError(
                f"budget_rank must be a multiple of 4 (so 1, 2 and 4 attention matrices split it exactly) "
                f"and at most d_model = {D}, got {self.budget_rank!r}"
            )

    def base_config(self, base_seed):
        """The demo's configuration that pretrains base `base_seed` (and generates its data)."""
        return replace(self.demo, seed=base_seed)

    def to_dict(self):
        """The configuration as JSON-ready values: what the results file records and is checked by."""
        d = self.demo
        pretrain = {"keys": [self.base_config(b).pretrain_key() for b in self.base_seeds], "recipe": PRETRAIN_RECIPE,
                    "steps": d.pretrain_steps, "lr": d.pretrain_lr, "batch_size": d.batch_size,
                    "n_lines": d.n_lines[0]}  # fmt: skip
        cfg = {k: v for k, v in vars(self).items() if k != "demo"}
        cfg.update(model=vars(d.model), pretrain=pretrain, finetune_lines=d.n_lines[1], dtype="float32",
                   optimizer="AdamW, weight_decay 0, cosine schedule to 10%",
                   lora_init="gaussian, A from init_seed(seed, r)")  # fmt: skip
        return json.loads(json.dumps(cfg))  # tuples become lists, as they will be after a round trip


def init_seed(seed, r):
    """The seed init_lora draws A from in a run with fine-tuning seed `seed` at rank r.

    One stream per (seed, r) (NumPy's SeedSequence keeps streams of different keys independent),
    so the r = 8 and r = 64 adapters of one seed start from unrelated random A. init_lora draws the
    adapted weights' A in a fixed order from one stream, so with the bare seed the first one drawn
    (blocks.0.W_q.A) would start at r = 8 as exactly the first 8 rows of its r = 64 start, a
    similarity Figure 3 would then report as learned.
    """
    return int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


@dataclass(frozen=True)
class Setup:
    """One replicate: its frozen base (float32 Params) and its fine-tuning domain's token streams."""

    seed: int  # the base seed (pretraining and data)
    base: dict
    train_ids: np.ndarray
    val_ids: np.ndarray


def prepare(cfg, cache_dir=DEFAULT_CACHE, log=print):
    """One Setup a base seed: the demo's pretrained base with that seed (from the cache folder when
    it is there, else pretrained and saved: ~1 min each on one core) and its fine-tuning domain's
    train / validation streams. Returns a tuple of Setup, in the order of cfg.base_seeds."""
    cfg.validate()
    setups = []
    for b in cfg.base_seeds:
        demo = cfg.base_config(b)
        pre_train, _ = make_splits("pretrain", demo.n_lines[0], b)
        base, _ = pretrain_or_load(demo, pre_train, cache_dir, log)
        new_train, new_val = make_splits("finetune", demo.n_lines[1], b)
        setups.append(Setup(b, base, new_train, new_val))
    return tuple(setups)


def val_loss(setup, cfg, adapters=None, lora=None):
    """Mean cross-entropy (nats a character) on the fine-tuning domain's validation windows."""
    T = cfg.demo.model.context_length
    return float(evaluate(setup.base, setup.val_ids, adapters, lora, block_size=T, max_windows=cfg.eval_windows))


def initial_adapters(setup_or_model, cfg, targets, r, a_seed):
    """The adapters a run starts from: init_lora with A's seed a_seed, in float32 (B = 0)."""
    model = setup_or_model.base.config if isinstance(setup_or_model, Setup) else setup_or_model
    lora = LoraConfig(r=r, alpha=cfg.alpha, targets=tuple(targets))
    return cast(init_lora(model, lora, a_seed), np.float32), lora


def finetune(setup, cfg, targets, r, seed, memo=None, log=print, a_seed=None):
    """LoRA on `targets` at rank r from setup's frozen base: cfg.steps of AdamW, float32.

    `seed` orders the batches (train), so runs with the same seed on one base see the same batches
    whatever they adapt: a paired comparison. A is drawn with a_seed, by default init_seed(seed, r),
    independent for each rank. With a memo dict, a run already done is returned from it; a memo
    belongs to one cfg, as in run_all.

    Returns:
    - run: {"adapters": dict name -> float32 array, "lora": LoraConfig, "val_loss": float,
      "trainable": int}
    """
    a_seed = init_seed(seed, r) if a_seed is None else a_seed
    key = (setup.seed, tuple(targets), int(r), int(seed), int(a_seed))
    if memo is not None and key in memo:
        return memo[key]
    adapters, lora = initial_adapters(setup, cfg, targets, r, a_seed)
    t0 = time.perf_counter()
    train(setup.base, setup.train_ids, AdamW(adapters, lr=cfg.lr), adapters=adapters, lora=lora, steps=cfg.steps,
          batch_size=cfg.batch_size, block_size=cfg.demo.model.context_length, seed=seed, log_every=0,
          label=f"{','.join(targets)} r={r}")  # fmt: skip
    run = {"adapters": adapters, "lora": lora, "val_loss": val_loss(setup, cfg, adapters, lora),
           "trainable": count_arrays(adapters)}  # fmt: skip
    shared = "" if a_seed == init_seed(seed, r) else f", A seed {a_seed}"
    log(f"  base {setup.seed} {','.join(targets):<20} r={r:<3} seed {seed}{shared}: val loss {run['val_loss']:.4f}  "
        f"({run['trainable']:,} trainable, {time.perf_counter() - t0:.1f}s)")  # fmt: skip
    if memo is not None:
        memo[key] = run
    return run


def ready(cfg, setups, cache_dir, log):
    cfg.validate()
    return setups if setups is not None else prepare(cfg, cache_dir, log)

