"""Section 4.2 measured: one mixed batch served unmerged against one merged model per task (notebook 09).

`python -m lora_np serving`, run in notebooks/ (or with --out), writes the results file notebook 09 reads. The technique itself is
lora_np.methods.serving.
"""

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from numbers import Integral
from pathlib import Path

import numpy as np

from ..core.config import LoraConfig
from ..core.lora import init_lora, merge
from ..core.params import cast, init_params
from ..methods.serving import STRATEGIES, adapter_bank, merged_forward, multi_lora_forward
from ..training.checkpoint import write_atomic
from ..training.threads import add_threads_flag, apply_threads
from .cli import Parser, check_out_file, fail, lock_output
from .measure import QUICK_SIZES, SIZES, round_robin
from .results import check_command, read_json_object

# ----------------------------------------------------------------------------
# cost: unmerged mixed batch against one merged model per task

SERVING_LORA = LoraConfig(r=8, alpha=8.0, targets=("W_q", "W_v"))  # the paper's targets (Section 7.1)
SERVING_TASKS = (1, 2, 4, 8, 16)  # tasks in one batch of SERVING_BATCH rows
SERVING_BATCH = 16
QUICK_TASKS = (1, 2)
DEFAULT_OUT = Path("serving_results.json")  # in the current folder; notebook 09 runs beside it


def _tasks_and_adapters(cfg, lora, K, rng, dtype):
    adapter_sets = []
    for k in range(K):
        ad = init_lora(cfg, lora, seed=100 + k)
        for name in ad:  # a trained-looking B (not 0), so that every task really differs from the base
            if name.endswith(".B"):
                ad[name] = rng.normal(0.0, 0.02, size=ad[name].shape)
        adapter_sets.append(cast(ad, dtype))
    return adapter_sets


def _ways(base, tokens, bank, index, merged, first, lora):
    # the five things serving_cost times, as functions of nothing
    return {
        "base": lambda: multi_lora_forward(base, tokens, None, None),  # the same code as the others, no adapter
        "merged": lambda: merged_forward(merged, tokens, index),
        "group": lambda: multi_lora_forward(base, tokens, bank, index, "group"),
        "gather": lambda: multi_lora_forward(base, tokens, bank, index, "gather"),
        "merge_one": lambda: merge(base, first, lora),
    }


def serving_cost(cfg, batch, tasks, reps, lora=SERVING_LORA):
    """Times of serving one mixed batch of `batch` rows of T = context_length tokens, for K in `tasks`.

    For each K the rows go round robin to K tasks (row i to task i mod K) and five ways are timed
    (round-robin medians, lora_np.studies.measure.round_robin; wall and CPU seconds):
    - "base": the base on the whole batch (multi_lora_forward without a bank): what one merged model
      costs when the batch is one task (the floor);
    - "merged": merged_forward, one merged model per task, each on its own rows (K forwards);
    - "group", "gather": multi_lora_forward, one forward, unmerged;
    - "merge_one": one merge(base, adapters_k) (what switching a merged deployment's task costs).

    Returns (JSON-ready):
    - {"config", "batch", "T", "lora": {"r", "alpha", "targets"}, "bytes": {"base", "adapter",
       "merged_copy"} (one adapter set; the adapted weights one merged model adds),
       "rows": [{"tasks": K, "max_abs_diff": {"group", "gather"} (against "merged"), and per way
       {"median_s", "cpu_median_s"} (wall and CPU); "vs_base": {way: the median over rounds of this way's
       CPU time over the base's in the same round}}]}
      On a shared machine the CPU time is the steadier figure, and a ratio within one round compares
      two runs made moments apart, so a busy spell that hits a round hits both.
    """
    rng = np.random.default_rng(0)
    T = cfg.context_length
    tokens = rng.integers(0, cfg.vocab_size, size=(batch, T))  # (B, T)
    base = cast(init_params(cfg, seed=0), np.float32)
    all_sets = _tasks_and_adapters(cfg, lora, max(tasks), rng, np.float32)
    rows = []
    for K in tasks:
        sets = all_sets[:K]
        index = np.arange(batch) % K  # (B,), row i to task i mod K
        bank = adapter_bank(base, sets, lora)
        merged = [merge(base, a, lora) for a in sets]
        fns = _ways(base, tokens, bank, index, merged, sets[0], lora)
        t = round_robin(fns, reps)
        ref = fns["merged"]()
        row = {"tasks": K, "max_abs_diff": {s: float(np.abs(fns[s]() - ref).max()) for s in STRATEGIES}}
        for way, v in t.items():
            row[way] = {"median_s": v["median_s"], "cpu_median_s": v["cpu_median_s"]}
        base_cpu = np.array(t["base"]["cpu_s"])  # (reps,)
        row["vs_base"] = {way: float(np.median(np.array(t[way]["cpu_s"]) / base_cpu)) for way in ("merged", "group",
                                                                                               "gather")}  # fmt: skip
        rows.append(row)
    adapted = [f"blocks.{l}.{w}" for l in range(cfg.n_layers) for w in lora.targets]
    return {
        "config": asdict(cfg),
        "batch": batch,
        "T": T,
        "lora": {"r": lora.r, "alpha": lora.alpha, "targets": list(lora.targets)},
        "bytes": {
            "base": sum(a.nbytes for a in base.values()),
            "adapter": sum(a.nbytes for a in all_sets[0].values()),
            "merged_copy": sum(base[n].nbytes for n in adapted),  # what one merged model adds to the base
        },
        "rows": rows,
    }


def bench_serving(sizes=("demo", "d128"), reps=7, quick=False, log=print):
    """Multi-adapter serving, unmerged against merged, for model sizes of lora_np.bench.

    Inputs:
    - sizes: names from lora_np.studies.measure.SIZES (or QUICK_SIZES); quick=True uses QUICK_SIZES' "q32"
      alone, tasks (1, 2), a batch of 4 and one rep: about a second, for tests (structure only)
    - reps: timed rounds after a warm-up round

    Returns:
    - {"meta": {"reps", "quick", "threads", "load_before", "load_after", "numpy"},
       "sizes": [{"name", **serving_cost(...)}]}
    """
    known = {**SIZES, **QUICK_SIZES}
    if quick:
        sizes, reps = ("q32",), 1
    if isinstance(sizes, str) or not sizes or any(s not in known for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of names from {sorted(known)}, got {sizes!r}")
    if not isinstance(reps, Integral) or isinstance(reps, bool) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    meta = {"reps": int(reps), "quick": bool(quick), "threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
            "load_before": list(os.getloadavg()), "numpy": np.__version__}  # fmt: skip
    out = []
    for name in sizes:
        cfg = known[name][0]
        log(f"serving {name}: {cfg} ...")
        batch, tasks = (4, QUICK_TASKS) if quick else (SERVING_BATCH, SERVING_TASKS)
        out.append({"name": name, **serving_cost(cfg, batch, tasks, reps)})
    meta["load_after"] = list(os.getloadavg())
    return {"meta": meta, "sizes": out}


def serving_table(result):
    """The report of bench_serving, as text."""
    m = result["meta"]
    lines = [f"OPENBLAS_NUM_THREADS={m['threads']}, {m['reps']} reps, load average {m['load_before'][0]:.2f} before / "
             f"{m['load_after'][0]:.2f} after", ""]  # fmt: skip
    head = f"{'size':<6}{'tasks':>6}{'base ms':>9}{'merged ms':>11}{'group ms':>10}{'gather ms':>11}" \
           f"{'merged/base':>13}{'group/base':>12}{'gather/base':>13}{'max |diff|':>12}"  # fmt: skip
    lines += [head, "-" * len(head)]
    for s in result["sizes"]:
        for row in s["rows"]:
            ms = {w: row[w]["cpu_median_s"] * 1e3 for w in ("base", "merged", "group", "gather")}
            diff = max(row["max_abs_diff"].values())
            lines.append(f"{s['name']:<6}{row['tasks']:>6}{ms['base']:>9.2f}{ms['merged']:>11.2f}{ms['group']:>10.2f}"
                         f"{ms['gather']:>11.2f}{row['vs_base']['merged']:>13.2f}{row['vs_base']['group']:>12.2f}"
                         f"{row['vs_base']['gather']:>13.2f}{diff:>12.1e}")  # fmt: skip
        b, c = s["bytes"], s["config"]
        lines.append(f"      D={c['d_model']} L={c['n_layers']} B={s['batch']} T={s['T']}, LoRA r={s['lora']['r']} on "
                     f"{','.join(s['lora']['targets'])}: one adapter {b['adapter'] / 1024:.1f} KiB, one merged copy of "
                     f"the adapted weights {b['merged_copy'] / 1024:.1f} KiB, base {b['base'] / 1024:.1f} KiB; "
                     f"one merge {s['rows'][0]['merge_one']['cpu_median_s'] * 1e3:.2f} ms")  # fmt: skip
    lines += ["", "CPU ms, medians; x/base: median over rounds of the ratio within a round. base: the base model on "
              "the whole batch (one task, merged); merged: one merged model a task, each on its rows; group, gather: "
              "one unmerged forward, each row its own adapter."]  # fmt: skip
    return "\n".join(lines)


def load_results(path=DEFAULT_OUT):
    """The results file notebook 09 reads, after checking that it holds a full run of the code's design
    (SERVING_TASKS in a batch of SERVING_BATCH rows, SERVING_LORA's rank). ValueError says how to remake it."""
    fix = "regenerate it with `python -m lora_np serving`"
    result = read_json_object(path, fix)
    meta, sizes = result.get("meta"), result.get("sizes")
    if not (isinstance(meta, dict) and meta.get("quick") is False and isinstance(sizes, list) and sizes
            and all(isinstance(s, dict) for s in sizes)):  # fmt: skip
        raise ValueError(f"{path} does not hold a full (not --quick) serving run; {fix}")
    for s in sizes:
        rows, lora = s.get("rows"), s.get("lora")
        tasks = [row.get("tasks") for row in rows if isinstance(row, dict)] if isinstance(rows, list) else None
        if tasks != list(SERVING_TASKS) or s.get("batch") != SERVING_BATCH or not isinstance(lora, dict) \
                or lora.get("r") != SERVING_LORA.r:  # fmt: skip
            raise ValueError(f"{path}: size {s.get('name')!r} was measured with another design; {fix}")
    return result


def main(argv=None, prog="python -m lora_np serving"):
    """`python -m lora_np serving [--out FILE] [--reps N] [--quick] [--threads N]`: measure, write the results."""
    p = Parser(prog=prog,
               description="Measure multi-adapter serving, unmerged (one forward, each row its own adapter) against "
                           "merged (one forward a task), and write the JSON notebook 09 reads.")  # fmt: skip
    p.add_argument("--out", default=None, help=f"JSON file (default {DEFAULT_OUT}; with --quick, none)")
    p.add_argument("--reps", type=int, default=7, help="timed rounds after a warm-up (default 7)")
    p.add_argument("--quick", action="store_true", help="a tiny model, one rep: a smoke test, written only to --out")
    p.add_argument("--check", action="store_true", help="only check that the results file fits the code")
    add_threads_flag(p)
    a = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if a.check:
        return check_command(a.out or DEFAULT_OUT, load_results)
    if a.out is None and not a.quick:  # a smoke test must not overwrite the notebook's results
        a.out = str(DEFAULT_OUT)
    try:
        if a.out is not None:
            check_out_file("--out", a.out)
        if a.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {a.reps}")
    except ValueError as e:
        fail(p.prog, str(e))
    apply_threads(a.threads)  # the demo's and d128's widths: the policy's one thread
    with lock_output(p.prog, a.out) if a.out is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        result = bench_serving(reps=a.reps, quick=a.quick)
        result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
        print(serving_table(result))
        if a.out is not None:
            text = (json.dumps(result, indent=1) + "\n").encode()
            write_atomic(Path(a.out), lambda f: f.write(text))
            print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
