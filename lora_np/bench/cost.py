"""`python -m lora_np bench`: LoRA's cost model, measured on lora_np's own code beside the arithmetic.

LoRA's practical claims are about cost (paper Section 4.2, paragraph "Practical Benefits and
Limitations"): far fewer trainable parameters, no optimizer state for the frozen weights, and "a 25%
speedup during training on GPT-3 175B compared to full fine-tuning as we do not need to calculate
the gradient for the vast majority of the parameters" (its footnote: 43.1 against 32.5 tokens/s per
V100: a step-time ratio of 0.754, so the "25%" is time saved per token; the throughput gained is
32.6%); and (Section 4.1, "No Additional Inference Latency") none once
W' = W0 + B·A is merged. For a few model sizes this module measures each of them on
lora_np's code, float32, and sets each measurement beside the number that predicts it:

- time per training step (loss_and_grads + AdamW.step) for full fine-tuning, LoRA on W_q, W_v
  (r = 4) and LoRA on all six block weights, beside the matrix-product flops of `step_flops`;
- time per forward pass for the base model, the merged model and the unmerged LoRA model;
- the machine's own float32 matmul throughput and elementwise bandwidth, measured in the same run,
  so "flops per second" becomes a share of what this machine can do;
- trainable numbers, gradient bytes, optimizer state bytes, and the peak memory a training step
  allocates (tracemalloc: NumPy reports its array allocations to it);
- the element-wise share of a step: the time spent in GELU, LayerNorm, the embeddings, the
  cross-entropy and AdamW.step, each call timed (the softmax inside attention and the residual
  additions are not counted, so the share is a lower bound);
- the step at 1 and at 2 BLAS threads, and again while another process keeps one core busy
  (lora_np.training.threads chooses each command's thread count from these).

Dimension legend: B batch, T time (= context_length), N = B·T positions, D model width, M MLP
width, V vocabulary, r LoRA rank, L layers.

Threads: the main table runs at `--threads N` BLAS threads (default 1), set at run time with
threadpoolctl; the threads table sets 1 and 2 itself.

Timings are medians over `reps` rounds after a warm-up round; every round runs each variant once
(round robin), so a burst of load from another process hits all variants alike. Wall-clock and
CPU (process) times are both recorded; on a shared machine the CPU time is the steadier of the two.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ..core import model as model_module
from ..core.config import LORA_TARGETS, LoraConfig
from ..core.lora import init_lora, merge
from ..core.model import model_forward
from ..core.params import Params, cast, init_params
from ..studies.cli import Parser, check_out_file, fail
from ..studies.latency import latency_table, measure_latency
from ..studies.measure import QUICK_SIZES, SIZES, machine, paired_ratio, round_robin
from ..studies.serving_study import bench_serving, serving_table
from ..training import train as train_module
from ..training.checkpoint import write_atomic
from ..training.heap import keep_freed_memory, minor_faults, return_freed_memory
from ..training.optim import AdamW
from ..training.threads import THREAD_VARS, blas_threads, set_blas_threads
from ..training.train import loss_and_grads
from .flops import adamw_cost, step_flops  # noqa: F401 (step_flops: part of this module's interface)
from .report import THREAD_COUNTS, table, targets

LORA_VARIANTS = {
    "lora_qv": LoraConfig(r=4, alpha=4.0, targets=("W_q", "W_v")),  # the paper's choice (Section 7.1)
    "lora_all": LoraConfig(r=4, alpha=4.0, targets=LORA_TARGETS),
}
TRAIN_VARIANTS = ("full", *LORA_VARIANTS)
FORWARD_VARIANTS = ("base", "merged_qv", "lora_qv", "lora_all")
# The element-wise layers, by the name the model and the trainer call them by -> the kind reported
ELEMENTWISE = {
    "gelu_forward": "gelu", "gelu_backward": "gelu",
    "layernorm_forward": "layernorm", "layernorm_backward": "layernorm",
    "embedding_forward": "embedding", "embedding_backward": "embedding",
    "cross_entropy_forward": "cross_entropy", "cross_entropy_backward": "cross_entropy",
}  # fmt: skip
FULL_WEIGHT_DECAY = 0.01  # as the demo trains: AdamW with decay for full fine-tuning, none for LoRA
DEFAULT_OUT = "runs/bench/bench.json"


# ----------------------------------------------------------------------------
# measuring (the arithmetic it is set beside, step_flops and adamw_cost, is in lora_np.bench.flops)


def matmul_gflops(n, k, m, reps, transposed=False):
    """Measured float32 throughput of (n, k) @ (k, m), in GFLOP/s (2·n·k·m flops a product).

    transposed=True multiplies by a (m, k) array's transpose, as linear_forward does (x @ W.T).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal((m, k) if transposed else (k, m), dtype=np.float32)
    fn = (lambda: a @ b.T) if transposed else (lambda: a @ b)
    return 2 * n * k * m / round_robin({"mm": fn}, reps)["mm"]["median_s"] / 1e9


def stream_gbps(n, reps):
    """Measured elementwise bandwidth, GB/s: c = a + b on float32 arrays of n numbers (3·4·n bytes)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, n), dtype=np.float32)
    c = np.empty_like(a)
    return 3 * 4 * n / round_robin({"add": lambda: np.add(a, b, out=c)}, reps)["add"]["median_s"] / 1e9


@contextmanager
def timed_elementwise(seconds):
    """Inside the block, each call of an ELEMENTWISE layer or of AdamW.step adds its wall time to
    seconds[kind] (a defaultdict(float)). The functions are wrapped where the model and the trainer
    look them up, and restored on the way out."""
    def timed(fn, kind):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[kind] += time.perf_counter() - t0

        return wrapper

    saved = [(AdamW, "step", AdamW.step)]
    saved += [(m, name, getattr(m, name)) for m in (model_module, train_module) for name in ELEMENTWISE
              if hasattr(m, name)]  # fmt: skip
    try:
        for owner, name, fn in saved:
            setattr(owner, name, timed(fn, ELEMENTWISE.get(name, "adamw")))
        yield seconds
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def elementwise_share(fn, reps):
    """Median over `reps` calls of fn() of (time in element-wise layers) / (time of the call), and
    the median seconds per call of each kind."""
    shares, kinds = [], defaultdict(list)
    for _ in range(reps):
        seconds = defaultdict(float)
        with timed_elementwise(seconds):
            t0 = time.perf_counter()
            fn()
            total = time.perf_counter() - t0
        shares.append(sum(seconds.values()) / total)
        for kind, s in seconds.items():
            kinds[kind].append(s)
    return statistics.median(shares), {k: statistics.median(v) for k, v in sorted(kinds.items())}


@contextmanager
def busy_core():
    """Another process keeping one core busy for the duration of the block (a Python loop)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it start spinning
        yield
    finally:
        proc.kill()
        proc.wait()


def thread_table(fns, reps, busy=False):
    """Median seconds of each fn at each of THREAD_COUNTS BLAS threads, idle and (busy=True) with
    another process on one core: {"idle": {threads: {name: s}}, "one_core_busy": ...}.

    Every round times each setting once, idle then busy, after a warm-up round: the machine's speed
    drifts over minutes, and a drift should hit all settings alike, as in _round_robin."""
    loads = ("idle", "one_core_busy") if busy else ("idle",)
    times = {load: {str(n): {name: [] for name in fns} for n in THREAD_COUNTS} for load in loads}

    def one_round(load):
        for n in THREAD_COUNTS:
            with threadpool_limits(limits=n, user_api="blas"):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[load][str(n)][name].append(time.perf_counter() - t0)

    for _ in range(reps + 1):
        one_round("idle")
        if busy:
            with busy_core():
                one_round("one_core_busy")
    return {load: {n: {name: statistics.median(t[1:]) for name, t in by_name.items()}  # t[0]: the warm-up
                   for n, by_name in by_n.items()} for load, by_n in times.items()}  # fmt: skip


def heap_table(fn, reps):
    """fn() with freed memory handed back to the system (glibc's starting thresholds, held) and kept
    for reuse (lora_np.training.heap): {"returned": {"median_s", "faults"}, "kept": ...}, faults being the median page
    faults per call; None where there is no glibc to set. Leaves the memory kept, as every command.

    Each round runs both settings, each after one untimed call that lets the heap settle into it."""
    if not return_freed_memory():
        return None
    settings = {"returned": return_freed_memory, "kept": keep_freed_memory}
    times, faults = {m: [] for m in settings}, {m: [] for m in settings}
    try:
        for _ in range(reps):
            for mode, setting in settings.items():
                setting()
                fn()
                f0, t0 = minor_faults(), time.perf_counter()
                fn()
                times[mode].append(time.perf_counter() - t0)
                faults[mode].append(minor_faults() - f0)
    finally:
        keep_freed_memory()
    return {m: {"median_s": statistics.median(times[m]), "faults": statistics.median(faults[m])} for m in settings}


def peak_bytes(fn):
    """Peak bytes allocated while fn() runs, above what was allocated before (tracemalloc).

    NumPy reports every array buffer it allocates to tracemalloc, so this is the memory one call
    needs on top of what already exists (for a training step: activations, gradients, temporaries;
    not the parameters or the optimizer state, which exist before the step).
    """
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        if not was_tracing:
            tracemalloc.stop()


def bench_size(name, cfg, batch, reps, square_gflops, busy=False):
    """Every figure for one model size; see the module docstring. Returns a JSON-ready dict."""
    T, D = cfg.context_length, cfg.d_model
    N = batch * T
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, size=(batch, T))  # (B, T) token ids
    y = rng.integers(0, cfg.vocab_size, size=(batch, T))
    base = cast(init_params(cfg, seed=0), np.float32)
    adapters = {}
    for v, lora in LORA_VARIANTS.items():
        ad = init_lora(cfg, lora, seed=1)
        for k in ad:  # a trained-looking B (not 0), so the merged model really differs from the base
            if k.endswith(".B"):
                ad[k] = rng.normal(0.0, 0.02, size=ad[k].shape)
        adapters[v] = cast(ad, np.float32)

    # training steps: each variant trains its own arrays; the base stays frozen under LoRA
    full = Params(cfg, {k: a.copy() for k, a in base.items()})
    opts = {"full": AdamW(full, lr=1e-6, weight_decay=FULL_WEIGHT_DECAY)}
    opts.update({v: AdamW(adapters[v], lr=1e-6) for v in LORA_VARIANTS})
    last_grads = {}

    def step(v):
        def fn():
            if v == "full":
                _, grads = loss_and_grads(full, x, y)
            else:
                _, grads = loss_and_grads(base, x, y, adapters[v], LORA_VARIANTS[v])
            opts[v].step(grads)
            last_grads[v] = sum(g.nbytes for g in grads.values())  # a number: no gradient held past the step

        return fn

    steps = {v: step(v) for v in TRAIN_VARIANTS}
    train_t = round_robin(steps, reps)
    ew = {v: elementwise_share(steps[v], reps) for v in TRAIN_VARIANTS}
    threads = thread_table({v: steps[v] for v in ("full", "lora_qv")}, reps, busy)
    heap = heap_table(steps["full"], reps)
    mm_model = matmul_gflops(N, D, D, reps, transposed=True)  # (N, D) @ (D, D)ᵀ, a projection's shape
    stream = stream_gbps(max(cfg.linear_shape(w)[0] * cfg.linear_shape(w)[1] for w in LORA_TARGETS), reps)

    train = {}
    for v in TRAIN_VARIANTS:
        lora = LORA_VARIANTS.get(v)
        opt = opts[v]
        flops = step_flops(cfg, batch, lora)
        adam = adamw_cost(opt.arrays, opt.weight_decay)
        t = train_t[v]
        train[v] = {
            **t,
            "flops": flops,
            "gflops_per_s": flops["total"] / t["median_s"] / 1e9,
            "share_of_matmul_model": flops["total"] / t["median_s"] / 1e9 / mm_model,
            "share_of_matmul_square": flops["total"] / t["median_s"] / 1e9 / square_gflops,
            # what the products and the optimizer alone would take at this machine's measured rates
            "predicted_s": flops["total"] / (mm_model * 1e9) + adam["bytes"] / (stream * 1e9),
            "trainable": sum(a.size for a in opt.arrays.values()),
            "grad_bytes": last_grads[v],
            "optimizer_state_bytes": opt.state_bytes(),
            "adamw_ops": adam["ops"],
            "adamw_bytes": adam["bytes"],
            "peak_bytes": peak_bytes(steps[v]),
            "elementwise_share": ew[v][0],
            "elementwise_s": ew[v][1],
        }

    # forward passes (inference, no dropout): base, merged W' = W0 + s·B·A, unmerged adapters
    merged = merge(base, adapters["lora_qv"], LORA_VARIANTS["lora_qv"])
    fwd_fns = {
        "base": lambda: model_forward(base, x),
        "merged_qv": lambda: model_forward(merged, x),
        "lora_qv": lambda: model_forward(base, x, adapters["lora_qv"], LORA_VARIANTS["lora_qv"]),
        "lora_all": lambda: model_forward(base, x, adapters["lora_all"], LORA_VARIANTS["lora_all"]),
    }
    fwd_t = round_robin(fwd_fns, 3 * reps)  # cheap, and the merged-vs-base test wants a steady median
    forward = {}
    for v in FORWARD_VARIANTS:
        flops = step_flops(cfg, batch, LORA_VARIANTS.get(v), backward=False)
        forward[v] = {
            **fwd_t[v],
            "flops": flops,
            "gflops_per_s": flops["total"] / fwd_t[v]["median_s"] / 1e9,
            "vs_base": paired_ratio(fwd_t[v]["wall_s"], fwd_t["base"]["wall_s"]),
        }
    merge_diff = float(np.abs(fwd_fns["merged_qv"]()[0] - fwd_fns["lora_qv"]()[0]).max())

    ratios = {}
    for v in LORA_VARIANTS:
        f, lo = train["full"], train[v]
        ratios[v] = {
            "step_time": paired_ratio(lo["wall_s"], f["wall_s"]),
            "step_cpu_time": paired_ratio(lo["cpu_s"], f["cpu_s"]),
            "flops": lo["flops"]["total"] / f["flops"]["total"],
            "predicted": lo["predicted_s"] / f["predicted_s"],
            "optimizer_state": f["optimizer_state_bytes"] / lo["optimizer_state_bytes"],
            "trainable": f["trainable"] / lo["trainable"],
        }
    return {
        "name": name,
        "config": asdict(cfg),
        "batch": batch,
        "positions": N,
        "matmul_model_gflops": mm_model,
        "matmul_model_shape": [N, D, D],
        "stream_gbps": stream,
        "train": train,
        "forward": forward,
        "merge_max_abs_diff": merge_diff,
        "lora_over_full": ratios,
        "threads": threads,
        "heap": heap,
    }


# ----------------------------------------------------------------------------
# targets, table, run


def run(sizes, reps, out=None, quick=False, log=print):
    """Benchmark the named sizes (keys of SIZES or QUICK_SIZES); write JSON to `out` if given; return it."""
    known = {**SIZES, **QUICK_SIZES}
    bad = [s for s in sizes if s not in known]
    if bad or not sizes:
        raise ValueError(f"sizes must be names from {sorted(known)}, got {list(sizes)}")
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    meta = {
        **machine(),
        "threads": {v: os.environ.get(v, "unset") for v in THREAD_VARS},
        "blas_threads": blas_threads(),
        "load_before": list(os.getloadavg()),
        "reps": reps,
        "quick": quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    S = 256 if quick else 2048
    meta["matmul_square_shape"] = [S, S, S]
    meta["matmul_square_gflops"] = matmul_gflops(S, S, S, reps)
    results = []
    for i, name in enumerate(sizes):
        cfg, batch = known[name]
        log(f"benchmarking {name}: {cfg}, batch {batch} ...")
        # the busy-core rows at the first (smallest) size only: the demo's, where the collapse was seen
        results.append(bench_size(name, cfg, batch, reps, meta["matmul_square_gflops"], busy=i == 0))
    # Serving, beside the training steps: one mixed batch with a different adapter per row, unmerged,
    # against one merged model per task (the paper's Section 4.2 limitation; lora_np.methods.serving)
    result_serving = bench_serving(("demo", "d128"), reps, quick=quick, log=log)
    # Inference latency per token, the paper's Table 1: base, merged and unmerged LoRA, and the adapter
    # baselines (sequential layers that cannot be merged; lora_np.studies.latency)

    result_latency = measure_latency(quick=quick, log=log)
    meta["load_after"] = list(os.getloadavg())
    result = {"meta": meta, "sizes": results, "targets": targets(results), "serving": result_serving,
              "latency": result_latency}  # fmt: skip
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=1).encode()
        write_atomic(out, lambda f: f.write(text))  # a crash mid-write leaves any previous file intact
    return result


def _threads(value):
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value!r}")
    return n


def main(argv=None):
    """`python -m lora_np bench [--sizes demo,d512] [--reps 7] [--threads 1] [--out FILE] [--quick]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = Parser(
        prog="python -m lora_np bench",
        description="Measure LoRA's cost model on lora_np: step and forward times, flops, memory.",
    )
    p.add_argument("--sizes", default=None, help=f"comma-separated sizes from {', '.join(SIZES)} (default all)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds after a warm-up (default 7; 2 with --quick)")
    p.add_argument("--threads", type=_threads, default=1, metavar="N",
                   help="BLAS threads for the main table (default 1); the threads table runs 1 and 2")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON file to write (default {DEFAULT_OUT}); a PNG beside it")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes ({', '.join(QUICK_SIZES)}), 2 reps: seconds")
    a = p.parse_args(argv)
    sizes = a.sizes.split(",") if a.sizes else list(QUICK_SIZES if a.quick else SIZES)
    reps = a.reps if a.reps is not None else (2 if a.quick else 7)
    known = {**SIZES, **QUICK_SIZES}
    if any(s not in known for s in sizes):
        p.error(f"--sizes must be names from {', '.join(known)}, got {a.sizes!r}")
    if reps < 1:
        p.error(f"--reps must be an int >= 1, got {reps}")
    try:  # the JSON file and the PNG beside it; missing folders are created
        check_out_file("--out", a.out, create_parents=True)
    except ValueError as e:
        fail(p.prog, str(e))
    set_blas_threads(a.threads)
    result = run(sizes, reps, a.out, quick=a.quick)
    print(table(result))
    print("\nmulti-adapter serving (lora_np.methods.serving):\n" + serving_table(result["serving"]))
    print("\ninference latency per token (lora_np.studies.latency):\n" + latency_table(result["latency"]))
    print(f"\nwrote {a.out}")  # `python -m lora_np bench` then draws it (lora_np.figures.bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
