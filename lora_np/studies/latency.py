"""Inference latency of adapters and of LoRA, merged and unmerged, on lora_np's own forward (Table 1).

The paper's Section 3, "Adapter Layers Introduce Inference Latency": adapters add few flops, but
"adapter layers have to be processed sequentially. This makes a difference in the online inference
setting where the batch size is typically as small as one." Its Table 1 (GPT-2 medium, one forward
pass, NVIDIA Quadro RTX8000, ms averaged over 100 trials):

    batch, sequence length    32, 512                16, 256              1, 128
    Fine-Tune/LoRA            1449.4±0.8             338.0±0.6            19.8±2.7
    AdapterL                  1482.0±1.0 (+2.2%)     354.8±0.5 (+5.0%)    23.9±2.1 (+20.7%)
    AdapterH                  1492.2±1.0 (+3.0%)     366.3±0.5 (+8.4%)    25.8±2.2 (+30.3%)

while merged LoRA runs the base's own architecture (W' = W0 + s·B·A, Section 4.1: "no additional
inference latency"). measure_latency times one float32 model_forward of each variant

    base         the model without adapters
    merged_lora  LoRA on W_q, W_v merged into the weights: the same arrays, the same code as base
    lora         the same LoRA unmerged: two r-wide products more at each adapted weight
    adapter_h    AdapterH: two adapter layers a block (lora_np.adapters)
    adapter_l    AdapterL: one adapter layer a block, behind its own LayerNorm

at batch 1 and batched, at a couple of sequence lengths, and reports the time per token. On a CPU
the cost of an adapter at batch 1 is mostly the fixed cost of each extra NumPy call (a dozen a
layer: two products, two bias adds, the nonlinearity, the skip), not its flops, which is the
same shape of cost as a GPU kernel launch: small work made sequential.

Timings are medians of round-robin rounds (lora_np.studies.measure.round_robin: every round runs each
variant once, so a burst of load from another process hits all of them alike); each variant's time
against the base's is the median of its ratios to the base within a round. model_forward
also keeps the caches a backward would need; every variant pays that alike. Run with one BLAS
thread (lora_np.training.threads' policy at these widths; both commands set it): notebook 08's numbers come from

    python -m lora_np adapters --only latency

and `python -m lora_np latency [--quick] [--out FILE]` prints the table on its own.

Dimension legend: B batch, T sequence length, D model width, r LoRA rank and adapter bottleneck.
"""

import json
import os
import statistics
import sys
import time
from dataclasses import asdict

import numpy as np

from ..core.config import LoraConfig, ModelConfig, check_int
from ..core.lora import merge
from ..core.model import model_forward
from ..core.params import cast, init_params
from ..methods.variants import init_adapters
from ..training.checkpoint import write_atomic
from ..training.data import VOCAB
from ..training.threads import THREAD_VARS, add_threads_flag, apply_threads, blas_threads
from .cli import Parser, check_out_file, fail
from .measure import machine, round_robin

# The measured model: twice the demo's width and layers. Batched, its products dominate a forward; at batch 1
# and 8 tokens, the fixed cost of each NumPy call does, as kernel launches do for a GPU at batch 1.
LATENCY_MODEL = ModelConfig(vocab_size=len(VOCAB), context_length=128, d_model=128, n_heads=4, n_layers=4, d_mlp=512)
QUICK_MODEL = ModelConfig(vocab_size=len(VOCAB), context_length=16, d_model=32, n_heads=2, n_layers=2, d_mlp=128)
VARIANTS = ("base", "merged_lora", "lora", "adapter_h", "adapter_l")
LABELS = {"base": "base", "merged_lora": "merged LoRA", "lora": "unmerged LoRA", "adapter_h": "AdapterH",
          "adapter_l": "AdapterL"}  # fmt: skip
METHODS = {"lora": "lora", "adapter_h": "adapter_h", "adapter_l": "adapter_l"}  # variant -> LoraConfig.method


def latency_variants(cfg, r, seed=0):
    """{variant: (params, adapters, lora)} for VARIANTS, float32, and the adapters at their init.

    The adapters are moved off their init (B, W_up, b_up drawn N(0, 0.02²)) so that each variant
    computes something else than the base; the time does not depend on the values. The init
    adapters come back beside them, for the check that an adapter at init is exactly the base.
    """
    base = cast(init_params(cfg, seed), np.float32)
    rng = np.random.default_rng(seed)
    out, at_init = {"base": (base, None, None)}, {}
    for v, method in METHODS.items():
        lora = LoraConfig(r=r, method=method)  # LoRA: the paper's W_q, W_v
        _, adapters = init_adapters(base, lora, seed)
        at_init[v] = (adapters, lora)
        trained = {}
        for k, a in adapters.items():
            moved = k.endswith((".B", ".W_up", ".b_up"))
            trained[k] = (a + rng.normal(0.0, 0.02, size=a.shape)).astype(np.float32) if moved else a
        out[v] = (base, trained, lora)
    out["merged_lora"] = (merge(base, out["lora"][1], out["lora"][2]), None, None)
    return {v: out[v] for v in VARIANTS}, at_init


def measure_latency(quick=False, *, batches=None, seq_lens=None, reps=None, r=8, log=None):
    """Per-token latency of one float32 forward for every variant, at every (batch, seq_len).

    Inputs:
    - quick: the tiny QUICK_MODEL at batches (1, 2), seq_lens (8, 16), 3 reps: about a second (tests)
    - batches, seq_lens: the grid (default (1, 16) and (8, 128)); seq_len <= the model's context
    - reps: round-robin rounds after a warm-up (default 25; 3 quick)
    - r: LoRA's rank (on W_q, W_v) and the adapters' bottleneck width
    - log: a print-like function for progress, or None

    Returns a JSON-ready dict:
    - "meta": machine, BLAS threads (the pool's size, and the environment), load average before/after,
      reps, quick, r, "model" (ModelConfig fields)
    - "cells": one per (batch, seq_len): {"batch", "seq_len", "tokens", "variants": {variant:
      {"median_s", "per_token_us", "vs_base", "wall_s"} from wall-clock time and "cpu_median_s",
      "cpu_per_token_us", "cpu_vs_base", "cpu_s" from the process's CPU time}}
    - "extra_params": numbers each variant runs beyond the base's (merged LoRA: 0)
    - "checks": "init_max_abs_diff" {adapter_h, adapter_l, lora}: |logits - base logits| with the
      adapters at init (0.0: each starts as exactly the base); "merged_max_abs_diff": merged against
      unmerged LoRA; "merged_same_arrays": the merged model holds the base's names and shapes
    """
    cfg = QUICK_MODEL if quick else LATENCY_MODEL
    batches = tuple(batches or ((1, 2) if quick else (1, 16)))
    seq_lens = tuple(seq_lens or ((8, 16) if quick else (8, 128)))
    reps = check_int("reps", reps if reps is not None else (3 if quick else 25), 1)
    check_int("r", r, 1)
    for b in batches:
        check_int("batch", b, 1)
    for t in seq_lens:
        if check_int("seq_len", t, 1) > cfg.context_length:
            raise ValueError(f"seq_len must be at most the model's context_length {cfg.context_length}, got {t}")
    meta = {
        **machine(),
        "blas_threads": blas_threads(),
        "threads": {v: os.environ.get(v, "unset") for v in THREAD_VARS},
        "load_before": list(os.getloadavg()),
        "reps": reps,
        "quick": quick,
        "r": r,
        "model": asdict(cfg),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    variants, at_init = latency_variants(cfg, r)
    base = variants["base"][0]
    rng = np.random.default_rng(1)

    # the invariants, on the smallest input: adapters at init change nothing; merged = unmerged
    x = rng.integers(0, cfg.vocab_size, size=(min(batches), min(seq_lens)))  # (B, T)
    base_logits, _ = model_forward(base, x)
    checks = {"init_max_abs_diff": {v: float(np.abs(model_forward(base, x, a, lo)[0] - base_logits).max())
                                    for v, (a, lo) in at_init.items()}}  # fmt: skip
    merged_logits, _ = model_forward(variants["merged_lora"][0], x)
    checks["merged_max_abs_diff"] = float(np.abs(merged_logits - model_forward(*_args(variants["lora"], x))[0]).max())
    merged = variants["merged_lora"][0]
    checks["merged_same_arrays"] = {k: a.shape for k, a in merged.items()} == {k: a.shape for k, a in base.items()}
    extra = {v: 0 if a is None else sum(arr.size for arr in a.values()) for v, (_, a, _) in variants.items()}

    cells = []
    for B in batches:
        for T in seq_lens:
            x = rng.integers(0, cfg.vocab_size, size=(B, T))  # (B, T) token ids
            fns = {v: _forward(variants[v], x) for v in VARIANTS}
            t = round_robin(fns, reps)
            for v in VARIANTS:  # wall time, and the process's CPU time: one thread, so the same when the
                # machine is idle, and the steadier of the two when other processes take the core away
                t[v]["per_token_us"] = t[v]["median_s"] / (B * T) * 1e6
                t[v]["cpu_per_token_us"] = t[v]["cpu_median_s"] / (B * T) * 1e6
                # against the base: the median of the ratios within a round, paired, so that a slow stretch of
                # the machine, which hits one round's variants alike, cancels
                for clock, key in (("wall_s", "vs_base"), ("cpu_s", "cpu_vs_base")):
                    t[v][key] = statistics.median(a / b for a, b in zip(t[v][clock], t["base"][clock], strict=True))
            cells.append({"batch": B, "seq_len": T, "tokens": B * T, "variants": t})
            if log is not None:
                log(f"  B={B:<3} T={T:<4} " + "  ".join(f"{v} {t[v]['cpu_per_token_us']:.1f}us" for v in VARIANTS))
    meta["load_after"] = list(os.getloadavg())
    return {"meta": meta, "cells": cells, "extra_params": extra, "checks": checks}


def _args(variant, x):
    params, adapters, lora = variant
    return (params, x) if adapters is None else (params, x, adapters, lora)


def _forward(variant, x):
    args = _args(variant, x)
    return lambda: model_forward(*args)


def latency_table(result, clock="cpu"):
    """The text table of a measure_latency result: µs per token and the change against the base,
    by the process's CPU time (clock="cpu", the steadier on a shared machine) or wall time ("wall")."""
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    key = "cpu_" if clock == "cpu" else ""
    m = result["meta"]
    c = m["model"]
    lines = [
        f"lora_np float32 forward, D={c['d_model']} L={c['n_layers']} H={c['n_heads']} M={c['d_mlp']} "
        f"V={c['vocab_size']}; r={m['r']} (LoRA on W_q, W_v; adapter bottleneck); median of {m['reps']} rounds",
        f"BLAS threads {m.get('blas_threads', '?')}; load average {m['load_before'][0]:.2f} before, "
        f"{m['load_after'][0]:.2f} after; {m['cpu']}",
        "",
    ]
    head = f"{'B':>3}{'T':>5}{'tokens':>8}" + "".join(f"{LABELS[v]:>21}" for v in VARIANTS)
    lines += [head, "-" * len(head)]
    for cell in result["cells"]:
        row = f"{cell['batch']:>3}{cell['seq_len']:>5}{cell['tokens']:>8}"
        for v in VARIANTS:
            t = cell["variants"][v]
            change = "" if v == "base" else f" ({t[key + 'vs_base'] - 1:+.1%})"
            row += f"{t[key + 'per_token_us']:>11.2f} us{change:>8}"
        lines.append(row)
    ch = result["checks"]
    lines += [
        "",
        f"us = microseconds per token ({clock} time, median), (+x%) = time against the base's at the same B, T.",
        f"extra numbers at inference: {', '.join(f'{LABELS[v]} {n:,}' for v, n in result['extra_params'].items())}",
        f"adapters at init vs base, max |logit difference|: {ch['init_max_abs_diff']}; merged vs unmerged LoRA: "
        f"{ch['merged_max_abs_diff']:.1e}; merged holds the base's arrays: {ch['merged_same_arrays']}",
    ]
    return "\n".join(lines)


def main(argv=None, prog="python -m lora_np latency"):
    """`python -m lora_np latency [--quick] [--reps N] [--r R] [--out FILE]`: measure and print."""
    p = Parser(prog=prog,
               description="Per-token inference latency of AdapterH, AdapterL and LoRA (merged, unmerged) against "
                           "the base, on lora_np's float32 forward. Run with OPENBLAS_NUM_THREADS=1.")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a tiny model and grid: about a second")
    p.add_argument("--reps", type=int, default=None, help="round-robin rounds (default 25; 3 with --quick)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank and adapter bottleneck width (default 8)")
    p.add_argument("--out", default=None, help="also write the result as JSON to this file")
    add_threads_flag(p)
    a = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if a.out is not None:
        try:
            check_out_file("--out", a.out)
        except ValueError as e:
            fail(p.prog, str(e))
    apply_threads(a.threads, (QUICK_MODEL if a.quick else LATENCY_MODEL).d_model)  # the policy: 1 at these widths
    try:
        result = measure_latency(a.quick, reps=a.reps, r=a.r, log=print)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    print(latency_table(result))
    if a.out is not None:
        text = (json.dumps(result, indent=1) + "\n").encode()
        write_atomic(a.out, lambda f: f.write(text))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
