"""The demo behind `python -m lora_np`: pretrain, then fine-tune two ways, side by side.

1. Pretrain a tiny GPT on plain word order ("the quick fox chases a red ball."), or reuse
   the base model a previous run saved in the cache folder (its fingerprint checked).
2. Fine-tune on Yoda's word order ("a red ball, the quick fox chases.") from the same
   weights and with the same batches, twice: every weight (full fine-tuning), and LoRA.
3. Report trainable parameters, optimizer state, file sizes, validation loss on the new
   domain and on the old one (what was forgotten), time, samples, and the merge check.
"""

import hashlib
import json
import time
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, load_params, save_adapters, save_params, write_atomic
from .cli import check_out_dir
from .config import ADAPTER_METHODS, LoraConfig, ModelConfig, check_int
from .counting import count_arrays
from .data import VOCAB, decode, encode, eval_windows, make_splits
from .lora import check_rank, merge, trainable_adapters
from .model import model_forward
from .optim import AdamW
from .params import Params, cast, init_params
from .train import evaluate, generate, train
from .variants import init_adapters, lr_scales

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


def pretrain_or_load(cfg, train_ids, cache_dir, log=print, reuse=True):
    """The pretrained base in float32: from the cache when a valid file is there (and reuse is
    True), else trained on train_ids and saved there.

    Returns:
    - params: Params, float32
    - seconds: pretraining time, or None when the cached model was reused
    """
    path = Path(cache_dir) / f"base-{cfg.pretrain_key()}.npz"
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


def run(cfg=DemoConfig(), out_dir="runs/demo", use_cache=True, log=print):
    """Run the demo; returns a dict of every number it reports (also written to results.json).

    Files in out_dir: cache/base-<key>.npz (the pretrained base, reused by later runs with
    the same pretraining settings), base.npz, full_finetuned.npz, adapter.npz, results.json.
    A run that diverges raises TrainingDiverged before writing any of its results.
    """
    cfg.validate()
    out_dir = check_out_dir("out_dir", out_dir)  # before any work: a bad path is refused, not found at the end
    check_out_dir("out_dir's cache folder", out_dir / "cache")
    runs = finetune_full_and_lora(cfg, out_dir / "cache", log, reuse=use_cache)  # may raise TrainingDiverged
    base, full, adapters, lora, val = runs["base"], runs["full"], runs["adapters"], runs["lora"], runs["val"]
    lora_base = runs["lora_base"]  # the base the adapters were trained on (PiSSA's residual, QLoRA's 4-bit copy)
    T = cfg.model.context_length
    rows = {"base": dict(val["base"])}
    for k in ("full", "lora"):
        rows[k] = {
            **val[k],
            "seconds": runs["history"][k]["time"][-1],
            "trainable": runs["trainable"][k],
            "state": runs["state_bytes"][k],
        }
    new_val = runs["data"]["new_val"]

    # merge check: W' = W0 + s·B·A as a plain model against the unmerged adapters
    x, _ = eval_windows(new_val, T, 16)
    merge_diff = None  # adapter layers cannot be merged (lora_np.adapters): nothing to check
    if lora.method not in ADAPTER_METHODS:
        merged = merge(lora_base, adapters, lora)
        unmerged_logits, _ = model_forward(lora_base, x, adapters, lora)
        merged_logits, _ = model_forward(merged, x)
        merge_diff = float(np.abs(merged_logits - unmerged_logits).max())

    prompt = encode("the ")
    samples = {
        "base": decode(generate(base, prompt, 120, seed=cfg.seed)),
        "full": decode(generate(full, prompt, 120, seed=cfg.seed)),
        "lora": decode(generate(lora_base, prompt, 120, adapters, lora, seed=cfg.seed)),
    }
    # Everything is computed; only now are files written, so a run that fails writes none of them.
    out_dir.mkdir(parents=True, exist_ok=True)
    rows["full"]["file"] = save_params(out_dir / "full_finetuned.npz", full).stat().st_size
    rows["lora"]["file"] = save_adapters(out_dir / "adapter.npz", adapters, lora, lora_base).stat().st_size
    rows["base"]["file"] = save_params(out_dir / "base.npz", base).stat().st_size
    results = {
        "config": {**{k: v for k, v in vars(cfg).items() if k != "model"}, "model": vars(cfg.model)},
        "total_params": runs["total_params"],
        "pretrain_seconds": runs["pretrain_seconds"],
        "rows": rows,
        "gap_closed": gap_closed(rows["base"]["new"], rows["lora"]["new"], rows["full"]["new"]),
        "fewer_params": rows["full"]["trainable"] / rows["lora"]["trainable"],
        "merge_max_abs_diff": merge_diff,
        "samples": samples,
    }
    text = json.dumps(results, indent=1, default=str).encode()
    write_atomic(out_dir / "results.json", lambda f: f.write(text))
    log(report(results, cfg))
    return results


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


def report(res, cfg):
    """The demo's table and notes, as text."""
    rows, n = res["rows"], res["total_params"]
    targets = ",".join(cfg.lora().targets)  # () for the adapter baselines, which adapt no weight
    head = (
        f"{'method':<26}{'trainable':>11}{'share':>8}{'optim state':>13}{'file':>11}"
        f"{'val new':>9}{'val old':>9}{'time':>8}"
    )
    lines = [head, "-" * len(head)]
    lora_row = f"{method_label(cfg.lora())} {targets}".rstrip()  # no targets: an adapter baseline
    names = {"base": "pretrained base", "full": "full fine-tuning", "lora": lora_row}
    for key in ("base", "full", "lora"):
        r = rows[key]
        t = res["pretrain_seconds"] if key == "base" else r["seconds"]
        time_s = "cached" if t is None else f"{t:.1f}s"
        if key == "base":
            cells = f"{'-':>11}{'-':>8}{'-':>13}"
        else:
            cells = f"{r['trainable']:>11,}{r['trainable'] / n:>8.2%}{r['state'] / 1024:>10.1f}KiB"
        lines.append(f"{names[key]:<26}{cells}{r['file'] / 1024:>8.1f}KiB{r['new']:>9.4f}{r['old']:>9.4f}{time_s:>8}")
    ratio = "(L_base - L_lora) / (L_base - L_full)"
    if res["gap_closed"] is None:
        gap = f"LoRA's share of the gap {ratio} is undefined: full fine-tuning did not move the loss"
    else:
        who = method_label(cfg.lora()) if cfg.lora().method in ADAPTER_METHODS else "LoRA"
        gap = f"{who} closes {res['gap_closed']:.1%} of the gap {ratio}"
    lines += [
        "",
        "val new: validation loss on the fine-tuning domain (Yoda order); val old: on the pretraining domain.",
        f"{gap}, with {res['fewer_params']:.1f}x fewer trainable parameters.",
        f"merged (W0 + s·B·A) vs unmerged LoRA logits, float32: max |difference| = {res['merge_max_abs_diff']:.2e}"
        if res["merge_max_abs_diff"] is not None
        else "adapter layers cannot be merged into the weights: inference runs them (the latency of Table 1)",
        "",
        "samples from the prompt 'the ':",
    ]
    for key in ("base", "full", "lora"):
        text = res["samples"][key].split("\n")
        lines.append(f"  {names[key]}:")
        lines += [f"    {line}" for line in text[:3]]
    return "\n".join(lines)
