"""The demo's recipe, which every study on the demo task shares: the tiny GPT, its pretraining on
plain word order (cached by a key of everything it depends on), and fine-tuning on Yoda's order.

`python -m lora_np` (studies/demo.py) runs it and prints the table; Section 7, the successors,
the adapter baselines and full rank start from the same pretrained base.
"""

import hashlib
import time
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import numpy as np

from ..core.config import LoraConfig, ModelConfig, check_int
from ..core.lora import check_rank, trainable_adapters
from ..core.params import Params, cast, init_params
from ..methods.variants import init_adapters, lr_scales
from ..training.checkpoint import CheckpointError, load_params, save_params
from ..training.counting import count_arrays
from ..training.data import VOCAB, make_splits
from ..training.optim import AdamW
from ..training.train import evaluate, train

# What pretrain_or_load does beyond DemoConfig's fields. It is part of the cache key, so change it
# whenever the recipe changes (optimizer settings, warm-up, schedule, initialization, the grammar
# of data.py): a base pretrained by an older recipe is then never reused.
PRETRAIN_RECIPE = "v1: init_params; AdamW weight_decay 0.01; warmup min(50, steps // 10); cosine to 10%"


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo's numbers depend on; the defaults are the README's run."""

    steps: int = 300  # fine-tuning steps, the same for both methods
    pretrain_steps: int = 800
    rank: int = 4
    alpha: float = 4.0
    targets: tuple = ("W_q", "W_v")
    method: str = "lora"  # or one of LoRA's successors: "dora", "vera" (LoraConfig explains each), or the
    #                       paper's adapter baselines "adapter_h", "adapter_l" (rank = their bottleneck width)
    init: str = "gaussian"  # "pissa": A and B from W0's top singular triplets
    lr_ratio: float = 1.0  # LoRA+: B's learning rate over A's
    base_quant: str = None  # "nf4": QLoRA's 4-bit base
    double_quant: bool = False
    lr: float = 1e-2  # LoRA's learning rate: adapters start at zero and tolerate a large one
    full_lr: float = 1e-3  # full fine-tuning's: larger rates wreck the pretrained weights
    pretrain_lr: float = 3e-3
    seed: int = 0
    batch_size: int = 32
    # the model: 107,008 parameters, a few seconds per 100 steps on 2 cores
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            vocab_size=len(VOCAB), context_length=48, d_model=64, n_heads=4, n_layers=2, d_mlp=256
        )
    )
    n_lines: tuple = (6000, 3000)  # sentences generated for the pretraining and fine-tuning domains

    def lora(self):
        return LoraConfig(r=self.rank, alpha=self.alpha, targets=self.targets, method=self.method,
                          init=self.init, lr_ratio=self.lr_ratio, base_quant=self.base_quant,
                          double_quant=self.double_quant)  # fmt: skip

    def validate(self):
        """Raise the API's own errors for bad values, before any work is done."""
        for name in ("steps", "pretrain_steps", "seed", "batch_size"):
            check_int(name, getattr(self, name), 0 if name == "seed" else 1)
        for name in ("lr", "full_lr", "pretrain_lr"):
            v = getattr(self, name)
            if not (isinstance(v, Real) and not isinstance(v, bool) and np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        check_rank(self.model, self.lora())  # also validates r, alpha and targets

    def pretrain_key(self):
        """What the pretrained base depends on; the cache file is named by its hash."""
        fields = (
            PRETRAIN_RECIPE, self.model, self.pretrain_steps, self.pretrain_lr, self.seed, self.batch_size,
            self.n_lines[0],
        )  # fmt: skip
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


def cache_path(cfg, cache_dir):
    """The cache file of cfg's pretrained base in cache_dir: named by the hash of what it depends on."""
    return Path(cache_dir) / f"base-{cfg.pretrain_key()}.npz"


def pretrain_or_load(cfg, train_ids, cache_dir, log=print, reuse=True):
    """The pretrained base in float32: from the cache when a valid file is there (and reuse is
    True), else trained on train_ids and saved there.

    Returns:
    - params: Params, float32
    - seconds: pretraining time, or None when the cached model was reused
    """
    path = cache_path(cfg, cache_dir)
    if path.is_dir():  # found now, not when the minutes of pretraining are saved
        raise ValueError(f"the cache file {str(path)!r} is a folder; move it away")
    if reuse and path.exists():
        try:
            params = load_params(path)  # checks config, shapes and the stored fingerprint
            if params.config == cfg.model:
                log(f"reusing the pretrained base model in {path} (fingerprint checked)")
                return params, None
        except CheckpointError as e:
            log(f"ignoring the cached base model: {e}")
    params = cast(init_params(cfg.model, cfg.seed), np.float32)
    opt = AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.01)
    t0 = time.perf_counter()
    train(
        params, train_ids, opt, steps=cfg.pretrain_steps, batch_size=cfg.batch_size,
        block_size=cfg.model.context_length, seed=cfg.seed, warmup=min(50, cfg.pretrain_steps // 10),
        label="pretrain",
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    save_params(path, params)
    log(f"pretrained in {seconds:.1f}s, saved to {path}")
    return params, seconds


def finetune_full_and_lora(cfg=DemoConfig(), cache_dir="runs/demo/cache", log=print, reuse=True):
    """The demo's recipe: one pretrained base, fine-tuned on the new domain two ways.

    - the base: pretrain_or_load (reused from cache_dir when a file with the same pretraining
      settings is there, fingerprint checked);
    - full fine-tuning: a copy of every weight, all trainable, AdamW(cfg.full_lr, weight decay 0.01);
    - LoRA: W0 frozen, adapters from init_lora (B = 0, so step 0 is exactly the base model),
      AdamW(cfg.lr) on the adapters alone;
    - both call train with seed cfg.seed + 1, so step k of each sees the same batch.

    Returns a dict:
    - "config", "lora": the DemoConfig and its LoraConfig
    - "base", "full": Params, float32 (the pretrained base, untouched, and the fine-tuned copy)
    - "adapters": the trained A (r, d_in) and B (d_out, r), float32
    - "history": {"full", "lora"}: what train returns ("loss" per step, "time", ...)
    - "val": {"base" | "full" | "lora": {"new", "old"}}: validation cross-entropy (nats per
      character) on the fine-tuning domain and on the pretraining domain
    - "trainable", "state_bytes": {"full", "lora"}: trained numbers and AdamW state bytes
    - "total_params": every number of the model; "pretrain_seconds": float, or None if cached
    - "data": the four token streams {"pre_train", "pre_val", "new_train", "new_val"}
    """
    cfg.validate()
    T = cfg.model.context_length
    pre_train, pre_val = make_splits("pretrain", cfg.n_lines[0], cfg.seed)
    new_train, new_val = make_splits("finetune", cfg.n_lines[1], cfg.seed)
    base, pretrain_seconds = pretrain_or_load(cfg, pre_train, cache_dir, log, reuse=reuse)

    def losses(label, params, adapters=None, lora=None):
        return {
            "new": evaluate(params, new_val, adapters, lora, block_size=T, label=label),
            "old": evaluate(params, pre_val, adapters, lora, block_size=T, label=label),
        }

    val = {"base": losses("pretrain", base)}
    common = {"steps": cfg.steps, "batch_size": cfg.batch_size, "block_size": T, "seed": cfg.seed + 1}

    full = Params(base.config, {k: v.copy() for k, v in base.items()})
    opt_full = AdamW(full, lr=cfg.full_lr, weight_decay=0.01)
    hist_full = train(full, new_train, opt_full, label="full", **common)
    val["full"] = losses("full", full)

    lora = cfg.lora()
    # the base LoRA trains on: the pretrained one, or PiSSA's residual, or QLoRA's 4-bit copy of it
    lora_base, adapters = init_adapters(base, lora, cfg.seed)
    before = {k: np.array(v) for k, v in lora_base.items()}
    trained = {k: adapters[k] for k in trainable_adapters(adapters)}  # VeRA's shared matrices stay frozen
    opt_lora = AdamW(trained, lr=cfg.lr, lr_scale=lr_scales(adapters, lora) or None)  # LoRA+: B at λ·lr
    hist_lora = train(lora_base, new_train, opt_lora, adapters=adapters, lora=lora, label="lora", **common)
    changed = [k for k in lora_base if not np.array_equal(np.array(lora_base[k]), before[k])]
    if changed:  # LoRA's promise, checked on the run it reports (tests check it too)
        raise RuntimeError(f"LoRA training changed frozen weights {changed[:3]}")
    val["lora"] = losses("lora", lora_base, adapters, lora)

    return {
        "config": cfg,
        "lora": lora,
        "base": base,
        "lora_base": lora_base,
        "full": full,
        "adapters": adapters,
        "history": {"full": hist_full, "lora": hist_lora},
        "val": val,
        "trainable": {"full": count_arrays(full), "lora": count_arrays(trained)},
        "state_bytes": {"full": opt_full.state_bytes(), "lora": opt_lora.state_bytes()},
        "total_params": count_arrays(base),
        "pretrain_seconds": pretrain_seconds,
        "data": {"pre_train": pre_train, "pre_val": pre_val, "new_train": new_train, "new_val": new_val},
    }


def gap_closed(L_base, L_method, L_full):
    """(L_base - L_method) / (L_base - L_full): the share of full fine-tuning's gain the method
    gets. None when full fine-tuning did not move the loss (e.g. a learning rate so small that no
    float32 weight changed): the ratio is then undefined, not a crash after the work is done."""
    if L_base == L_full:
        return None
    return (L_base - L_method) / (L_base - L_full)


def method_label(lora):
    """A short name for the adapter method, e.g. "LoRA r=4", "DoRA r=4", "LoRA+ r=4 λ=16", "QLoRA r=4"."""
    names = {"lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "adapter_h": "AdapterH", "adapter_l": "AdapterL"}
    name = names[lora.method]
    if lora.base_quant == "nf4":
        name = "QLoRA"
    if lora.init == "pissa":
        name = "PiSSA"
    if lora.lr_ratio != 1.0:
        return f"{name}+ r={lora.r} λ={lora.lr_ratio:g}"
    return f"{name} r={lora.r}"

