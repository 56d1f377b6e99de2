"""The figures of training: GPT-3's trainable parameters against rank, full fine-tuning against LoRA
on the demo, and why B = 0 lets training start (see lora_np.figures)."""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator

from ..core.config import LoraConfig, ModelConfig
from ..core.lora import init_lora
from ..core.params import cast, init_params
from ..studies.recipe import DemoConfig, finetune_full_and_lora
from ..training.counting import (
    PAPER_MODELS,
    block_shapes,
    checkpoint_bytes,
    gpt_params,
    lora_transformer_params,
    weight_params,
)
from ..training.data import VOCAB, make_splits, sample_batch
from ..training.optim import AdamW
from ..training.train import loss_and_grads, train
from .plotting import FIGURES, human_bytes, human_count

# ==================================================================================================
# params_vs_rank.png: trainable parameters against LoRA rank, GPT-3 175B.
# Counts come from lora_np.counting; notebooks/01_parameter_counts.ipynb shows and explains it.
# ==================================================================================================


def draw_params_vs_rank():
    """Trainable parameters of GPT-3 175B against the LoRA rank r, on log-log axes.

    Full fine-tuning trains every weight whatever r is: a flat line. LoRA on n square (D, D)
    matrices in each of L layers trains 2·n·L·D·r numbers (paper Section 5.1): a straight line of
    slope 1. On W_q and W_v it becomes as large as those two matrices themselves at r = D/2 = 6,144.
    Markers sit at the ranks of the paper's Table 6 (r = 1, 2, 4, 8, 64). The right axis reads the
    same counts as an fp16 checkpoint (2 bytes a number).

    Returns:
    - fig: matplotlib Figure
    - numbers: dict; "ranks" (list of int), "lora_qv" and "lora_qkvo" (lists, one count a rank),
      "full" and "qv_weights" (int): counts of trainable numbers
    """
    gpt3 = PAPER_MODELS["GPT-3 175B"]
    L, D = gpt3["n_layers"], gpt3["d_model"]
    shapes = block_shapes(D, gpt3["d_mlp"])
    ranks = [2**k for k in range(14) if 2**k < D] + [D]  # 1, 2, 4, ..., 8192, then r = D = 12,288
    paper_ranks = [1, 2, 4, 8, 64]  # Table 6

    full = gpt_params(**gpt3)  # tied head, as in GPT-2, whose architecture GPT-3 uses
    qv_weights = L * (weight_params(*shapes["W_q"]) + weight_params(*shapes["W_v"]))
    lora_qv = [lora_transformer_params(L, {"W_q": r, "W_v": r}, shapes) for r in ranks]
    lora_qkvo = [lora_transformer_params(L, dict.fromkeys(("W_q", "W_k", "W_v", "W_o"), r), shapes) for r in ranks]

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ax.axhline(full, color="black", lw=1.6, label=f"full fine-tuning: every weight ({human_count(round(full, -8))})")
    ax.axhline(
        qv_weights, color="gray", ls="--", lw=1.2, label=f"full fine-tuning of W_q, W_v only ({qv_weights / 1e9:.1f}B)"
    )
    ax.plot(ranks, lora_qkvo, color="tab:orange", lw=1.6, label="LoRA on W_q, W_k, W_v, W_o")
    ax.plot(ranks, lora_qv, color="tab:blue", lw=1.6, label="LoRA on W_q, W_v")
    ax.plot(
        paper_ranks,
        [lora_qv[ranks.index(r)] for r in paper_ranks],
        "o",
        color="tab:blue",
        ms=5,
        label="ranks of the paper's Table 6",
    )
    ax.axvline(D // 2, color="tab:blue", ls=":", lw=1.0, label=f"r = d_model/2 = {D // 2:,}")

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [1, 4, 16, 64, 256, 1024, 4096, D]
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.set_xlim(0.8, D * 1.25)
    ax.set_ylim(1e6, 1e12)
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
    ax.yaxis.set_major_formatter(FuncFormatter(human_count))
    ax.set_xlabel("LoRA rank r (log scale)")
    ax.set_ylabel("trainable parameters (count, log scale)")
    ax.set_title(f"GPT-3 175B ({L} layers, d_model = {D:,}): trainable parameters against rank")

    per_number = checkpoint_bytes(1, "float16")
    right = ax.secondary_yaxis("right", functions=(lambda n: n * per_number, lambda b: b / per_number))
    right.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
    right.yaxis.set_major_formatter(FuncFormatter(human_bytes))
    right.set_ylabel("size in fp16 (2 bytes a parameter)")
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.95)
    fig.tight_layout()

    numbers = {"ranks": ranks, "lora_qv": lora_qv, "lora_qkvo": lora_qkvo, "full": full, "qv_weights": qv_weights}
    return fig, numbers


FIGURES["params_vs_rank.png"] = draw_params_vs_rank


# ==================================================================================================
# finetune_curves.png: full fine-tuning against LoRA on the Yoda domain, loss step by step.
# It draws what lora_np.studies.recipe.finetune_full_and_lora returns (the demo's own recipe: the loss of every
# step, the validation losses); notebooks/04_finetune_and_merge.ipynb explains it.
# ==================================================================================================

DEMO_CACHE = "runs/demo/cache"  # where `python -m lora_np` keeps its pretrained base model


def draw_finetune_curves(cfg=None, cache_dir=DEMO_CACHE, *, runs=None, log=print):
    """Training loss per step of full fine-tuning and of LoRA on the same batches, and validation losses.

    Left: the loss of each step's batch, both methods starting from the same pretrained weights and
    seeing the same batches (so their step-to-step wiggles line up); dots mark the validation loss
    on the new domain at the start and at the end. Right: validation loss on the new domain (Yoda
    word order) and on the old one (plain word order), before and after each fine-tuning: what was
    learned and what was forgotten.

    With no arguments this runs the demo's default configuration, reusing its pretrained base from
    runs/demo/cache when present (about 40 s on 2 cores when it is not). A notebook can pass a
    smaller cfg and a cache_dir of its own, or the dict finetune_full_and_lora returned (runs=...).

    Inputs:
    - cfg, cache_dir, log: as in finetune_full_and_lora
    - runs: the dict finetune_full_and_lora returns, to draw without training again; give either
      runs or cfg, not both

    Returns:
    - fig: matplotlib Figure
    - numbers: dict; "steps" (int), "loss" {"full", "lora": list of float, one a step},
      "val", "trainable", "state_bytes" (as in finetune_full_and_lora), "total_params" (int),
      "lr" {"full", "lora": float}
    """
    if runs is None:
        runs = finetune_full_and_lora(DemoConfig() if cfg is None else cfg, cache_dir, log)
    elif cfg is not None:
        raise ValueError("give either cfg (to train) or runs (already trained), not both")
    elif not (isinstance(runs, dict) and "history" in runs and "val" in runs):
        raise TypeError(f"runs must be the dict finetune_full_and_lora returns, got {type(runs).__name__}")
    cfg, lora, val = runs["config"], runs["lora"], runs["val"]
    loss = {k: [float(v) for v in runs["history"][k]["loss"]] for k in ("full", "lora")}
    steps = len(loss["full"])
    x = np.arange(1, steps + 1)
    targets = ", ".join(lora.targets)
    labels = {
        "full": f"full fine-tuning ({runs['trainable']['full']:,} trainable, lr {cfg.full_lr:g})",
        "lora": f"LoRA r={lora.r} on {targets} ({runs['trainable']['lora']:,} trainable, lr {cfg.lr:g})",
    }
    colors = {"base": "gray", "full": "black", "lora": "tab:blue"}  # as in params_vs_rank.png

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.6, 1]})
    for k in ("full", "lora"):
        ax.plot(x, loss[k], color=colors[k], lw=1.2, label=labels[k])
        ax.plot([steps], [val[k]["new"]], "o", color=colors[k], ms=7, mec="white")
    dots = "validation loss, new domain (dots)"
    ax.plot([0], [val["base"]["new"]], "o", color=colors["base"], ms=7, mec="white", label=dots)
    ax.set_xlim(-steps * 0.02, steps * 1.03)
    ax.set_xlabel("fine-tuning step (both methods see the same batch at each step)")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title("training loss on Yoda word order, one batch a step", fontsize=10)
    ax.legend(loc="upper right", fontsize=8.5, framealpha=0.95)

    names = {"base": "pretrained base", "full": "full fine-tuning", "lora": f"LoRA r={lora.r}"}
    width = 0.38
    domains = (("new", None, "new domain (Yoda order)"), ("old", "///", "old domain (plain order)"))
    for i, (domain, hatch, _what) in enumerate(domains):
        for j, k in enumerate(names):
            h, xj = val[k][domain], j + (i - 0.5) * width
            if hatch is None:  # new domain: solid
                bx.bar(xj, h, width, color=colors[k], edgecolor=colors[k])
            else:  # old domain: hatched outline in the same color
                bx.bar(xj, h, width, facecolor="white", edgecolor=colors[k], hatch=hatch)
            bx.text(xj, h, f"{h:.3f}", ha="center", va="bottom", fontsize=8)
    handles = [
        Patch(facecolor="dimgray", edgecolor="dimgray", label=domains[0][2]),
        Patch(facecolor="white", edgecolor="dimgray", hatch=domains[1][1], label=domains[1][2]),
    ]
    bx.set_xticks(np.arange(3), list(names.values()))
    bx.set_ylabel("validation cross-entropy (nats per character)")
    top = max(v[d] for v in val.values() for d in ("new", "old"))
    bx.set_ylim(0, top * 1.18)
    bx.set_title("validation loss, before and after fine-tuning", fontsize=10)
    bx.legend(handles=handles, loc="upper right", fontsize=8.5, framealpha=0.95)
    fig.suptitle(
        f"Fine-tuning a pretrained tiny GPT ({runs['total_params']:,} parameters, d_model = {cfg.model.d_model}) "
        f"on Yoda word order: {steps} steps of batch {cfg.batch_size}",
        fontsize=11,
    )
    fig.tight_layout()

    numbers = {
        "steps": steps,
        "loss": loss,
        "val": val,
        "trainable": runs["trainable"],
        "state_bytes": runs["state_bytes"],
        "total_params": runs["total_params"],
        "lr": {"full": cfg.full_lr, "lora": cfg.lr},
    }
    return fig, numbers


FIGURES["finetune_curves.png"] = draw_finetune_curves


# ==================================================================================================
# zero_init_grad_norms.png: why B = 0 lets training start (paper Section 4.1), on a tiny pretrained model.
# Trained with lora_np.train; notebooks/02_zero_init.ipynb shows and explains it.
# ==================================================================================================


def draw_zero_init_grad_norms(base=None):
    """Gradient norms of A and B over the first LoRA steps, and how far each factor has moved.

    Recipe (fixed seeds: the same numbers on every run with the same NumPy and BLAS; a few seconds on one core):
    a tiny GPT (D = 32, 2 layers, context 32) in float32 pretrained for 300 AdamW steps on the
    plain word-order domain, then LoRA with r = 4, α = 4 on W_q and W_v (A Gaussian, B = 0)
    trained with Adam (lr 1e-2, no weight decay) on the Yoda word-order domain, batches of 16.

    Left: ‖∂L/∂A‖ and ‖∂L/∂B‖ (Frobenius norm over all four adapters) at every step, log scale.
    At step 0 ∂L/∂A = s·Bᵀ·g·xᵀ is exactly zero because B is, so it has no point on a log axis
    and is annotated instead. Right: ‖A_t − A_0‖ and ‖B_t − B_0‖ after t Adam steps. A does not
    move at step 1 either: Adam's first update is m̂/(sqrt(v̂) + ε) = 0/(0 + ε) = 0 when g_A = 0.

    Inputs:
    - base: the float32 Params this recipe pretrains, when the caller has trained it already
      (notebook 02 does, with the same code), or None to pretrain it here; it is only read

    Returns:
    - fig: matplotlib Figure
    - numbers: dict; "steps" (list of int, 0..n-1), "grad_norm_A", "grad_norm_B", "loss" (lists,
      one value a step, taken before that step's update), "moved_A", "moved_B" (lists of n + 1
      values, after t = 0..n updates), "lr", "r", "alpha" (the settings), "n_A", "n_B" (entries)
    """
    def global_norm(arrays):
        # sqrt of the sum of squares of every array, accumulated in float64
        return float(sum((a.astype(np.float64) ** 2).sum() for a in arrays) ** 0.5)

    T, batch, n_steps, n_moved, lr = 32, 16, 60, 12, 1e-2
    cfg = ModelConfig(vocab_size=len(VOCAB), context_length=T, d_model=32, n_heads=4, n_layers=2, d_mlp=128)
    lora = LoraConfig(r=4, alpha=4.0, targets=("W_q", "W_v"))
    pre_train, _ = make_splits("pretrain", 2000, seed=0)
    new_train, _ = make_splits("finetune", 1000, seed=0)

    if base is None:
        base = cast(init_params(cfg, seed=0), np.float32)
        opt = AdamW(base, lr=3e-3, weight_decay=0.01)
        train(base, pre_train, opt, steps=300, batch_size=batch, block_size=T, seed=0, warmup=30, log_every=0)
    elif base.config != cfg:
        raise ValueError(f"base must be a model of this recipe's config {cfg}, got {base.config}")

    adapters = cast(init_lora(cfg, lora, seed=0), np.float32)
    start = {k: v.copy() for k, v in adapters.items()}
    a_names = [k for k in adapters if k.endswith(".A")]
    b_names = [k for k in adapters if k.endswith(".B")]

    def moved(names):
        return global_norm(adapters[k] - start[k] for k in names)

    opt = AdamW(adapters, lr=lr)
    rng = np.random.default_rng(1)  # the batches; notebook 02 draws its first batch the same way
    grad_A, grad_B, losses, moved_A, moved_B = [], [], [], [moved(a_names)], [moved(b_names)]
    for _ in range(n_steps):
        x, y = sample_batch(new_train, batch, T, rng)
        loss, grads = loss_and_grads(base, x, y, adapters, lora)
        grad_A.append(global_norm(grads[k] for k in a_names))
        grad_B.append(global_norm(grads[k] for k in b_names))
        losses.append(loss)
        opt.step(grads)
        moved_A.append(moved(a_names))
        moved_B.append(moved(b_names))
    steps = list(range(n_steps))

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.3), gridspec_kw={"width_ratios": [1.5, 1]})
    ax.semilogy(steps, grad_B, color="tab:orange", lw=1.5, marker="o", ms=2.5, label="‖∂L/∂B‖")
    ax.semilogy(steps[1:], grad_A[1:], color="tab:blue", lw=1.5, marker="o", ms=2.5, label="‖∂L/∂A‖ (from step 1)")
    low = min(grad_A[1:]) / 4
    ax.set_ylim(low, max(grad_B) * 3)
    ax.annotate(
        "step 0: ‖∂L/∂A‖ = 0 exactly\n(B = 0, so s·Bᵀ·g·xᵀ = 0);\nno point on a log axis",
        xy=(0, low),
        xytext=(8, low * 2.2),
        fontsize=8.5,
        color="tab:blue",
        arrowprops={"arrowstyle": "->", "color": "tab:blue"},
    )
    ax.set_xlabel("LoRA step t (gradient at the adapters after t updates)")
    ax.set_ylabel("gradient norm (Frobenius, 4 adapters; log scale)")
    ax.set_title("Gradients of the two factors, B = 0 at step 0")
    ax.legend(loc="upper right", fontsize=9)

    t = list(range(n_moved + 1))
    ax2.plot(t, moved_B[: n_moved + 1], color="tab:orange", marker="o", ms=3.5, lw=1.5, label="‖B_t − B_0‖")
    ax2.plot(t, moved_A[: n_moved + 1], color="tab:blue", marker="s", ms=3.5, lw=1.5, label="‖A_t − A_0‖")
    ax2.annotate(
        "A unchanged after step 1:\nAdam's update 0/(0 + ε) = 0",
        xy=(1, 0),
        xytext=(n_moved * 0.42, max(moved_B[: n_moved + 1]) * 0.12),
        fontsize=8.5,
        color="tab:blue",
        arrowprops={"arrowstyle": "->", "color": "tab:blue"},
    )
    ax2.set_xlabel("Adam steps taken t")
    ax2.set_ylabel("distance from the initial value (Frobenius)")
    ax2.set_title(f"How far each factor has moved (lr = {lr:g})")
    ax2.legend(loc="upper left", fontsize=9)
    fig.suptitle(f"Tiny GPT, LoRA r = {lora.r}, α = {lora.alpha:g} on W_q, W_v, Adam: the first steps", fontsize=11)
    fig.tight_layout()

    numbers = {
        "steps": steps,
        "grad_norm_A": grad_A,
        "grad_norm_B": grad_B,
        "loss": losses,
        "moved_A": moved_A,
        "moved_B": moved_B,
        "lr": lr,
        "r": lora.r,
        "alpha": lora.alpha,
        "n_A": sum(adapters[k].size for k in a_names),
        "n_B": sum(adapters[k].size for k in b_names),
    }
    return fig, numbers


FIGURES["zero_init_grad_norms.png"] = draw_zero_init_grad_norms
