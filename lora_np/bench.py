"""`python -m lora_np bench`: LoRA's cost model, measured on lora_np's own code beside the arithmetic.

LoRA's practical claims are about cost (paper Section 4.2, paragraph "Practical Benefits and
Limitations"): far fewer trainable parameters, no optimizer state for the frozen weights, and "a 25%
speedup during training on GPT-3 175B compared to full fine-tuning as we do not need to calculate
the gradient for the vast majority of the parameters" (its footnote: 43.1 against 32.5 tokens/s per
V100, a step-time ratio of 0.754); and (Section 4.1, "No Additional Inference Latency") none once
W' = W0 + B·A is merged. For a few model sizes this module measures each of them on
lora_np's code, float32, and sets each measurement beside the number that predicts it:

- time per training step (loss_and_grads + AdamW.step) for full fine-tuning, LoRA on W_q, W_v
  (r = 4) and LoRA on all six block weights, beside the matrix-product flops of `step_flops`;
- time per forward pass for the base model, the merged model and the unmerged LoRA model;
- the machine's own float32 matmul throughput and elementwise bandwidth, measured in the same run,
  so "flops per second" becomes a share of what this machine can do;
- trainable numbers, gradient bytes, optimizer state bytes, and the peak memory a training step
  allocates (tracemalloc: NumPy reports its array allocations to it).

Dimension legend: B batch, T time (= context_length), N = B·T positions, D model width, M MLP
width, V vocabulary, r LoRA rank, L layers.

Threads: OpenBLAS reads OPENBLAS_NUM_THREADS once, when NumPy is imported, so `--threads N` sets it
(and OMP_NUM_THREADS, MKL_NUM_THREADS) and re-runs the benchmark in a subprocess unless the
environment already says N. `--threads env` takes the environment as it is.

Timings are medians over `reps` rounds after a warm-up round; every round runs each variant once
(round robin), so a burst of load from another process hits all variants alike. Wall-clock and
CPU (process) times are both recorded; on a shared machine the CPU time is the steadier of the two.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .checkpoint import write_atomic
from .cli import Parser, check_out_file, fail
from .config import LORA_TARGETS, LoraConfig, ModelConfig
from .data import VOCAB
from .demo import DemoConfig
from .flops import adamw_cost, step_flops  # noqa: F401 (step_flops: part of this module's interface)
from .lora import init_lora, merge
from .model import model_forward
from .optim import AdamW
from .params import Params, cast, init_params
from .train import loss_and_grads

# name -> (model, batch B). "demo" is the demo's model and batch; the larger ones are where matrix
# products dominate, with B chosen so that a full fine-tuning step takes 0.05-1 s on one core.
SIZES = {
    "demo": (DemoConfig().model, DemoConfig().batch_size),
    "d128": (ModelConfig(vocab_size=len(VOCAB), context_length=64, d_model=128, n_heads=2, n_layers=2, d_mlp=512), 32),
    "d256": (ModelConfig(vocab_size=len(VOCAB), context_length=128, d_model=256, n_heads=4, n_layers=4, d_mlp=1024), 8),
    "d512": (ModelConfig(vocab_size=len(VOCAB), context_length=128, d_model=512, n_heads=8, n_layers=4, d_mlp=2048), 8),
}
# --quick: tiny, for the tests (a few seconds in all)
QUICK_SIZES = {
    "q32": (ModelConfig(vocab_size=len(VOCAB), context_length=16, d_model=32, n_heads=2, n_layers=2, d_mlp=128), 4),
    "q64": (ModelConfig(vocab_size=len(VOCAB), context_length=16, d_model=64, n_heads=2, n_layers=1, d_mlp=256), 4),
}
LORA_VARIANTS = {
    "lora_qv": LoraConfig(r=4, alpha=4.0, targets=("W_q", "W_v")),  # the paper's choice (Section 7.1)
    "lora_all": LoraConfig(r=4, alpha=4.0, targets=LORA_TARGETS),
}
TRAIN_VARIANTS = ("full", *LORA_VARIANTS)
FORWARD_VARIANTS = ("base", "merged_qv", "lora_qv", "lora_all")
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
FULL_WEIGHT_DECAY = 0.01  # as the demo trains: AdamW with decay for full fine-tuning, none for LoRA
DEFAULT_OUT = "runs/bench/bench.json"


# ----------------------------------------------------------------------------
# measuring (the arithmetic it is set beside, step_flops and adamw_cost, is in lora_np.flops)


def _round_robin(fns, reps):
    """Run every fn once as a warm-up, then `reps` rounds of each once; wall and CPU seconds per call."""
    for fn in fns.values():
        fn()
    times = {name: {"wall_s": [], "cpu_s": []} for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            c1, w1 = time.process_time(), time.perf_counter()
            times[name]["wall_s"].append(w1 - w0)
            times[name]["cpu_s"].append(c1 - c0)
    for t in times.values():
        t["median_s"], t["cpu_median_s"] = statistics.median(t["wall_s"]), statistics.median(t["cpu_s"])
    return times


def matmul_gflops(n, k, m, reps, transposed=False):
    """Measured float32 throughput of (n, k) @ (k, m), in GFLOP/s (2·n·k·m flops a product).

    transposed=True multiplies by a (m, k) array's transpose, as linear_forward does (x @ W.T).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal((m, k) if transposed else (k, m), dtype=np.float32)
    fn = (lambda: a @ b.T) if transposed else (lambda: a @ b)
    return 2 * n * k * m / _round_robin({"mm": fn}, reps)["mm"]["median_s"] / 1e9


def stream_gbps(n, reps):
    """Measured elementwise bandwidth, GB/s: c = a + b on float32 arrays of n numbers (3·4·n bytes)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, n), dtype=np.float32)
    c = np.empty_like(a)
    return 3 * 4 * n / _round_robin({"add": lambda: np.add(a, b, out=c)}, reps)["add"]["median_s"] / 1e9


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


def bench_size(name, cfg, batch, reps, square_gflops):
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
    train_t = _round_robin(steps, reps)
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
        }

    # forward passes (inference, no dropout): base, merged W' = W0 + s·B·A, unmerged adapters
    merged = merge(base, adapters["lora_qv"], LORA_VARIANTS["lora_qv"])
    fwd_fns = {
        "base": lambda: model_forward(base, x),
        "merged_qv": lambda: model_forward(merged, x),
        "lora_qv": lambda: model_forward(base, x, adapters["lora_qv"], LORA_VARIANTS["lora_qv"]),
        "lora_all": lambda: model_forward(base, x, adapters["lora_all"], LORA_VARIANTS["lora_all"]),
    }
    fwd_t = _round_robin(fwd_fns, 3 * reps)  # cheap, and the merged-vs-base test wants a steady median
    forward = {}
    for v in FORWARD_VARIANTS:
        flops = step_flops(cfg, batch, LORA_VARIANTS.get(v), backward=False)
        forward[v] = {
            **fwd_t[v],
            "flops": flops,
            "gflops_per_s": flops["total"] / fwd_t[v]["median_s"] / 1e9,
            "vs_base": fwd_t[v]["median_s"] / fwd_t["base"]["median_s"],
        }
    merge_diff = float(np.abs(fwd_fns["merged_qv"]()[0] - fwd_fns["lora_qv"]()[0]).max())

    ratios = {}
    for v in LORA_VARIANTS:
        f, lo = train["full"], train[v]
        ratios[v] = {
            "step_time": lo["median_s"] / f["median_s"],
            "step_cpu_time": lo["cpu_median_s"] / f["cpu_median_s"],
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
    }


# ----------------------------------------------------------------------------
# targets, table, run


def targets(sizes):
    """The benchmark's targets, each with its measured figure and pass/fail (never asserted).

    The step-time and throughput targets are stated for d_model = 512; they are judged at the
    widest size that was run, and the record says which one.
    """
    out = []
    top = max(sizes, key=lambda s: s["config"]["d_model"])
    D = top["config"]["d_model"]
    r = top["lora_over_full"]["lora_qv"]
    out.append({
        "target": f"LoRA W_q,W_v step time <= 0.65 x full fine-tuning's (d_model=512; run at {D})",
        "measured": r["step_time"], "pass": r["step_time"] <= 0.65,
        "note": f"count predicts {r['flops']:.3f} (matmuls), {r['predicted']:.3f} (matmuls + AdamW traffic)",
    })  # fmt: skip
    share = top["train"]["full"]["share_of_matmul_model"]
    out.append({
        "target": f"full fine-tuning >= 50% of the measured (N, D)@(D, D) matmul throughput (d_model=512; run at {D})",
        "measured": share, "pass": share >= 0.5,
        "note": f"{top['train']['full']['gflops_per_s']:.1f} of {top['matmul_model_gflops']:.1f} GFLOP/s",
    })  # fmt: skip
    for s in sizes:
        vs = s["forward"]["merged_qv"]["vs_base"]
        out.append({
            "target": f"{s['name']}: merged forward within 5% of the base model's",
            "measured": vs, "pass": abs(vs - 1.0) <= 0.05,
            "note": f"unmerged LoRA: W_q,W_v x{s['forward']['lora_qv']['vs_base']:.3f}, "
                    f"all six x{s['forward']['lora_all']['vs_base']:.3f} of the base's time",
        })  # fmt: skip
    for s in sizes:
        q = s["lora_over_full"]["lora_qv"]["optimizer_state"]
        out.append({
            "target": f"{s['name']}: LoRA W_q,W_v optimizer state >= 100x smaller than full fine-tuning's",
            "measured": q, "pass": q >= 100,
            "note": f"all six targets: {s['lora_over_full']['lora_all']['optimizer_state']:.1f}x",
        })  # fmt: skip
    return out


def table(result):
    """The terminal report of a run, as text."""
    m = result["meta"]
    lines = [
        f"threads {m['threads']}, load average {m['load_before'][0]:.2f} before / {m['load_after'][0]:.2f} after, "
        f"{m['reps']} reps; {m['cpu']} ({m['nproc']} cores), numpy {m['numpy']}, {m['blas']}",
        f"square float32 matmul {m['matmul_square_shape']}: {m['matmul_square_gflops']:.1f} GFLOP/s",
        "",
    ]
    head = (
        f"{'size':<6}{'variant':<10}{'step ms':>9}{'cpu ms':>8}{'pred ms':>9}{'GFLOP':>8}{'GF/s':>7}"
        f"{'%mm':>6}{'%sq':>6}{'trainable':>12}{'grads MB':>10}{'optim MB':>10}{'peak MB':>9}"
    )
    lines += [head, "-" * len(head)]
    for s in result["sizes"]:
        for v, t in s["train"].items():
            lines.append(
                f"{s['name']:<6}{v:<10}{t['median_s'] * 1e3:>9.1f}{t['cpu_median_s'] * 1e3:>8.1f}"
                f"{t['predicted_s'] * 1e3:>9.1f}{t['flops']['total'] / 1e9:>8.2f}{t['gflops_per_s']:>7.1f}"
                f"{t['share_of_matmul_model']:>6.0%}{t['share_of_matmul_square']:>6.0%}{t['trainable']:>12,}"
                f"{t['grad_bytes'] / 1e6:>10.3f}{t['optimizer_state_bytes'] / 1e6:>10.3f}{t['peak_bytes'] / 1e6:>9.1f}"
            )
        c = s["config"]
        r = s["lora_over_full"]
        lines.append(
            f"      D={c['d_model']} L={c['n_layers']} T={c['context_length']} B={s['batch']}; "
            f"(N,D)@(D,D) matmul {s['matmul_model_gflops']:.1f} GFLOP/s, elementwise {s['stream_gbps']:.1f} GB/s; "
            f"LoRA W_q,W_v / full: step {r['lora_qv']['step_time']:.3f} (cpu {r['lora_qv']['step_cpu_time']:.3f}), "
            f"count {r['lora_qv']['flops']:.3f}, count+AdamW {r['lora_qv']['predicted']:.3f}"
        )
    lines += ["", f"{'size':<6}{'forward':<11}{'ms':>8}{'vs base':>9}{'GFLOP':>8}{'GF/s':>7}"]
    for s in result["sizes"]:
        for v, t in s["forward"].items():
            lines.append(
                f"{s['name']:<6}{v:<11}{t['median_s'] * 1e3:>8.2f}{t['vs_base']:>9.3f}"
                f"{t['flops']['total'] / 1e9:>8.3f}{t['gflops_per_s']:>7.1f}"
            )
    lines += [
        "",
        "step = loss_and_grads + AdamW.step; pred = matmul flops at the (N,D)@(D,D) rate + AdamW bytes at the "
        "elementwise rate; %mm, %sq: GF/s as a share of the model-shaped and the square matmul; peak: tracemalloc.",
        "",
        "targets:",
    ]
    for t in result["targets"]:
        lines.append(f"  [{'pass' if t['pass'] else 'FAIL'}] {t['target']}: {t['measured']:.3f}  ({t['note']})")
    return "\n".join(lines)


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = "BLAS unknown"
    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{info.get('name', '?')} {info.get('version', '?')}"
    except Exception:  # older NumPy has no mode="dicts"; the BLAS is then left unnamed
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "numpy": np.__version__, "blas": blas,
            "python": platform.python_version()}  # fmt: skip


def run(sizes, reps, out=None, quick=False, log=print):
    """Benchmark the named sizes (keys of SIZES or QUICK_SIZES); write JSON to `out` if given; return it."""
    known = {**SIZES, **QUICK_SIZES}
    bad = [s for s in sizes if s not in known]
    if bad or not sizes:
        raise ValueError(f"sizes must be names from {sorted(known)}, got {list(sizes)}")
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    meta = {
        **_machine(),
        "threads": {v: os.environ.get(v, "unset") for v in THREAD_VARS},
        "load_before": list(os.getloadavg()),
        "reps": reps,
        "quick": quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    S = 256 if quick else 2048
    meta["matmul_square_shape"] = [S, S, S]
    meta["matmul_square_gflops"] = matmul_gflops(S, S, S, reps)
    results = []
    for name in sizes:
        cfg, batch = known[name]
        log(f"benchmarking {name}: {cfg}, batch {batch} ...")
        results.append(bench_size(name, cfg, batch, reps, meta["matmul_square_gflops"]))
    meta["load_after"] = list(os.getloadavg())
    result = {"meta": meta, "sizes": results, "targets": targets(results)}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=1).encode()
        write_atomic(out, lambda f: f.write(text))  # a crash mid-write leaves any previous file intact
    return result


def _threads(value):
    if value == "env":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1 or 'env', got {value!r}")
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
    p.add_argument("--threads", type=_threads, default=1,
                   help="BLAS threads: sets OPENBLAS_NUM_THREADS etc. and re-runs in a subprocess; "
                        "'env' keeps the environment's setting (default 1)")  # fmt: skip
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
    if a.threads != "env" and any(os.environ.get(v) != str(a.threads) for v in THREAD_VARS):
        env = {**os.environ, **dict.fromkeys(THREAD_VARS, str(a.threads))}
        print(f"re-running with {'='.join(THREAD_VARS[:1])}={a.threads} (BLAS reads it once, at start)", flush=True)
        return subprocess.run([sys.executable, "-m", "lora_np.bench", *argv], env=env).returncode
    result = run(sizes, reps, a.out, quick=a.quick)
    print(table(result))
    print(f"\nwrote {a.out}")  # `python -m lora_np bench` then draws it (lora_np.figures_bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
