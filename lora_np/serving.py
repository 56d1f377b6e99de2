"""Serving many adapters in one batch, unmerged: the way around Section 4.2's limitation.

The paper (Section 4.2, "Practical Benefits and Limitations"): "it is not straightforward to
batch inputs to different tasks with different A and B in a single forward pass, if one chooses
to absorb A and B into W to eliminate additional inference latency. Though it is possible to not
merge the weights and dynamically choose the LoRA modules to use for samples in a batch for
scenarios where latency is not critical."

This module does the second: one frozen base W0, K adapters, and a batch whose row i uses
adapter k_i. For every adapted weight, in column form,

    h_i = W0·x_i + b + s_{k_i}·B_{k_i}·A_{k_i}·x_i

The frozen path W0·x is ONE product for the whole batch, whatever the tasks (the point of
serving many adapters on one base); only the r-wide LoRA path differs from row to row. Two ways
to batch that path, both here (`strategy`):

- "group" (the default): sort the rows by adapter and run each adapter once on its rows,
  (n_k·T, d_in) @ (d_in, r) then (n_k·T, r) @ (r, d_out). K pairs of products, no copy of any
  adapter. This is what PEFT's mixed-batch inference does (`adapter_names=` in its forward).
- "gather": copy each row's own A and B out of a stacked bank, (B, r, d_in) and (B, d_out, r),
  and run one batched product for all rows. On a GPU this is one kernel (Punica's BGMV, S-LoRA);
  in NumPy the gather copies B·r·(d_in + d_out) numbers per adapted weight per forward and the
  batched product loops over rows, so it is kept for comparison, not as the default.

A merged model cannot do this: W0 + s·B_k·A_k is one task's weight, so a mixed batch needs one
forward per task, each on its own rows, and one merged copy of the adapted weights per task
(`merged_forward`). `bench_serving` measures both.

Adapters may differ in rank and scaling (α, rsLoRA), as in S-LoRA's heterogeneous adapters: the
bank pads every A, B to the largest rank with zeros, which adds exactly nothing. They must share
targets (one layout for every adapter), be plain LoRA (DoRA's and VeRA's forward differ), and be
trained on W0 itself: PiSSA adapters belong to a residual base and QLoRA adapters to a 4-bit one.

Forward only: inference has no backward, no dropout and no cache.

Dimension legend: B batch (rows), T time, D model width, V vocabulary, K adapters in the bank,
n_k rows that use adapter k, r rank (r_max the bank's largest), d_in / d_out a weight's widths.

References
- Hu et al. 2021, "LoRA", arXiv:2106.09685v2, Section 4.2.
- Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", arXiv:2311.03285.
- Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", arXiv:2310.18547 (the BGMV kernel).
"""

import json
import os
import sys
import time
from dataclasses import asdict
from numbers import Integral
from pathlib import Path

import numpy as np

from .checkpoint import write_atomic
from .cli import Parser, check_out_file, fail
from .config import LoraConfig
from .layers import attention_forward, embedding_forward, gelu_forward, layernorm_forward, linear_forward
from .lora import check_adapters, init_lora, merge
from .model import check_tokens
from .params import Params, cast, check_params, init_params, is_quantized
from .threads import add_threads_flag, apply_threads

STRATEGIES = ("group", "gather")


# ----------------------------------------------------------------------------
# the bank: K adapters, checked once and stacked


def adapter_bank(params, adapter_sets, loras):
    """Check K adapter sets against the base and stack them, once, as a server loads them.

    Inputs:
    - params: the base Params (W0), float, not quantized
    - adapter_sets: list of K adapter dicts (from init_lora, trained), names "blocks.{l}.{t}.A" / ".B"
    - loras: one LoraConfig for all, or a list of K, one per set (ranks and scalings may differ)

    Returns:
    - bank: dict with
        "config": the ModelConfig; "targets": tuple; "K": int
        "ranks": [r_k]; "scalings": np.ndarray (K,) of s_k in the params' dtype
        "A": {weight name: (K, r_max, d_in)}, "B": {weight name: (K, d_out, r_max)}, zero beyond r_k
    """
    check_params(params)
    if is_quantized(params):
        raise ValueError("params must hold float weights W0; a 4-bit (NF4) base is not served here")
    if not isinstance(adapter_sets, (list, tuple)) or not adapter_sets:
        raise ValueError(f"adapter_sets must be a non-empty list of adapter dicts, got {adapter_sets!r:.60}")
    K = len(adapter_sets)
    if isinstance(loras, LoraConfig):
        loras = [loras] * K
    if not isinstance(loras, (list, tuple)) or len(loras) != K:
        got = f"{len(loras)} configs" if isinstance(loras, (list, tuple)) else type(loras).__name__
        raise ValueError(f"loras must be one LoraConfig or a list of {K}, one per adapter set, got {got}")
    targets = loras[0].targets if isinstance(loras[0], LoraConfig) else None
    for k, (adapters, lora) in enumerate(zip(adapter_sets, loras, strict=True)):
        if not isinstance(lora, LoraConfig):
            raise TypeError(f"loras[{k}] must be a LoraConfig, got {type(lora).__name__}")
        if lora.method != "lora" or lora.init == "pissa" or lora.base_quant is not None:
            raise ValueError(f"loras[{k}] must be plain LoRA on the float base W0 (method 'lora', init 'gaussian' or "
                             f"'kaiming', no base_quant), got method={lora.method!r}, init={lora.init!r}, "
                             f"base_quant={lora.base_quant!r}")  # fmt: skip
        if lora.targets != targets:
            raise ValueError(f"every adapter set must adapt the same weights: loras[0] has targets {targets}, "
                             f"loras[{k}] has {lora.targets}")  # fmt: skip
        try:
            check_adapters(params, adapters, lora)
        except (TypeError, ValueError) as e:
            raise type(e)(f"adapter_sets[{k}]: {e}") from None
    dtype, r_max = params["W_e"].dtype, max(lora.r for lora in loras)
    bank = {"config": params.config, "targets": targets, "K": K, "ranks": [lora.r for lora in loras],
            "scalings": np.array([lora.scaling for lora in loras], dtype=dtype), "A": {}, "B": {}}  # fmt: skip
    for l in range(params.config.n_layers):
        for t in targets:
            name = f"blocks.{l}.{t}"
            d_out, d_in = params[name].shape
            A = np.zeros((K, r_max, d_in), dtype=dtype)
            B = np.zeros((K, d_out, r_max), dtype=dtype)
            for k, (adapters, lora) in enumerate(zip(adapter_sets, loras, strict=True)):
                A[k, : lora.r] = adapters[name + ".A"]  # rows beyond r_k stay 0: they add exactly nothing
                B[k, :, : lora.r] = adapters[name + ".B"]
            bank["A"][name], bank["B"][name] = A, B
    return bank


def check_index(index, batch, K, name="index"):
    """The adapter of each row as an int64 array (B,), or a clear error."""
    if not isinstance(index, np.ndarray) or not np.issubdtype(index.dtype, np.integer):
        got = f"dtype {index.dtype}" if isinstance(index, np.ndarray) else type(index).__name__
        raise TypeError(f"{name} must be a numpy integer array, one adapter number a row, got {got}")
    if index.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), one adapter a row of tokens, got {index.shape}")
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= K:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds adapter {bad}; the bank has K={K} adapters, so entries must be in [0, {K})")
    return index.astype(np.int64)


# ----------------------------------------------------------------------------
# one adapted linear layer, every row its own adapter


def multi_lora_linear(x, W, b, A, B, scalings, index, groups=None, strategy="group"):
    """h_i = W0·x_i + b + s_{k_i}·B_{k_i}·A_{k_i}·x_i for every row i of a batch.

    Inputs:
    - x: (B, T, d_in)
    - W: (d_out, d_in), the frozen W0; b: (d_out,) or None
    - A: (K, r, d_in), B: (K, d_out, r), the bank's stacked adapters of this weight
    - scalings: (K,) s_k; index: (B,) ints in [0, K), the adapter of each row
    - groups: [(k, rows)] as `row_groups` makes them (computed once per forward); "group" only
    - strategy: "group" or "gather" (module docstring)

    Returns:
    - h: (B, T, d_out)
    """
    h, _ = linear_forward(x, W, b)  # (B, T, d_out)   W0·x + b: one product for the whole batch
    if strategy == "group":
        for k, rows in groups if groups is not None else row_groups(index):
            xk = x[rows]  # (n_k, T, d_in), a copy of the rows of this adapter
            xA = xk @ A[k].T  # (n_k, T, r)   A_k·x, only r wide
            h[rows] += (scalings[k] * xA) @ B[k].T  # (n_k, T, d_out)   s_k·B_k·(A_k·x)
    elif strategy == "gather":
        A_rows, B_rows = A[index], B[index]  # (B, r, d_in), (B, d_out, r): copies, one a row
        xA = x @ A_rows.transpose(0, 2, 1)  # (B, T, r)   batched over rows: row i with its own A
        xA *= scalings[index][:, None, None]  # s_{k_i}, (B, 1, 1)
        h += xA @ B_rows.transpose(0, 2, 1)  # (B, T, d_out)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return h


def row_groups(index):
    """[(k, rows)] for every adapter k that occurs in index, rows its row numbers (in order)."""
    return [(int(k), np.flatnonzero(index == k)) for k in np.unique(index)]


# ----------------------------------------------------------------------------
# the whole model


def multi_lora_forward(params, tokens, bank, index, strategy="group"):
    """Logits of the tiny GPT where row i of the batch runs with adapter index[i], unmerged.

    The same model as lora_np.model.model_forward (pre-LN blocks, GPT-2 style), forward only; every
    weight in bank["targets"] goes through multi_lora_linear, every other one through linear_forward.
    It keeps no cache (model_forward keeps every layer's for the backward), so each layer's arrays
    are freed as it ends; with bank=None it is the plain model, base or merged, by the same code,
    which is what bench_serving times it against: like with like.

    Inputs:
    - params: the base Params (W0) the bank was built on
    - tokens: (B, T) integer ids
    - bank: from adapter_bank(params, ...), or None for the plain model (then index must be None)
    - index: (B,) integer array, entries in [0, bank["K"])
    - strategy: "group" (default) or "gather"

    Returns:
    - logits: (B, T, V)
    """
    check_params(params)
    cfg = params.config
    check_tokens(tokens, cfg)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if bank is None:
        if index is not None:
            raise ValueError("index was given without a bank; pass both (bank from adapter_bank) or neither")
        targets = ()
    else:
        if not isinstance(bank, dict) or not {"config", "targets", "K", "scalings", "A", "B"} <= set(bank):
            raise TypeError(f"bank must be the dict adapter_bank returns, or None, got {type(bank).__name__}")
        if bank["config"] != cfg:
            raise ValueError(f"bank was built for {bank['config']}, but params are {cfg}")
        index = check_index(index, tokens.shape[0], bank["K"])
        targets = bank["targets"]
    groups = row_groups(index) if targets and strategy == "group" else None  # once, shared by every adapted weight

    def proj(inp, l, w):
        name = f"blocks.{l}.{w}"
        W, b = params[name], params[f"blocks.{l}.b_{w[2:]}"]
        if w not in targets:
            return linear_forward(inp, W, b)[0]
        return multi_lora_linear(inp, W, b, bank["A"][name], bank["B"][name], bank["scalings"], index, groups,
                                 strategy)  # fmt: skip

    T = tokens.shape[1]
    x = embedding_forward(tokens, params["W_e"])[0] + embedding_forward(np.arange(T), params["W_p"])[0]  # (B, T, D)
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        a = layernorm_forward(x, params[p + "ln1.gamma"], params[p + "ln1.beta"])[0]  # 1
        y = attention_forward(proj(a, l, "W_q"), proj(a, l, "W_k"), proj(a, l, "W_v"), cfg.n_heads)[0]  # 2, 3
        x = x + proj(y, l, "W_o")  # 4
        m = layernorm_forward(x, params[p + "ln2.gamma"], params[p + "ln2.beta"])[0]  # 5
        x = x + proj(gelu_forward(proj(m, l, "W_1"))[0], l, "W_2")  # 6, 7, 8
    xf = layernorm_forward(x, params["ln_f.gamma"], params["ln_f.beta"])[0]
    return linear_forward(xf, params["W_u"], None)[0]  # (B, T, V)


def merged_forward(merged_models, tokens, index):
    """What a merged deployment does with a mixed batch: one forward a task, each on its own rows.

    Inputs:
    - merged_models: list of K Params, merged_models[k] = merge(base, adapters_k, lora_k)
    - tokens: (B, T) ids; index: (B,) ints in [0, K)

    Returns:
    - logits: (B, T, V), row i from merged_models[index[i]]
    """
    if not isinstance(merged_models, (list, tuple)) or not merged_models:
        raise ValueError(f"merged_models must be a non-empty list of Params, got {merged_models!r:.60}")
    if not all(isinstance(m, Params) for m in merged_models) or len({m.config for m in merged_models}) != 1:
        raise ValueError("merged_models must all be Params of one ModelConfig")
    check_tokens(tokens, merged_models[0].config)
    index = check_index(index, tokens.shape[0], len(merged_models))
    out = None
    for k, rows in row_groups(index):
        logits = multi_lora_forward(merged_models[k], tokens[rows], None, None)  # (n_k, T, V), the plain model
        if out is None:
            out = np.empty((tokens.shape[0], *logits.shape[1:]), dtype=logits.dtype)
        out[rows] = logits
    return out


# ----------------------------------------------------------------------------
# cost: unmerged mixed batch against one merged model per task

SERVING_LORA = LoraConfig(r=8, alpha=8.0, targets=("W_q", "W_v"))  # the paper's targets (Section 7.1)
SERVING_TASKS = (1, 2, 4, 8, 16)  # tasks in one batch of SERVING_BATCH rows
SERVING_BATCH = 16
QUICK_TASKS = (1, 2)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "notebooks" / "serving_results.json"


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
    (round-robin medians, lora_np.bench._round_robin; wall and CPU seconds):
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
    from .bench import _round_robin  # here, not at the top: bench may import this module to wire it in

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
        t = _round_robin(fns, reps)
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
    - sizes: names from lora_np.bench.SIZES (or QUICK_SIZES); quick=True uses QUICK_SIZES' "q32"
      alone, tasks (1, 2), a batch of 4 and one rep: about a second, for tests (structure only)
    - reps: timed rounds after a warm-up round

    Returns:
    - {"meta": {"reps", "quick", "threads", "load_before", "load_after", "numpy"},
       "sizes": [{"name", **serving_cost(...)}]}
    """
    from .bench import QUICK_SIZES, SIZES  # here, not at the top: bench may import this module to wire it in

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


def main(argv=None, prog="python -m lora_np serving"):
    """`python -m lora_np serving [--out FILE] [--reps N] [--quick] [--threads N]`: measure, write the results."""
    p = Parser(prog=prog,
               description="Measure multi-adapter serving, unmerged (one forward, each row its own adapter) against "
                           "merged (one forward a task), and write the JSON notebook 09 reads.")  # fmt: skip
    p.add_argument("--out", default=None, help=f"JSON file (default {DEFAULT_OUT}; with --quick, none)")
    p.add_argument("--reps", type=int, default=7, help="timed rounds after a warm-up (default 7)")
    p.add_argument("--quick", action="store_true", help="a tiny model, one rep: a smoke test, written only to --out")
    add_threads_flag(p)
    a = p.parse_args(sys.argv[1:] if argv is None else list(argv))
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
