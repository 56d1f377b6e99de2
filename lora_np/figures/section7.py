"""The figures of the paper's Section 7 on the tiny GPT, drawn from notebooks/section7_results.json
(see lora_np.figures)."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..studies.experiments import DEFAULT_RESULTS, EXPECTED_KEYS, load_results
from .plotting import FIGURES

# ==================================================================================================
# subspace_similarity.png, rank_sweep.png and weight_similarity.png: Section 7 of the paper on the
# tiny GPT (Tables 5-7, Figures 3, 4 and 8). All draw from notebooks/section7_results.json, written by
# `python -m lora_np experiments` and checked against the code's configuration by
# lora_np.studies.experiments.load_results, so drawing is instant. notebooks/05_what_lora_learns.ipynb shows
# and explains them. Every panel pools the replicates: 3 bases x 3 fine-tuning seeds by default,
# drawn as their mean, and, in the line plots, as the band from their minimum to their maximum.
# ==================================================================================================


def _section7_results(results):
    """The checked results file when results is a path (None: section7_results.json in the current
    folder); else results, which must look like one."""
    if results is None or isinstance(results, (str, Path)):
        return load_results(DEFAULT_RESULTS if results is None else results)
    if not (isinstance(results, dict) and all(k in results for k in EXPECTED_KEYS)):
        raise TypeError(f"results must be the dict studies.experiments.load_results returns, got {results!r:.80}")
    return results


def _phi_map(ax, grid, title, xlabel, ylabel):
    """One φ heatmap, i down the rows and j along the columns, both counted from 1 as in the paper."""
    k1, k2 = len(grid), len(grid[0])
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
                   extent=(0.5, k2 + 0.5, k1 + 0.5, 0.5))  # fmt: skip
    ax.grid(False)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8.5)
    ax.set_ylabel(ylabel, fontsize=8.5)
    ax.tick_params(labelsize=7.5)
    return im


def _runs(per_base):
    """[[x, one a seed (or pair)], one a base] -> array with one row a run: the replicates, pooled."""
    a = np.array(per_base, dtype=float)
    return a.reshape(-1, *a.shape[2:])


def _band(ax, x, runs, color, label, ls="-"):
    """The mean of runs (n, len(x)) as a line, their min-max range as a band."""
    ax.fill_between(x, runs.min(axis=0), runs.max(axis=0), color=color, alpha=0.2, lw=0)
    ax.plot(x, runs.mean(axis=0), ls, color=color, label=label, lw=1.6)


def draw_subspace_similarity(results=None):
    """Figures 3 and 4 of the paper, on the tiny GPT: how much two learned A matrices share.

    Top row (Figure 3): φ(A_{r=8}, A_{r=64}, i, j) for the A of W_q and of W_v in each layer, from
    two {W_q, W_v} runs with the same seed (the same batches) and independently drawn A: how much of
    the top-i right-singular directions of the rank-8 A lies in the top-j of the rank-64 A; mean over
    every base and seed. Middle row (Figure 4): φ(A_{r=64}, A'_{r=64}, i, j) for two seeds, mean over
    every base and pair of seeds, and the same map for two random Gaussian matrices (which is also
    what Figure 4 would show at initialization). Bottom row: the diagonals φ(i, i), mean and min-max
    band over the runs: trained, at initialization (the baseline), the control whose r = 8 start
    shares the r = 64 run's stream (trained, dashed), and chance i/64.
    φ is eq. (4), computed by lora_np.analysis.subspace_similarity_grid; 1 means contained, 0
    orthogonal. With d_model = 64, chance is not 0 but about max(i, j)/64; the maps are kept for the
    top `corner` directions of the r = 64 adapters, where learned and random maps differ.

    Inputs:
    - results: the dict lora_np.studies.experiments.load_results returns, or the path of a results
      file; None reads section7_results.json in the current folder

    Returns:
    - fig: matplotlib Figure
    - numbers: dict; for each panel name ("layer {l} W_q", ...): {"small_large", "init", "shared",
      "seed_seed": mean grids (lists of lists), "diag_small_large", "diag_init", "diag_shared",
      "diag_seed_seed": (n_runs, k) arrays of φ(i, i)}; "random": grid; "small_rank", "large_rank",
      "corner", "n_runs": int
    """
    sub = _section7_results(results)["subspace"]
    small, large, k = sub["small_rank"], sub["large_rank"], sub["corner"]
    panels = [(f"layer {l} {t}", maps[t]) for l, maps in enumerate(sub["layers"]) for t in ("W_q", "W_v")]
    n_b, n_s = len(sub["base_seeds"]), len(sub["seeds"])
    numbers = {"random": sub["random"], "small_rank": small, "large_rank": large, "corner": k, "n_runs": n_b * n_s}
    for name, maps in panels:
        trained, shared, pairs = _runs(maps["small_large"]), _runs(maps["shared"]), _runs(maps["seed_seed"])
        init, shared_init = np.array(maps["init"]), np.array(maps["shared_init"])
        numbers[name] = {
            "small_large": trained.mean(axis=0).tolist(), "init": init.mean(axis=0).tolist(),
            "shared": shared.mean(axis=0).tolist(), "seed_seed": pairs.mean(axis=0).tolist(),
            "diag_small_large": np.diagonal(trained, axis1=1, axis2=2),
            "diag_init": np.diagonal(init, axis1=1, axis2=2),
            "diag_shared": np.diagonal(shared, axis1=1, axis2=2),
            "diag_shared_init": np.diagonal(shared_init, axis1=1, axis2=2),
            "diag_seed_seed": np.diagonal(pairs, axis1=1, axis2=2),
        }  # fmt: skip

    fig = plt.figure(figsize=(14, 10), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[0.8, 1.1, 1.0])
    axes = top.subplots(1, len(panels))
    for ax, (name, _) in zip(axes, panels, strict=True):
        im = _phi_map(ax, numbers[name]["small_large"], f"{name}: r={small} vs r={large}", f"j (top-j of A, r={large})",
                      f"i (top-i of A, r={small})")  # fmt: skip
    top.colorbar(im, ax=axes, shrink=0.9, label="φ")
    top.suptitle(f"Figure 3 on the tiny GPT: φ(A_r={small}, A_r={large}, i, j), one seed for both ranks, A drawn "
                 f"independently; mean of {n_b * n_s} runs ({n_b} bases x {n_s} seeds), j <= {k}",
                 fontsize=10.5)  # fmt: skip

    axes = middle.subplots(1, len(panels) + 1)
    for ax, (name, _) in zip(axes[:-1], panels, strict=True):
        im = _phi_map(ax, numbers[name]["seed_seed"], f"{name}: seed vs seed", "j (other seed)", "i (one seed)")
    _phi_map(axes[-1], sub["random"], "two random Gaussian matrices\n(= Figure 4 at initialization)", "j", "i")
    for ax in axes:
        ax.set_aspect("equal")
    middle.colorbar(im, ax=axes, shrink=0.85, label="φ")
    middle.suptitle(f"Figure 4 on the tiny GPT: φ(A_r={large}, A'_r={large}, i, j), two seeds; mean of "
                    f"{n_b * len(sub['pairs'])} pairs; the top {k} of {large} directions (chance: about "
                    f"max(i, j)/{large})", fontsize=10.5)  # fmt: skip

    axes = bottom.subplots(1, len(panels) + 1, sharey=True)
    i_small, i_k = np.arange(1, small + 1), np.arange(1, k + 1)
    for ax, (name, _) in zip(axes[:-1], panels, strict=True):
        nb = numbers[name]
        _band(ax, i_small, nb["diag_small_large"], "tab:blue", "trained")
        _band(ax, i_small, nb["diag_init"], "tab:gray", "at initialization")
        _band(ax, i_small, nb["diag_shared"], "tab:red", "trained, shared start", ls="--")
        _band(ax, i_small, nb["diag_shared_init"], "tab:orange", "shared start, at init", ls=":")
        ax.plot(i_small, i_small / large, "k:", lw=1, label=f"chance i/{large}")
        ax.set_title(f"{name}: φ(i, i), r={small} vs r={large}", fontsize=9)
        ax.set_xlabel("i = j", fontsize=8.5)
    axes[0].set_ylabel("φ")
    axes[0].legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    for (name, _), color in zip(panels, ("tab:blue", "tab:green", "tab:purple", "tab:brown"), strict=True):
        _band(ax, i_k, numbers[name]["diag_seed_seed"], color, name)
    ax.plot(i_k, np.diagonal(np.array(sub["random"])), "k--", lw=1, label="random Gaussian")
    ax.set_title(f"φ(i, i), seed vs seed, r={large}", fontsize=9)
    ax.set_xlabel("i = j", fontsize=8.5)
    ax.legend(fontsize=7)
    bottom.suptitle("Diagonals: mean and min-max band over the runs; at initialization against trained", fontsize=10.5)
    fig.suptitle("Normalized subspace similarity of learned LoRA matrices A (paper eq. 4), LoRA on W_q, W_v",
                 fontsize=11.5)  # fmt: skip
    return fig, numbers


def _short(targets):  # "q,k" for W_q, W_k; "W1,W2" for the MLP
    return ",".join(t[2:] if t in ("W_q", "W_k", "W_v", "W_o") else t.replace("_", "") for t in targets)


def draw_rank_sweep(results=None):
    """Tables 5 and 6 of the paper, on the tiny GPT: which weights at a fixed budget, and what rank.

    Left (Table 5): validation loss on the fine-tuning domain when one budget of trainable numbers
    is spent on different weights: r = 8 on one attention matrix, 4 on two, 2 on all four; and on
    the MLP at the nearest integer rank (its share of the budget in the label). Dots are runs (one
    color a base, one dot a fine-tuning seed), the bar their mean. Right (Table 6): loss against r
    for W_q; W_q, W_v; all four: the mean over every base and seed and the min-max band; the bases
    differ by more than the seeds (each has its own validation sentences), so the band is wide and
    the comparisons that matter are within a base, in the notebook. Lower is better (the paper's
    tables report accuracy: higher is better there).

    Inputs:
    - results: the dict lora_np.studies.experiments.load_results returns, or the path of a results
      file; None reads section7_results.json in the current folder

    Returns:
    - fig: matplotlib Figure
    - numbers: dict; "budget": {label: [[loss, one a seed], one a base]}, "sweep": {targets: [[mean
      loss over the seeds, one a rank], one a base]}, "ranks": [int], "base_val_loss": [float, one a base]
    """
    res = _section7_results(results)
    budget, sweep = res["budget"], res["rank_sweep"]
    base_colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]

    n_b = len(sweep["base_seeds"])
    fig = plt.figure(figsize=(14, 5), layout="constrained")
    gs = fig.add_gridspec(1, 1 + n_b, width_ratios=[1.6] + [0.6] * n_b)
    ax = fig.add_subplot(gs[0])
    labels, losses = [], {}
    for x, row in enumerate(budget["rows"]):
        share = "" if row["trainable"] == budget["budget"] else f"\n{row['budget_ratio']:.0%}"
        label = f"{_short(row['targets'])}\nr={row['r']}{share}"
        v = np.array(row["val_loss"])  # (bases, seeds)
        for b, per_base in enumerate(v):
            offsets = np.linspace(-0.25, 0.25, v.size).reshape(v.shape)[b]
            ax.plot(x + offsets, per_base, "o", color=base_colors[b % len(base_colors)], ms=3.5, alpha=0.85,
                    label=f"base {budget['base_seeds'][b]}" if x == 0 else None)  # fmt: skip
        ax.hlines(v.mean(), x - 0.32, x + 0.32, color="black", lw=1.8)
        labels.append(label)
        losses[label.replace("\n", " ")] = row["val_loss"]
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("adapted weights (q, k, v, o: W_q, W_k, W_v, W_o; W1, W2: the MLP, share of the budget below)",
                  fontsize=8.5)  # fmt: skip
    ax.set_ylabel("validation cross-entropy (nats per character)")
    ax.set_title(f"Table 5: one budget ({budget['budget']:,} trainable numbers), spent on different weights\n"
                 f"dots: runs, one color a base (seeds {budget['seeds']} each); bar: the mean",
                 fontsize=9.5)  # fmt: skip
    ax.legend(fontsize=8, loc="upper right")
    colors = {"W_q": "tab:green", "W_q,W_v": "tab:blue", "W_q,W_k,W_v,W_o": "tab:purple"}
    curves = {}
    for b in range(n_b):
        bx = fig.add_subplot(gs[1 + b])  # its own scale: the bases' levels differ more than their curves
        for row in sweep["rows"]:
            name = ",".join(row["targets"])
            runs = np.array(row["val_loss"][b], dtype=float)  # (seeds, ranks)
            _band(bx, sweep["ranks"], runs, colors.get(name), name, ls="o-")
            curves.setdefault(name, []).append(runs.mean(axis=0).tolist())
        bx.set_xscale("log", base=2)
        bx.set_xticks(sweep["ranks"], [str(r) for r in sweep["ranks"]])
        bx.set_xlabel("LoRA rank r (log scale)", fontsize=8.5)
        bx.set_title(f"Table 6, base {sweep['base_seeds'][b]}\nmean, min-max of {len(sweep['seeds'])} seeds",
                     fontsize=9)  # fmt: skip
        if b == 0:
            bx.set_ylabel("validation cross-entropy (nats per character)", fontsize=8.5)
            bx.legend(fontsize=7.5, title="adapted weights", title_fontsize=7.5)
    base_loss = budget["base_val_loss"]
    fig.suptitle(f"Which weights, what rank: LoRA on the tiny GPT, fine-tuned on Yoda word order "
                 f"(pretrained bases: {min(base_loss):.3f} to {max(base_loss):.3f}; lower is better)",
                 fontsize=11)  # fmt: skip
    numbers = {"budget": losses, "sweep": curves, "ranks": sweep["ranks"], "base_val_loss": base_loss}
    return fig, numbers


def draw_weight_similarity(results=None):
    """Figure 8 of the paper (Appendix H.3), on the tiny GPT: which of W_q's directions ΔW_q acts on.

    φ(W_q, ΔW_q, i, j) (eq. 4 with lora_np.analysis.weight_similarity_grid, right singular vectors):
    how much of ΔW_q's top-j directions lies in W_q's top-i, for i over all of W_q's directions. A map
    that stays low until large i means ΔW_q works in directions W_q hardly uses. Left: the r = 8 and
    r = 64 runs, each layer, mean over every base and seed; right of them, W_q against a random
    Gaussian matrix (the figure's baseline, chance about i/64 for i >= j). The last column: the
    curves φ(i, j_max) with their min-max band.

    Inputs:
    - results: the dict lora_np.studies.experiments.load_results returns, or the path of a results
      file; None reads section7_results.json in the current folder

    Returns:
    - fig: matplotlib Figure
    - numbers: dict; for each "layer {l}": {"r={r}": (n_runs, D, j_max) array, "random": (n_bases, D,
      j_max) array}; "ranks", "j_max"
    """
    ws = _section7_results(results)["weight_similarity"]
    ranks, j_max, t = ws["ranks"], ws["j_max"], ws["target"]
    numbers = {"ranks": ranks, "j_max": j_max}
    fig, axes = plt.subplots(len(ws["layers"]), len(ranks) + 2, figsize=(13, 4.2 * len(ws["layers"])),
                             layout="constrained", squeeze=False)  # fmt: skip
    for l, (per_layer, row) in enumerate(zip(ws["layers"], axes, strict=True)):
        dW = np.array(per_layer["dW"], dtype=float)  # (bases, seeds, ranks, D, j_max)
        dW = dW.reshape(-1, *dW.shape[2:])  # (runs, ranks, D, j_max)
        rand = np.array(per_layer["random"], dtype=float)  # (bases, D, j_max)
        numbers[f"layer {l}"] = {f"r={r}": dW[:, k] for k, r in enumerate(ranks)} | {"random": rand}
        for k, r in enumerate(ranks):
            im = _phi_map(row[k], dW[:, k].mean(axis=0), f"layer {l}: {t} vs Δ{t}, r={r}", f"j (top-j of Δ{t})",
                          f"i (top-i of {t})")  # fmt: skip
        _phi_map(row[len(ranks)], rand.mean(axis=0), f"layer {l}: {t} vs random", "j (top-j of random)",
                 f"i (top-i of {t})")  # fmt: skip
        bx = row[-1]
        D = dW.shape[2]
        i = np.arange(1, D + 1)
        for k, (r, color) in enumerate(zip(ranks, ("tab:blue", "tab:purple"), strict=False)):
            _band(bx, i, dW[:, k, :, -1], color, f"Δ{t}, r={r}")
        _band(bx, i, rand[:, :, -1], "tab:gray", "random", ls="--")
        bx.plot(i, np.maximum(i, j_max) / D, "k:", lw=1, label=f"chance max(i, {j_max})/{D}")
        bx.set_title(f"layer {l}: φ({t}, ·, i, j={j_max})", fontsize=9)
        bx.set_xlabel(f"i (top-i of {t})", fontsize=8.5)
        bx.set_ylabel("φ", fontsize=8.5)
        bx.legend(fontsize=7)
    fig.colorbar(im, ax=axes[:, : len(ranks) + 1], shrink=0.8, label="φ")
    fig.suptitle(f"Figure 8 on the tiny GPT: φ between the top-i singular directions of {t} and the top-j of "
                 f"Δ{t} (right singular vectors); mean of {dW.shape[0]} runs, band: min-max", fontsize=11)  # fmt: skip
    return fig, numbers


FIGURES["subspace_similarity.png"] = draw_subspace_similarity
FIGURES["rank_sweep.png"] = draw_rank_sweep
FIGURES["weight_similarity.png"] = draw_weight_similarity
