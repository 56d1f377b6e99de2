"""The benchmark's figure, drawn from a benchmark JSON (lora_np.bench.cost measures; this only draws)."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..bench.cost import run
from ..studies.measure import QUICK_SIZES
from .plotting import FIGURES, STYLE, human_bytes, save

# ==================================================================================================
# bench.png: LoRA's cost model measured (lora_np.bench.cost). Reads a benchmark JSON: by default the one
# committed at figures/bench.json (measured by `python -m lora_np bench --out figures/bench.json`);
# if there is none (an installed package, not a clone), it runs the --quick benchmark (tiny sizes,
# a few seconds) and says so in the title. `python -m lora_np bench` also draws its own run with
# draw_bench(its JSON) next to that JSON.
# ==================================================================================================


def save_bench_png(json_path):
    """Draw a benchmark JSON into a PNG beside it (same name, .png), as `python -m lora_np figures`
    draws it; returns the PNG's path. The drawing reads the measurement, never the reverse."""
    png = Path(json_path).with_suffix(".png")
    with plt.rc_context(STYLE):
        save(draw_bench(json_path)[0], png)
    return png


def draw_bench(path=None):
    """Six panels from one benchmark run, one group of bars per model size.

    Top: time per training step (full fine-tuning, LoRA on W_q,W_v, LoRA on all six, r = 4) with
    the time the matrix products and AdamW alone would take at the machine's measured rates; LoRA's
    step time as a share of full fine-tuning's beside the share the operation count predicts; the
    flops per second reached, as a share of the machine's own (N, D)@(D, D) float32 matmul.
    Bottom: forward time of the merged and the unmerged LoRA model relative to the base model
    (paper Section 4.1: merged, no additional latency); optimizer state (AdamW's m and v); peak
    memory a training step allocates (tracemalloc).

    Inputs:
    - path: a JSON written by `python -m lora_np bench`; None runs a quick benchmark (seconds) and
      draws it

    Returns:
    - fig: matplotlib Figure
    - numbers: dict; "sizes" (names), "source" (the JSON read, or "quick run"), and per panel lists
      with one value per size: "step_ms", "predicted_ms", "ratio", "ratio_flops", "ratio_predicted",
      "share", "forward_vs_base", "state_bytes", "peak_bytes"
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no benchmark file at {path}: write one with `python -m lora_np bench --out {path}`")
        res, source = json.loads(path.read_text()), path.name
    else:
        res, source = run(list(QUICK_SIZES), 2, quick=True, log=lambda *a: None), "quick run"
    sizes = res["sizes"]
    names = [s["name"] for s in sizes]
    labels = [
        f"{s['name']}\nD={s['config']['d_model']} L={s['config']['n_layers']}\nT={s['config']['context_length']} "
        f"B={s['batch']}"
        for s in sizes
    ]
    variants = {"full": "full fine-tuning", "lora_qv": "LoRA W_q,W_v (r=4)", "lora_all": "LoRA all six (r=4)"}
    colors = {"full": "black", "lora_qv": "tab:blue", "lora_all": "tab:orange"}
    x = np.arange(len(sizes))
    w = 0.26
    n = {
        "sizes": names,
        "source": source,
        "step_ms": {v: [s["train"][v]["median_s"] * 1e3 for s in sizes] for v in variants},
        "predicted_ms": {v: [s["train"][v]["predicted_s"] * 1e3 for s in sizes] for v in variants},
        "share": {v: [s["train"][v]["share_of_matmul_model"] for s in sizes] for v in variants},
        "state_bytes": {v: [s["train"][v]["optimizer_state_bytes"] for s in sizes] for v in variants},
        "peak_bytes": {v: [s["train"][v]["peak_bytes"] for s in sizes] for v in variants},
        "ratio": {v: [s["lora_over_full"][v]["step_time"] for s in sizes] for v in ("lora_qv", "lora_all")},
        "ratio_flops": [s["lora_over_full"]["lora_qv"]["flops"] for s in sizes],
        "ratio_predicted": [s["lora_over_full"]["lora_qv"]["predicted"] for s in sizes],
        "forward_vs_base": {
            v: [s["forward"][v]["vs_base"] for s in sizes] for v in ("merged_qv", "lora_qv", "lora_all")
        },
    }

    fig, axes = plt.subplots(2, 3, figsize=(14, 8.2))

    def bars(ax, key, scale=1.0):
        for i, v in enumerate(variants):
            ax.bar(x + (i - 1) * w, np.array(n[key][v]) * scale, w, color=colors[v], alpha=0.8, label=variants[v])
        ax.set_xticks(x, labels, fontsize=8)

    ax = axes[0, 0]
    bars(ax, "step_ms")
    for i, v in enumerate(variants):
        ax.plot(x + (i - 1) * w, n["predicted_ms"][v], "_", color="red", ms=14, mew=2,
                label="matmuls + AdamW at measured rates" if i == 0 else None)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("time per training step (ms, log scale)")
    ax.set_title("training step: forward + backward + AdamW")
    ax.legend(fontsize=7.5, loc="upper left")

    ax = axes[0, 1]
    ax.plot(x, n["ratio"]["lora_qv"], "o-", color="tab:blue", label="measured, LoRA W_q,W_v")
    ax.plot(x, n["ratio"]["lora_all"], "o-", color="tab:orange", label="measured, LoRA all six")
    ax.plot(x, n["ratio_flops"], "s--", color="gray", label="W_q,W_v predicted: matmul flops")
    ax.plot(x, n["ratio_predicted"], "^:", color="red", label="W_q,W_v predicted: flops + AdamW traffic")
    ax.axhline(2 / 3, color="gray", lw=0.8, ls=(0, (1, 3)), label="2/3: forward and dx, no dW product")
    ax.axhline(0.65, color="tab:red", lw=0.8, label="target 0.65 (at d_model = 512)")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0.35, 1.05)
    ax.set_ylabel("LoRA step time / full fine-tuning's")
    ax.set_title("what skipping the frozen weights' gradients saves")
    ax.legend(fontsize=7.5, loc="lower right")

    ax = axes[0, 2]
    bars(ax, "share", scale=100)
    ax.axhline(50, color="tab:red", lw=0.8, label="target 50% (full, d_model = 512)")
    ax.set_ylim(0, 110)
    ax.set_ylabel("GFLOP/s reached, % of the (N,D)@(D,D) matmul's")
    ax.set_title("share of this machine's float32 matmul speed")
    ax.legend(fontsize=7.5, loc="upper left")

    ax = axes[1, 0]
    fwd = {"merged_qv": "merged W_q,W_v", "lora_qv": "unmerged W_q,W_v", "lora_all": "unmerged all six"}
    fcol = {"merged_qv": "tab:green", "lora_qv": "tab:blue", "lora_all": "tab:orange"}
    for i, v in enumerate(fwd):
        ax.bar(x + (i - 1) * w, (np.array(n["forward_vs_base"][v]) - 1) * 100, w, color=fcol[v], label=fwd[v])
    for y0 in (-5, 5):
        ax.axhline(y0, color="tab:red", lw=0.8, ls="--", label="target: merged within ±5%" if y0 > 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("forward time vs the base model (%)")
    ax.set_title("inference: merged LoRA costs what the base does")
    ax.legend(fontsize=7.5, loc="upper right")

    ax = axes[1, 1]
    bars(ax, "state_bytes")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(human_bytes))
    ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_ylabel("bytes (log scale)")
    ax.set_title("optimizer state (AdamW's m and v)")
    ax.legend(fontsize=7.5, loc="upper left")

    ax = axes[1, 2]
    bars(ax, "peak_bytes", scale=1e-6)
    ax.set_ylabel("MB (10^6 bytes)")
    ax.set_title("peak memory a training step allocates")
    ax.legend(fontsize=7.5, loc="upper left")

    m = res["meta"]
    fig.suptitle(
        f"LoRA's cost, measured on lora_np (float32): {m['cpu']}, {m['nproc']} cores, "
        f"OPENBLAS_NUM_THREADS={m['threads']['OPENBLAS_NUM_THREADS']}, load {m['load_before'][0]:.2f}; "
        f"median of {m['reps']} reps; source: {source}",
        fontsize=9.5,
    )
    fig.tight_layout()
    return fig, n


FIGURES["bench.png"] = draw_bench
