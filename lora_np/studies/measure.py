"""What every measurement shares: timing in rounds, the machine's description, the model sizes.

The bench (lora_np.bench.cost), Table 1's latency (studies/latency.py) and the serving study
(studies/serving_study.py) all time several functions side by side, round by round, so that a
drift of the machine's speed during a run falls on all of them alike.
"""

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from ..core.config import ModelConfig
from ..training.data import VOCAB
from .recipe import DemoConfig


def round_robin(fns, reps):
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


def paired_ratio(a, b):
    """Median over rounds of a[i] / b[i]: the two were timed in the same round of round_robin, so a
    drift of the machine's speed over the run (seen here at +-20%) cancels in each ratio."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def machine():
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

