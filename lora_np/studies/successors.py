"""LoRA's successors on the demo task, beside LoRA and full fine-tuning, over several seeds.

The demo's recipe (lora_np.studies.recipe: the same pretrained base, the Yoda-order domain, AdamW, the
same batches for every method at a given seed) run once per method and seed:

    full fine-tuning, LoRA, LoRA+ (λ = 16), PiSSA, DoRA, VeRA, QLoRA (NF4, and NF4 with
    double quantization)

each recording the validation loss on the new domain and the old one, the gap closed
(L_base - L_method) / (L_base - L_full) against the full fine-tuning run of the same seed, the
trainable numbers, the optimizer state and the time (evaluations included). L_base is the
float32 base for every method; QLoRA starts from its 4-bit copy, whose own loss ("start") is
recorded beside it. Notebook 07 reads the results; the 24 runs take a few minutes on one idle
core, too long for a notebook, so they are kept in notebooks/successors_results.json,
rewritten by one command, run in notebooks/ (the file goes to the current folder, or to --out;
OPENBLAS_NUM_THREADS=1 on a shared machine):

    cd notebooks && python -m lora_np successors

`load_results` refuses a file whose configuration is not the code's.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import LoraConfig
from ..core.lora import trainable_adapters
from ..core.params import Params
from ..methods.variants import init_adapters, lr_scales
from ..training.checkpoint import fingerprint, write_atomic
from ..training.counting import count_arrays
from ..training.data import make_splits
from ..training.optim import AdamW
from ..training.train import evaluate, train
from .cli import results_command
from .recipe import DemoConfig, gap_closed, pretrain_or_load
from .results import read_checked

DEFAULT_RESULTS = Path("successors_results.json")  # in the current folder; the notebooks run beside theirs
DEFAULT_CACHE = "runs/demo/cache"
FORMAT_VERSION = 1

# label -> the LoraConfig fields that make the method (None: full fine-tuning). Rank 4 on W_q, W_v
# as the demo, except VeRA, whose vectors are r + d_out numbers a weight: at the demo's r = 4 it
# would train 68 numbers a matrix, so it gets r = 64, the largest rank lora_np's check_rank accepts
# on the 64-wide model. That cap is lora_np's, not VeRA's: VeRA's r is the length of lambda_d and may
# exceed min(d_out, d_in) (methods/vera.py), and PEFT's VeraConfig defaults to r = 256, advising
# "higher values than LoRA ranks" (it points to the paper's Table 1).
METHODS = {
    "full fine-tuning": None,
    "LoRA": {},
    "LoRA+ (λ = 16)": {"lr_ratio": 16.0},
    "PiSSA": {"init": "pissa"},
    "DoRA": {"method": "dora"},
    "VeRA (r = 64)": {"method": "vera", "r": 64},
    "QLoRA (NF4)": {"base_quant": "nf4"},
    "QLoRA (NF4, double quant)": {"base_quant": "nf4", "double_quant": True},
}


@dataclass(frozen=True)
class SuccessorsConfig:
    seeds: tuple = (0, 1, 2)  # batches and adapter draws; the base is the demo's (seed 0)
    steps: int = 300  # the demo's fine-tuning steps
    rank: int = 4
    alpha: float = 4.0
    targets: tuple = ("W_q", "W_v")
    demo: DemoConfig = field(default_factory=DemoConfig)

    def lora(self, fields):
        kw = {"r": self.rank, "alpha": self.alpha, "targets": self.targets, **fields}
        if kw.get("method") == "vera":
            kw["alpha"] = float(kw["r"])  # VeRA has no scaling; alpha is unused, kept = r for the record
        return LoraConfig(**kw)

    def to_dict(self):
        d = asdict(self)
        d["demo"] = {"lr": self.demo.lr, "full_lr": self.demo.full_lr, "batch_size": self.demo.batch_size,
                     "pretrain_key": self.demo.pretrain_key(), "model": asdict(self.demo.model)}  # fmt: skip
        d["methods"] = {k: v for k, v in METHODS.items()}
        return json.loads(json.dumps(d))


def compare_methods(cfg, methods, cache_dir=DEFAULT_CACHE, log=print):
    """Full fine-tuning and every method of `methods` on the demo task, at every seed of cfg.seeds.

    Inputs:
    - cfg: SuccessorsConfig (seeds, steps, rank, alpha, targets, and the demo's recipe)
    - methods: {label: the LoraConfig fields that make the method, as cfg.lora takes them, or None
      for full fine-tuning}; one label must be "full fine-tuning", the gap's far end

    Returns (base, {"base": {"new", "old"}, "runs": {label: [one row a seed]}}): the pretrained base,
    its validation losses on the new and the old domain, and for each run "new", "old", "start" (the
    method's loss on the new domain at step 0: the base, or its NF4 copy), "gap_closed" (against the
    full fine-tuning run of the same seed), "trainable", "optimizer_state_bytes", "seed", "seconds".
    """
    d = cfg.demo
    T = d.model.context_length
    pre_train, pre_val = make_splits("pretrain", d.n_lines[0], d.seed)
    new_train, new_val = make_splits("finetune", d.n_lines[1], d.seed)
    base, _ = pretrain_or_load(d, pre_train, cache_dir, log)

    def losses(params, adapters=None, lora=None):
        return {"new": evaluate(params, new_val, adapters, lora, block_size=T),
                "old": evaluate(params, pre_val, adapters, lora, block_size=T)}  # fmt: skip

    out = {"base": losses(base), "runs": {}}
    for label, fields in methods.items():
        rows = []
        for seed in cfg.seeds:
            common = {"steps": cfg.steps, "batch_size": d.batch_size, "block_size": T, "seed": seed + 1,
                      "log_every": 0, "label": label}  # fmt: skip
            t0 = time.perf_counter()
            if fields is None:
                params = Params(base.config, {k: v.copy() for k, v in base.items()})
                opt = AdamW(params, lr=d.full_lr, weight_decay=0.01)
                train(params, new_train, opt, **common)
                row = {**losses(params), "trainable": count_arrays(params), "start": out["base"]["new"]}
            else:
                lora = cfg.lora(fields)
                start, adapters = init_adapters(base, lora, seed)
                trained = {k: adapters[k] for k in trainable_adapters(adapters)}
                opt = AdamW(trained, lr=d.lr, lr_scale=lr_scales(adapters, lora) or None)
                start_loss = losses(start, adapters, lora)["new"]  # the method's step 0: the base, or its NF4 copy
                train(start, new_train, opt, adapters=adapters, lora=lora, **common)
                row = {**losses(start, adapters, lora), "trainable": count_arrays(trained), "start": start_loss}
            row.update(seed=seed, seconds=time.perf_counter() - t0, optimizer_state_bytes=opt.state_bytes())
            rows.append(row)
            log(f"  {label:<28} seed {seed}: val new {row['new']:.4f}  old {row['old']:.4f}  "
                f"({row['trainable']:,} trainable, {row['seconds']:.1f}s)")  # fmt: skip
        out["runs"][label] = rows
    full = {r["seed"]: r["new"] for r in out["runs"]["full fine-tuning"]}
    L0 = out["base"]["new"]
    for rows in out["runs"].values():
        for r in rows:
            r["gap_closed"] = gap_closed(L0, r["new"], full[r["seed"]])  # None if full fine-tuning did not move
    return base, out


def run_all(cfg=SuccessorsConfig(), cache_dir=DEFAULT_CACHE, log=print):
    """Every method of METHODS at every seed; returns the results file's contents."""
    t_start = time.perf_counter()
    base, out = compare_methods(cfg, METHODS, cache_dir, log)
    results = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), **out}
    results["provenance"] = {"command": "python -m lora_np successors", "base_fingerprint": fingerprint(base),
                             "seconds": round(time.perf_counter() - t_start, 1), "numpy": np.__version__}  # fmt: skip
    return results


def load_results(path=DEFAULT_RESULTS, cfg=SuccessorsConfig()):
    """The results file, after checking its format version and that its configuration is cfg's."""
    results, fix = read_checked(path, cfg.to_dict(), FORMAT_VERSION, "python -m lora_np successors")
    if set(results.get("runs", {})) != set(METHODS):
        raise ValueError(f"{path} does not hold a run of every method in {list(METHODS)}; {fix}")
    return results


def main(argv=None, prog="python -m lora_np successors"):
    """`python -m lora_np successors [--out FILE] [--cache-dir DIR] [--check] [--threads N]`."""

    def run(cache_dir, out):
        results = run_all(SuccessorsConfig(), cache_dir)
        text = (json.dumps(results, indent=1) + "\n").encode()
        write_atomic(out, lambda f: f.write(text))
        return f"wrote {out} ({results['provenance']['seconds']:.0f}s)"

    return results_command(
        argv, prog, "Run LoRA's successors on the demo task over several seeds and write the results file "
        "notebook 07 reads (a few minutes).",
        default_out=DEFAULT_RESULTS, default_cache=DEFAULT_CACHE, check=load_results, run=run,
        d_model=SuccessorsConfig().demo.model.d_model,
    )


if __name__ == "__main__":
    sys.exit(main())
