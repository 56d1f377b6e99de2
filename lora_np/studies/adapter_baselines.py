"""The adapter baselines against LoRA: quality on the demo task and Table 1's latency (notebook 08's numbers).

`python -m lora_np adapters`, run in notebooks/ (or with --out), writes the results file notebook 08 reads. The layers themselves are
lora_np.methods.adapters; the latency measurement is lora_np.studies.latency.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..training.checkpoint import write_atomic
from ..training.threads import add_threads_flag, apply_threads
from .cli import Parser, check_out_dir, check_out_file, fail, lock_output
from .latency import LATENCY_MODEL, latency_table, measure_latency
from .recipe import DemoConfig
from .results import check_command, read_checked, read_json_object
from .successors import (
    SuccessorsConfig,
    compare_methods,
)

# ----------------------------------------------------------------------------
# quality on the demo task, beside LoRA and full fine-tuning (notebook 08 reads the file)

DEFAULT_RESULTS = Path("adapters_results.json")  # in the current folder; the notebooks run beside theirs
DEFAULT_CACHE = "runs/demo/cache"
FORMAT_VERSION = 1
COMMAND = "python -m lora_np adapters"
# label -> LoraConfig fields (None: full fine-tuning). r = 4 for all: LoRA's rank on W_q, W_v, and the
# adapters' bottleneck width; at the demo's D = 64 that gives 2,048, 2,320 and 1,416 trainable numbers.
QUALITY_METHODS = {
    "full fine-tuning": None,
    "LoRA (W_q, W_v)": {},
    "AdapterH": {"method": "adapter_h"},
    "AdapterL": {"method": "adapter_l"},
}
QUALITY_SEEDS = (0, 1, 2)


def _quality_config():
    d = DemoConfig()
    return {"seeds": list(QUALITY_SEEDS), "steps": d.steps, "rank": d.rank, "lr": d.lr, "full_lr": d.full_lr,
            "batch_size": d.batch_size, "pretrain_key": d.pretrain_key(), "model": vars(d.model),
            "methods": QUALITY_METHODS}  # fmt: skip


def compare_on_demo(cache_dir=DEFAULT_CACHE, log=print):
    """Full fine-tuning, LoRA, AdapterH and AdapterL on the demo task, for each seed of QUALITY_SEEDS.

    The runs of lora_np.studies.successors.compare_methods: the demo's pretrained base (reused from
    cache_dir), the Yoda-order domain, AdamW, the demo's steps and batches (the same for every method
    at a seed), the demo's learning rate for LoRA and for both adapters alike (tuned for none of
    them). Returns a JSON-ready dict: "config", "base" (val losses {"new", "old"}) and "runs":
    {label: [one row a seed]}, each row with "new", "old", "gap_closed" (against the full
    fine-tuning run of the same seed), "trainable", "optimizer_state_bytes", "seconds".
    """
    t_start = time.perf_counter()
    _, out = compare_methods(SuccessorsConfig(seeds=QUALITY_SEEDS), QUALITY_METHODS, cache_dir, log)
    results = {"format_version": FORMAT_VERSION, "config": _quality_config(), **out}
    results["provenance"] = {"command": COMMAND, "seconds": round(time.perf_counter() - t_start, 1),
                             "numpy": np.__version__}  # fmt: skip
    return results


def load_results(path=DEFAULT_RESULTS, need_latency=True):
    """The results file, after checking that its quality runs were made with the code's configuration
    and that it holds a latency measurement (lora_np.studies.latency). ValueError says how to remake it."""
    results, fix = read_checked(path, json.loads(json.dumps(_quality_config())), FORMAT_VERSION, COMMAND)
    runs = results.get("runs")
    if not isinstance(runs, dict) or set(runs) != set(QUALITY_METHODS) or (need_latency and "latency" not in results):
        raise ValueError(f"{path} does not hold every method of {list(QUALITY_METHODS)} and a latency run; {fix}")
    return results


def main(argv=None, prog="python -m lora_np adapters"):
    """Write notebook 08's results file: the quality runs (minutes) and the latency measurement."""
    p = Parser(
        prog=prog,
        description="AdapterH and AdapterL against LoRA on the demo task (quality over seeds) "
        "and on lora_np's forward (latency): the results file notebook 08 reads.",
    )
    p.add_argument("--out", default=str(DEFAULT_RESULTS), help=f"results file (default {DEFAULT_RESULTS})")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"the pretrained base's cache (default {DEFAULT_CACHE})")
    p.add_argument("--only", choices=("quality", "latency"), default=None,
                   help="redo one part and keep the other from the existing file (default: both)")  # fmt: skip
    p.add_argument("--check", action="store_true", help="only check that the results file fits the code")
    add_threads_flag(p)
    a = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if a.check:
        return check_command(a.out, load_results)
    try:  # before minutes of training, not after
        out = check_out_file("--out", a.out)
        check_out_dir("--cache-dir", a.cache_dir)
    except ValueError as e:
        fail(prog, str(e))
    with lock_output(prog, out):  # held from before the first check of the kept part to the write
        kept = {}
        if a.only is not None:
            try:  # the part --only keeps, checked now: not after minutes of work
                kept = kept_part(out, a.only)
            except ValueError as e:
                fail(prog, str(e))
        apply_threads(a.threads, LATENCY_MODEL.d_model)  # the policy: one thread below d_model 512, as the demo's
        results = compare_on_demo(a.cache_dir) if a.only != "latency" else kept
        if a.only == "quality":
            results["latency"] = kept["latency"]
        else:
            results["latency"] = measure_latency(log=print)
            print(latency_table(results["latency"]))
        text = (json.dumps(results, indent=1) + "\n").encode()
        write_atomic(out, lambda f: f.write(text))
    print(f"wrote {out}")
    return 0


def kept_part(path, only):
    """What `adapters --only ONLY` keeps from the existing results file: its latency measurement
    (only = "quality") or its quality runs, checked against the code's configuration (only =
    "latency"). ValueError naming the file and what it lacks, so that nothing is redone in vain."""
    fix = f"run `{COMMAND}` without --only"
    if only == "latency":
        results = load_results(path, need_latency=False)
        return {k: v for k, v in results.items() if k != "latency"}
    results = read_json_object(path, f"--only {only} keeps its latency measurement; {fix}")
    latency = results.get("latency")
    if not isinstance(latency, dict) or not latency:
        raise ValueError(f"{path} holds no latency measurement for --only {only} to keep; {fix}")
    return {"latency": latency}


if __name__ == "__main__":
    sys.exit(main())
