"""The figures of the paper's Section 7 on the tiny GPT, drawn from notebooks/section7_results.json
(see lora_np.figures)."""

import matplotlib.pyplot as plt

from .plotting import FIGURES

# ==================================================================================================
# subspace_similarity.png and rank_sweep.png: Section 7 of the paper on the tiny GPT (Tables 5-7,
# Figures 3-4). Both draw from notebooks/section7_results.json, written by `python -m lora_np.experiments`
# and checked against the code's configuration by lora_np.experiments.load_results, so drawing is
# instant. notebooks/05_what_lora_learns.ipynb shows and explains them.
# ==================================================================================================


def _section7_results(results):
    """The checked results file when results is None; else results, which must look like one."""
    from .experiments import EXPECTED_KEYS, load_results

    if results is None:
        return load_results()
    if not (isinstance(results, dict) and all(k in results for k in EXPECTED_KEYS)):
        raise TypeError(f"results must be the dict lora_np.experiments.load_results returns, got {results!r:.80}")
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


def draw_subspace_similarity(results=None, zoom=16):
    """Figures 3 and 4 of the paper, on the tiny GPT: how much two learned A matrices share.

    Top (Figure 3): φ(A_{r=8}, A_{r=64}, i, j) for the A of W_q and of W_v in each layer, from two
    {W_q, W_v} runs with the same seed: how much of the top-i right-singular directions of the rank-8
    A lies in the top-j of the rank-64 A. Bottom (Figure 4): φ(A_{r=64}, A'_{r=64}, i, j) for two
    seeds, and the same map for two random Gaussian matrices, in its top-left zoom x zoom corner.
    φ is eq. (4), computed by lora_np.analysis.subspace_similarity_grid; 1 means contained, 0
    orthogonal. With d_model = 64, j = 64 is the whole space, so the last column is 1 by
    construction, and chance is not 0 but about max(i, j)/64 (the random panel); the corner is
    where learned and random maps differ.

    Inputs:
    - results: the dict lora_np.experiments.load_results returns; None loads the committed file
    - zoom: int, how many top directions the Figure 4 row shows; None for all of them

    Returns:
    - fig: matplotlib Figure
    - numbers: dict; "small_large" and "seed_seed": {"layer {l} W_q" / "... W_v": grid (list of lists),
      full size}, "random": grid, "small_rank", "large_rank", "zoom" (int)
    """
    sub = _section7_results(results)["subspace"]
    small, large, (s0, s1) = sub["small_rank"], sub["large_rank"], sub["seeds"]
    zoom = large if zoom is None else zoom
    if not (isinstance(zoom, int) and 1 <= zoom <= large):
        raise ValueError(f"zoom must be None or an int in 1..{large}, got {zoom!r}")
    panels = [(f"layer {l} {t}", maps[t]) for l, maps in enumerate(sub["layers"]) for t in ("W_q", "W_v")]

    fig = plt.figure(figsize=(13, 6.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.25])
    axes = top.subplots(1, len(panels))
    for ax, (name, maps) in zip(axes, panels, strict=True):
        im = _phi_map(ax, maps["small_large"], f"{name}: r={small} vs r={large}", f"j (top-j of A, r={large})",
                      f"i (top-i of A, r={small})")  # fmt: skip
    top.colorbar(im, ax=axes, shrink=0.9, label="φ")
    top.suptitle(f"Figure 3 on the tiny GPT: φ(A_r={small}, A_r={large}, i, j), both seed {s0}", fontsize=10.5)

    def corner(grid):
        return [row[:zoom] for row in grid[:zoom]]

    axes = bottom.subplots(1, len(panels) + 1)
    for ax, (name, maps) in zip(axes[:-1], panels, strict=True):
        im = _phi_map(ax, corner(maps["seed_seed"]), f"{name}: seed {s0} vs {s1}", f"j (seed {s1})", f"i (seed {s0})")
    _phi_map(axes[-1], corner(sub["random"]), "two random Gaussian matrices", "j", "i")
    for ax in axes:
        ax.set_aspect("equal")
    bottom.colorbar(im, ax=axes, shrink=0.85, label="φ")
    what = "all" if zoom == large else f"the top {zoom} of {large}"
    bottom.suptitle(f"Figure 4 on the tiny GPT: φ(A_r={large}, A'_r={large}, i, j), two seeds; {what} directions "
                    f"(chance: about max(i, j)/{large})", fontsize=10.5)  # fmt: skip
    fig.suptitle("Normalized subspace similarity of learned LoRA matrices A (paper eq. 4), LoRA on W_q, W_v",
                 fontsize=11.5)  # fmt: skip

    numbers = {
        "small_large": {name: maps["small_large"] for name, maps in panels},
        "seed_seed": {name: maps["seed_seed"] for name, maps in panels},
        "random": sub["random"],
        "small_rank": small,
        "large_rank": large,
        "zoom": zoom,
    }
    return fig, numbers


def draw_rank_sweep(results=None):
    """Tables 5 and 6 of the paper, on the tiny GPT: which weights at a fixed budget, and what rank.

    Left (Table 5): validation loss on the fine-tuning domain when one budget of trainable numbers
    is spent on different weights: r = 8 on one attention matrix, 4 on two, 2 on all four; and on
    the MLP at the nearest integer rank (its share of the budget in the label). Dots are seeds, the
    bar their mean. Right (Table 6): validation loss against r for W_q; W_q, W_v; all four.
    Lower is better (the paper's tables report accuracy: higher is better there).

    Inputs:
    - results: the dict lora_np.experiments.load_results returns; None loads the committed file

    Returns:
    - fig: matplotlib Figure
    - numbers: dict; "budget": {label: [loss, one a seed]}, "sweep": {targets: [loss, one a rank]},
      "ranks": [int], "base_val_loss": float
    """
    import numpy as np

    res = _section7_results(results)
    budget, sweep = res["budget"], res["rank_sweep"]

    def short(targets):  # "q,k" for W_q, W_k; "W1,W2" for the MLP
        return ",".join(t[2:] if t in ("W_q", "W_k", "W_v", "W_o") else t.replace("_", "") for t in targets)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.5, 1]})
    labels, losses = [], {}
    for x, row in enumerate(budget["rows"]):
        mlp = row["targets"][0] in ("W_1", "W_2")
        share = "" if row["trainable"] == budget["budget"] else f"\n{row['budget_ratio']:.0%}"
        label = f"{short(row['targets'])}\nr={row['r']}{share}"
        color = "tab:orange" if mlp else "tab:blue"
        v = row["val_loss"]
        ax.plot([x] * len(v), v, "o", color=color, ms=4, alpha=0.8)
        ax.hlines(np.mean(v), x - 0.3, x + 0.3, color=color, lw=2)
        labels.append(label)
        losses[label.replace("\n", " ")] = v
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("adapted weights (q, k, v, o: W_q, W_k, W_v, W_o; W1, W2: the MLP) and rank", fontsize=9)
    ax.set_ylabel("validation cross-entropy (nats per character)")
    ax.set_title(
        f"Table 5: one budget ({budget['budget']:,} trainable numbers), spent on different weights\n"
        f"dots: seeds {budget['seeds']}; bar: their mean; orange: MLP (share of the budget below)",
        fontsize=9.5,
    )
    colors = {"W_q": "tab:green", "W_q,W_v": "tab:blue", "W_q,W_k,W_v,W_o": "tab:purple"}
    curves = {}
    for row in sweep["rows"]:
        name = ",".join(row["targets"])
        bx.plot(sweep["ranks"], row["val_loss"], "o-", color=colors.get(name), label=name)
        curves[name] = row["val_loss"]
    bx.set_xscale("log", base=2)
    bx.set_xticks(sweep["ranks"], [str(r) for r in sweep["ranks"]])
    bx.set_xlabel("LoRA rank r (log scale)")
    bx.set_ylabel("validation cross-entropy (nats per character)")
    bx.set_title(f"Table 6: validation loss against rank (seed {sweep['seed']})", fontsize=9.5)
    bx.legend(fontsize=8.5, title="adapted weights", title_fontsize=8.5)
    fig.suptitle(
        f"Which weights, what rank: LoRA on the tiny GPT, fine-tuned on Yoda word order "
        f"(pretrained base: {budget['base_val_loss']:.3f}; lower is better)",
        fontsize=11,
    )
    fig.tight_layout()
    numbers = {"budget": losses, "sweep": curves, "ranks": sweep["ranks"], "base_val_loss": budget["base_val_loss"]}
    return fig, numbers


FIGURES["subspace_similarity.png"] = draw_subspace_similarity
FIGURES["rank_sweep.png"] = draw_rank_sweep
