"""Slide-ready diagrams of one LoRA layer: its forward and its backward, boxes drawn to shape.

`draw_lora_layer` is lora_np.layers.lora_linear_forward, in the spirit of the paper's Figure 1:
the frozen W0 beside the trainable path x -> A -> A·x -> ×s -> B, the two summed into h.
`draw_lora_backward` is lora_linear_backward: the products its backward forms, and the two
d_out × d_in matrices it never forms. Both return `(fig, numbers)` like lora_np.figures; every
shape on the slide is computed from the arguments. `save_diagrams` writes both as PNG and SVG;
`python -m lora_np figures` calls it.

Dimension legend: d_in / d_out the input / output width of the layer, r the LoRA rank, s = α/r.
Orientation as in lora_np.layers: W0 is (d_out, d_in), A is (r, d_in), B is (d_out, r), and the
formulas are in column-vector form (h = W0·x), as in that module's docstrings.

A matrix is drawn as it is written, rows down and columns across; a vector is a column. Drawn
lengths grow as the square root of the dimension, so r = 4 beside d = 1000 is a thin sliver
rather than an invisible hairline: the low rank shows, but the picture is not to scale. The
rank's length is also capped (R_MAX), so the layout holds for any r; it is drawn for r ≪ d,
the case LoRA is for, and with r near d it understates A and B (the labels keep the shapes).

matplotlib is imported here and in lora_np.figures only. Figures are built on the Agg canvas
directly, not through pyplot: drawing needs no display and leaves no global state behind.

References
- Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": Figure 1, eq. (3),
  Section 4.1 (A random Gaussian, B = 0, ΔW·x scaled by α/r).
"""

from functools import partial
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Arc, Circle, Patch, Rectangle

from ..core.config import check_int
from ..training.checkpoint import write_atomic

# One look for both slides, legible when projected: no text below 11 pt. The fixed SVG hash
# salt makes the ids in an SVG the same on every run.
STYLE = {"font.size": 12, "figure.dpi": 100, "savefig.dpi": 150, "svg.hashsalt": "lora_np"}
SIZE = (11.0, 6.2)  # inches, about 16:9; the axes span it in units of 0.1 inch: 110 x 62
FULL, THIN, COL_W = 12.0, 0.9, 1.8  # drawn length of the largest dimension, the least length, a vector's width
R_MAX = 3.5  # the rank's drawn length is capped here: with r near d the layout would crowd
Y_F, Y_M, Y_T = 46.0, 31.5, 15.0  # centre lines: frozen path, between the paths, trainable path
X = {"in": 6.5, "join": 15.0, "W0": 32.0, "mid": 48.0, "s": 56.0, "B": 65.0, "dB": 73.0, "sum": 90.0, "out": 102.0}

COLORS = {  # (face, edge)
    "frozen": ("#c9d6e3", "#3d5a78"),  # grey-blue
    "trainable": ("#f9c58d", "#b45309"),  # orange
    "grad": ("#fde8d0", "#b45309"),  # light orange, hatched: the gradient of a trainable weight
    "vector": ("#eeeeee", "#4d4d4d"),  # an activation, or the gradient at one
    "ghost": ("none", "#9a9a9a"),  # dashed and crossed out: never formed
}
LEGEND = {
    "frozen": "frozen (W₀)",
    "trainable": "trainable (A, B)",
    "grad": "gradient of A or B",
    "vector": "vector (one position)",
    "ghost": "not formed",
}
FORMATS = ("png", "svg")
METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}  # no date, no version


# ----------------------------------------------------------------------------
# drawing primitives, in axes units (0.1 inch)


def _lengths(d_in, d_out, r):
    """Drawn lengths of d_in, d_out and r: the largest is FULL, the others scale as its square root."""
    n_max = max(d_in, d_out)
    L_in, L_out, L_r = (max(THIN, FULL * (k / n_max) ** 0.5) for k in (d_in, d_out, r))
    return L_in, L_out, min(L_r, R_MAX)


def _box(ax, cx, cy, w, h, kind):
    """A matrix or vector of drawn size (w, h) centred at (cx, cy); returns (left, right, bottom, top)."""
    face, edge = COLORS[kind]
    left, bottom = cx - w / 2, cy - h / 2
    ax.add_patch(Rectangle((left, bottom), w, h, facecolor=face, edgecolor=edge, lw=1.6, zorder=2,
                           ls="--" if kind == "ghost" else "-", hatch="///" if kind == "grad" else None))  # fmt: skip
    if kind == "ghost":  # crossed out
        ax.plot([left, left + w], [bottom, bottom + h], color=edge, lw=1.2, zorder=2)
        ax.plot([left, left + w], [bottom + h, bottom], color=edge, lw=1.2, zorder=2)
    return left, left + w, bottom, bottom + h


def _arrow(ax, points, kind):
    """A polyline through `points` with an arrow head at the last one."""
    color = COLORS[kind][1]
    xs, ys = zip(*points[:-1], strict=True)
    ax.plot(xs, ys, color=color, lw=1.8, zorder=1, solid_capstyle="butt")
    ax.annotate("", xy=points[-1], xytext=points[-2], zorder=1, arrowprops={
        "arrowstyle": "-|>", "color": color, "lw": 1.8, "shrinkA": 0, "shrinkB": 0, "mutation_scale": 16})  # fmt: skip


def _node(ax, cx, cy, text, kind):
    """A round operation node (+, ×s), radius 2."""
    edge = COLORS[kind][1]
    ax.add_patch(Circle((cx, cy), 2.0, facecolor="white", edgecolor=edge, lw=1.6, zorder=3))
    ax.text(cx, cy, text, ha="center", va="center", fontsize=13, color=edge, zorder=4)


def _lock(ax, cx, cy, color):
    """A small padlock: what 'frozen' means, at a glance."""
    ax.add_patch(Rectangle((cx - 0.9, cy - 0.7), 1.8, 1.4, facecolor=color, edgecolor=color, zorder=4))
    ax.add_patch(Arc((cx, cy + 0.7), 1.2, 1.6, theta1=0, theta2=180, color=color, lw=1.6, zorder=4))


def _text(ax, x, y, s, kind="vector", **kw):
    ax.text(x, y, s, color=COLORS[kind][1], **{"ha": "center", "va": "bottom", **kw})


def _canvas(title):
    """A blank slide: one axes over the whole figure, 1 unit = 0.1 inch, the title on top."""
    fig = Figure(figsize=SIZE)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, SIZE[0] * 10)
    ax.set_ylim(0, SIZE[1] * 10)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.text(SIZE[0] * 5, SIZE[1] * 10 - 2.5, title, ha="center", va="top", fontsize=15, weight="bold")
    return fig, ax


def _legend(ax, kinds):
    handles = [Patch(facecolor=COLORS[k][0], edgecolor=COLORS[k][1], hatch="///" if k == "grad" else None,
                     ls="--" if k == "ghost" else "-", label=LEGEND[k]) for k in kinds]  # fmt: skip
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=len(kinds), fontsize=11,
              frameon=False, handlelength=1.6, columnspacing=1.5)  # fmt: skip


# ----------------------------------------------------------------------------
# the numbers a diagram shows


def _numbers(d_in, d_out, r):
    """Shapes as lora_np.layers names them (one position, column form), and the parameter counts."""
    d_in, d_out, r = check_int("d_in", d_in), check_int("d_out", d_out), check_int("r", r)
    if r > min(d_in, d_out):  # as lora_np.lora.check_rank: beyond it B·A cannot gain rank
        raise ValueError(f"r must be between 1 and min(d_out, d_in) = {min(d_in, d_out)}, got r={r}")
    frozen, lora = d_out * d_in, r * (d_in + d_out)
    shapes = {"x": (d_in,), "W": (d_out, d_in), "A": (r, d_in), "xA": (r,), "B": (d_out, r), "out": (d_out,)}
    return {"d_in": d_in, "d_out": d_out, "r": r, "frozen_params": frozen, "lora_params": lora,
            "lora_share": lora / frozen, "shapes": shapes}  # fmt: skip


# ----------------------------------------------------------------------------
# forward: h = W0·x + s·B·(A·x)


def draw_lora_layer(d_in=1000, d_out=1000, r=4):
    """The LoRA layer's forward, h = W0·x + (α/r)·B·A·x (paper eq. 3, scaled as in Section 4.1).

    Inputs:
    - d_in, d_out: int, the layer's input and output widths
    - r: int, the rank, 1 <= r <= min(d_in, d_out)

    Returns:
    - fig: matplotlib Figure (Agg canvas)
    - numbers: dict; "d_in", "d_out", "r"; "frozen_params" (d_out·d_in, W0), "lora_params"
      (r·(d_in + d_out), A and B), "lora_share" (their ratio); "shapes": {name: shape tuple} for
      x, W (= W0), A, xA (= A·x), B, out (= h), named as in lora_linear_forward
    """
    n = _numbers(d_in, d_out, r)
    sh = n["shapes"]
    L_in, L_out, L_r = _lengths(d_in, d_out, r)

    with matplotlib.rc_context(STYLE):
        fig, ax = _canvas("LoRA layer, forward:   h = W₀·x + (α/r)·B·A·x     (paper eq. 3)")

        # 1. x, shared by both paths
        x = _box(ax, X["in"], Y_M, COL_W, L_in, "vector")
        _text(ax, X["in"], x[3] + 0.8, f"x\n{sh['x']}")
        _arrow(ax, [(x[1], Y_M), (X["join"], Y_M), (X["join"], Y_F), (X["W0"] - L_in / 2, Y_F)], "frozen")
        _arrow(ax, [(x[1], Y_M), (X["join"], Y_M), (X["join"], Y_T), (X["W0"] - L_in / 2, Y_T)], "trainable")
        ax.plot([x[1], X["join"]], [Y_M, Y_M], color=COLORS["vector"][1], lw=1.8, zorder=1)

        # 2. frozen path: W0·x
        w = _box(ax, X["W0"], Y_F, L_in, L_out, "frozen")
        _text(ax, X["W0"], Y_F, "W₀", "frozen", va="center", fontsize=17)
        _lock(ax, w[1] - 1.6, w[3] - 1.8, COLORS["frozen"][1])
        _text(ax, X["W0"], w[3] + 0.8, f"W₀: frozen   (d_out, d_in) = {sh['W']}", "frozen")

        # 3. trainable path: A (random init), the r-wide bottleneck A·x, ×s, B (zero init)
        a = _box(ax, X["W0"], Y_T, L_in, L_r, "trainable")
        _text(ax, X["W0"], a[3] + 0.8, f"A: random init\n(r, d_in) = {sh['A']}", "trainable")
        xa = _box(ax, X["mid"], Y_T, COL_W, L_r, "vector")
        _text(ax, X["mid"], xa[2] - 0.8, f"A·x  {sh['xA']}\nthe bottleneck:\nonly r wide", va="top")
        _arrow(ax, [(a[1], Y_T), (xa[0], Y_T)], "trainable")
        _node(ax, X["s"], Y_T, "×s", "trainable")
        _text(ax, X["s"], Y_T + 2.6, f"s = α/r\n= α/{r}", "trainable")
        _arrow(ax, [(xa[1], Y_T), (X["s"] - 2, Y_T)], "trainable")
        b = _box(ax, X["B"], Y_T, L_r, L_out, "trainable")
        _text(ax, b[1] + 1.0, Y_T - 1.2, f"B: zero init\n(d_out, r)\n= {sh['B']}", "trainable", ha="left", va="top")
        _arrow(ax, [(X["s"] + 2, Y_T), (b[0], Y_T)], "trainable")

        # 4. the sum, h
        _node(ax, X["sum"], Y_M, "+", "vector")
        _arrow(ax, [(w[1], Y_F), (X["sum"], Y_F), (X["sum"], Y_M + 2)], "frozen")
        _text(ax, (w[1] + X["sum"]) / 2, Y_F + 0.6, f"W₀·x  {sh['out']}", "frozen")
        _arrow(ax, [(b[1], Y_T), (X["sum"], Y_T), (X["sum"], Y_M - 2)], "trainable")
        _text(ax, (b[1] + X["sum"]) / 2 + 4, Y_T + 0.6, f"s·B·A·x  {sh['out']}", "trainable")
        h = _box(ax, X["out"], Y_M, COL_W, L_out, "vector")
        _text(ax, X["out"], h[3] + 0.8, f"h\n{sh['out']}")
        _arrow(ax, [(X["sum"] + 2, Y_M), (h[0], Y_M)], "vector")

        # parameter counts, between the paths they belong to
        _text(ax, X["s"], Y_M + 1.5, f"W₀:  d_out·d_in = {n['frozen_params']:,} numbers, frozen", "frozen",
              fontsize=13)  # fmt: skip
        _text(ax, X["s"], Y_M - 1.5, f"A and B:  r·(d_in + d_out) = {n['lora_params']:,} numbers, trained "
              f"({n['lora_share']:.2%} of W₀)", "trainable", va="top", fontsize=13)  # fmt: skip
        _legend(ax, ("frozen", "trainable", "vector"))
    return fig, n


# ----------------------------------------------------------------------------
# backward: g = ∂L/∂h in; ∂L/∂x, ∂L/∂A, ∂L/∂B out; ∂L/∂W0 and B·A never formed


def draw_lora_backward(d_in=1000, d_out=1000, r=4):
    """The LoRA layer's backward, as lora_np.layers.lora_linear_backward computes it.

    The forward read right to left (same places, arrows reversed). With g = ∂L/∂h and s = α/r,
    s·Bᵀ·g (r wide) is formed once and used twice:

        ∂L/∂B = s·g·(A·x)ᵀ              (d_out, r), with A·x from the forward's cache
        ∂L/∂A = (s·Bᵀ·g)·xᵀ             (r, d_in)
        ∂L/∂x = W0ᵀ·g + Aᵀ·(s·Bᵀ·g)     (d_in,)

    ∂L/∂W0 = g·xᵀ (W0 is frozen) and B·A, both d_out × d_in, are never formed: drawn crossed out.

    Inputs: as draw_lora_layer.

    Returns:
    - fig: matplotlib Figure (Agg canvas)
    - numbers: as draw_lora_layer, with more "shapes": dout (= g), dxA (= s·Bᵀ·g), dB, dA, dx,
      named as in lora_linear_backward; and "not_formed": {"dW": (d_out, d_in), "BA": (d_out, d_in)}
    """
    n = _numbers(d_in, d_out, r)
    n["shapes"].update(dout=(d_out,), dxA=(r,), dB=(d_out, r), dA=(r, d_in), dx=(d_in,))
    n["not_formed"] = {"dW": (d_out, d_in), "BA": (d_out, d_in)}
    sh, no = n["shapes"], n["not_formed"]
    L_in, L_out, L_r = _lengths(d_in, d_out, r)
    Y_dA = Y_T - 5.5  # ∂L/∂A, just below A

    with matplotlib.rc_context(STYLE):
        fig, ax = _canvas("LoRA layer, backward:   g = ∂L/∂h in;   ∂L/∂x, ∂L/∂A, ∂L/∂B out")

        # 4. the sum h = W0·x + s·B·A·x hands g to both paths unchanged
        g = _box(ax, X["out"], Y_M, COL_W, L_out, "vector")
        _text(ax, X["out"], g[3] + 0.8, f"g = ∂L/∂h\n{sh['dout']}")
        ax.add_patch(Circle((X["sum"], Y_M), 0.8, color=COLORS["vector"][1], zorder=3))
        _arrow(ax, [(g[0], Y_M), (X["sum"] + 0.8, Y_M)], "vector")

        # 3. trainable path in reverse: B; ∂L/∂B; ×s; s·Bᵀ·g, r wide, formed once and used twice; A
        b = _box(ax, X["B"], Y_T, L_r, L_out, "trainable")
        _text(ax, b[1] + 1.0, Y_T - 1.2, f"B\n{sh['B']}", "trainable", ha="left", va="top")
        _arrow(ax, [(X["sum"], Y_M), (X["sum"], Y_T), (b[1], Y_T)], "trainable")
        db = _box(ax, X["dB"], Y_M, L_r, L_out, "grad")
        _arrow(ax, [(X["dB"], Y_T), (X["dB"], db[2])], "trainable")
        dB_label = f"∂L/∂B\n= s·g·(A·x)ᵀ\n{sh['dB']}\nA·x: cached"
        _text(ax, db[1] + 1.0, Y_M, dB_label, "trainable", ha="left", va="center")
        _node(ax, X["s"], Y_T, "×s", "trainable")
        _arrow(ax, [(b[0], Y_T), (X["s"] + 2, Y_T)], "trainable")
        v = _box(ax, X["mid"], Y_T, COL_W, L_r, "vector")
        _arrow(ax, [(X["s"] - 2, Y_T), (v[1], Y_T)], "trainable")
        _text(ax, X["mid"] - 1, Y_T + 1.6, f"s·Bᵀ·g  {sh['dxA']}\nformed once,\nused twice", "trainable")
        a = _box(ax, X["W0"], Y_T, L_in, L_r, "trainable")
        _text(ax, a[0], a[3] + 0.8, f"A  {sh['A']}", "trainable", ha="left")
        _arrow(ax, [(v[0], Y_T), (a[1], Y_T)], "trainable")
        da = _box(ax, X["W0"], Y_dA, L_in, L_r, "grad")
        _arrow(ax, [(X["mid"], v[2]), (X["mid"], Y_dA), (da[1], Y_dA)], "trainable")
        dA_label = f"∂L/∂A = (s·Bᵀ·g)·xᵀ\n{sh['dA']},  x: cached"
        _text(ax, da[0] - 1.0, Y_dA, dA_label, "trainable", ha="right", va="center")

        # 2. frozen path: W0ᵀ·g only
        w = _box(ax, X["W0"], Y_F, L_in, L_out, "frozen")
        _text(ax, X["W0"], Y_F, "W₀", "frozen", va="center", fontsize=17)
        _lock(ax, w[1] - 1.6, w[3] - 1.8, COLORS["frozen"][1])
        _text(ax, X["W0"], w[3] + 0.8, f"W₀: frozen, only read   {sh['W']}", "frozen")
        _arrow(ax, [(X["sum"], Y_M), (X["sum"], Y_F), (w[1], Y_F)], "frozen")
        _text(ax, (w[1] + X["sum"]) / 2, Y_F + 0.6, f"g  {sh['dout']}", "frozen")

        # never formed: ∂L/∂W0 (W0 is frozen), and B·A (the r-wide vectors go through instead)
        for cx, what in ((X["W0"], f"∂L/∂W₀ = g·xᵀ\n{no['dW']}"), (X["mid"] + 2, f"B·A\n{no['BA']}")):
            _box(ax, cx, Y_M, L_in, L_out, "ghost")
            _text(ax, cx, Y_M, f"{what}\nnot formed", va="center", fontsize=11, zorder=3,
                  bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})  # fmt: skip

        # 1. x was used by both paths: ∂L/∂x = W0ᵀ·g + Aᵀ·(s·Bᵀ·g)
        _node(ax, X["join"], Y_M, "+", "vector")
        _arrow(ax, [(w[0], Y_F), (X["join"], Y_F), (X["join"], Y_M + 2)], "frozen")
        _text(ax, (w[0] + X["join"]) / 2, Y_F + 0.6, "W₀ᵀ·g", "frozen")
        _arrow(ax, [(a[0], Y_T), (X["join"], Y_T), (X["join"], Y_M - 2)], "trainable")
        _text(ax, (a[0] + X["join"]) / 2 - 1, Y_T + 0.6, "Aᵀ·(s·Bᵀ·g)", "trainable")
        dx = _box(ax, X["in"], Y_M, COL_W, L_in, "vector")
        _arrow(ax, [(X["join"] - 2, Y_M), (dx[1], Y_M)], "vector")
        _text(ax, X["in"], dx[3] + 0.8, f"∂L/∂x\n{sh['dx']}")

        _text(ax, SIZE[0] * 5, 4.8, f"nothing d_out × d_in ({n['frozen_params']:,} numbers) is formed: "
              f"the path through A and B narrows to r = {r}", va="center")  # fmt: skip
        _legend(ax, ("frozen", "trainable", "grad", "vector", "ghost"))
    return fig, n


DIAGRAMS = {"lora_layer": draw_lora_layer, "lora_backward": draw_lora_backward}


def save_diagrams(out_dir, formats=FORMATS):
    """Draw every diagram in DIAGRAMS and write it in each format into out_dir (created if missing).

    Arguments are checked before anything is written. Writes are atomic
    (lora_np.checkpoint.write_atomic) and deterministic: no date or software version in a file
    and a fixed SVG id salt, so redrawing gives the same bytes.

    Inputs:
    - out_dir: str or Path, the output folder
    - formats: a non-empty tuple or list of distinct values from ("png", "svg")

    Returns:
    - names: list of the file names written, "<diagram>.<format>", diagrams in DIAGRAMS order
    """
    if not isinstance(out_dir, (str, Path)) or str(out_dir) == "":
        raise ValueError(f"out_dir must be a non-empty str or Path naming a folder, got {out_dir!r}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"out_dir must be a folder, got {str(out_dir)!r}, which exists and is not a folder")
    ok = isinstance(formats, (tuple, list)) and len(formats) > 0 and all(f in FORMATS for f in formats)
    if not ok or len(set(formats)) != len(formats):
        raise ValueError(f"formats must be a non-empty tuple or list of distinct values from {FORMATS}, "
                         f"got {formats!r}")  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    with matplotlib.rc_context(STYLE):  # svg.hashsalt is read when the SVG is written
        for name, draw in DIAGRAMS.items():
            fig, _ = draw()
            for fmt in formats:  # savefig(f) into the temporary file write_atomic opens
                write_atomic(out_dir / f"{name}.{fmt}", partial(fig.savefig, format=fmt, metadata=METADATA[fmt]))
                names.append(f"{name}.{fmt}")
    return names
