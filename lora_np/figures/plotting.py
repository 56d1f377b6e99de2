"""What every figure shares: one style, an atomic and byte-stable PNG writer, the registry of
figures (file name -> draw function, filled by the figures_* modules) and tick formatters."""

import matplotlib.pyplot as plt

from ..training.checkpoint import write_atomic

# One style for every figure: readable at README width.
STYLE = {"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3}


def save(fig, path):
    """Write a PNG atomically (a crash mid-write leaves any previous file intact), then close fig."""
    # no "Software"/date metadata, so the same numbers give the same bytes
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", metadata={"Software": None}))
    finally:
        plt.close(fig)


# file name -> draw function; each figures_* module adds its figures
FIGURES = {}


def human_count(x, _pos=None):
    """1e6 -> '1M', 3e10 -> '30B': tick labels a reader can take in at a glance."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def human_bytes(x, _pos=None):
    """Decimal units, as the paper writes them (350GB, 35MB)."""
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if x >= div:
            return f"{x / div:g} {unit}"
    return f"{x:g} B"
