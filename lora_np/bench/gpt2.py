"""`python -m lora_np gpt2 bench`: the cost of LoRA at GPT-2 124M's real shapes, measured.

Random weights of GPT-2 small's shapes (12 layers, D = 768, 12 heads, V = 50,257, 1024
positions, the head tied) are written in the published layout (lora_np.gpt2.save_gpt2) and
loaded back through the same path a user's download takes. Then, float32, B = 4, T = 256
(`--quick`: tiny shapes, for the tests):

- the machine: CPU model, core count, NumPy and BLAS (studies.measure.machine), so a figure
  quoted from the file can name the CPU it was measured on;
- loading: wall time and resident memory in a fresh process, against the file's size;
- a LoRA step (r = 8 on W_q, W_v) and a full fine-tuning step (loss_and_grads + AdamW.step):
  median time, flops of the matrix products (bench.step_flops) as a share of this machine's
  measured float32 matmul throughput, and the peak memory a step allocates (tracemalloc).

Nothing is downloaded; the file is written to a temporary folder and removed afterwards.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..core.config import LoraConfig, ModelConfig
from ..core.lora import init_lora
from ..core.params import Params, cast, param_shapes
from ..io.bpe import GPT2Tokenizer, bytes_to_unicode
from ..io.gpt2 import load_gpt2, save_gpt2
from ..studies.cli import Parser, check_out_file, fail
from ..studies.measure import machine, round_robin
from ..training.checkpoint import write_atomic
from ..training.optim import AdamW
from ..training.threads import add_threads_flag, apply_threads
from ..training.train import loss_and_grads
from .cost import THREAD_VARS, matmul_gflops, peak_bytes, step_flops

GPT2_124M = ModelConfig(vocab_size=50257, context_length=1024, d_model=768, n_heads=12, n_layers=12, d_mlp=3072)
QUICK = ModelConfig(vocab_size=1000, context_length=64, d_model=64, n_heads=2, n_layers=2, d_mlp=256)  # for tests
LORA = LoraConfig(r=8, alpha=16.0, targets=("W_q", "W_v"))


def random_gpt2(cfg, seed=0):
    """A float32 Params of cfg's shapes, GPT-2's initialization scale (N(0, 0.02²)), head tied."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in param_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if name == "W_u":
            continue
        if leaf == "gamma":
            arrays[name] = np.ones(shape, np.float32)
        elif leaf == "beta" or leaf.startswith("b_"):
            arrays[name] = np.zeros(shape, np.float32)
        else:
            arrays[name] = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    arrays["W_u"] = arrays["W_e"]  # tied, as GPT-2
    return Params(cfg, {n: arrays[n] for n in param_shapes(cfg)})


def _rss():
    """The process's resident memory now, in bytes (Linux: VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _load_probe(path):
    """Run in a fresh process: load, then read every weight once; time and memory as JSON on stdout."""
    rss0 = _rss()
    t0 = time.perf_counter()
    params, _ = load_gpt2(path, check_finite=False)  # the mapping alone: the finiteness check reads every page
    t1 = time.perf_counter()
    rss_loaded = _rss()
    total = float(sum(float(a.sum(dtype=np.float64)) for a in params.values()))  # every page of the file, once
    t2 = time.perf_counter()
    print(json.dumps({"seconds": t1 - t0, "read_every_weight_seconds": t2 - t1, "rss_before": rss0,
                      "rss_loaded": rss_loaded, "rss_after_reading_every_weight": _rss(),
                      "checksum": total}))  # fmt: skip


def run(reps=3, quick=False, log=print):
    cfg, batch, T = (QUICK, 2, 32) if quick else (GPT2_124M, 4, 256)
    result = {"config": dataclasses.asdict(cfg), "batch": batch, "T": T, "quick": quick, "reps": reps,
              "lora": {**vars(LORA), "targets": list(LORA.targets)},
              "threads": {v: os.environ.get(v, "unset") for v in THREAD_VARS},
              "machine": machine()}  # fmt: skip
    params = random_gpt2(cfg)
    with tempfile.TemporaryDirectory() as tmp:

        tok = GPT2Tokenizer({c: b for b, c in bytes_to_unicode().items()}, [])  # the 256 byte tokens
        save_gpt2(params, tmp, tok)
        del params
        file_bytes = (Path(tmp) / "model.safetensors").stat().st_size
        log(f"wrote {'tiny' if quick else 'GPT-2 124M'} shapes, random weights: {file_bytes / 1e6:.1f} MB")
        code = f"from lora_np.bench.gpt2 import _load_probe; _load_probe({tmp!r})"  # a fresh process
        probe = subprocess.run([sys.executable, "-c", code],
                               capture_output=True, text=True, check=True)  # fmt: skip
        load = json.loads(probe.stdout)
        load["file_bytes"] = file_bytes
        load["rss_growth_over_file"] = (load["rss_after_reading_every_weight"] - load["rss_before"]) / file_bytes
        result["load"] = load
        grown = load["rss_loaded"] - load["rss_before"]
        read = load["rss_after_reading_every_weight"] - load["rss_before"]
        log(f"load: {load['seconds']:.3f} s (the file is mapped, not read), then "
            f"{load['read_every_weight_seconds']:.2f} s to read every weight once; resident memory "
            f"+{grown / 1e6:.0f} MB after loading, +{read / 1e6:.0f} MB after reading every weight "
            f"({load['rss_growth_over_file']:.2f}x the file)")  # fmt: skip

        base, _ = load_gpt2(tmp)
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, cfg.vocab_size, size=(2, batch, T))
        adapters = cast(init_lora(cfg, LORA, seed=1), np.float32)
        full = Params(cfg, {k: np.array(a) for k, a in base.items()})  # writable copies; the tie undone
        opts = {"lora": AdamW(adapters, lr=1e-6), "full": AdamW(full, lr=1e-6)}

        def step(v):
            def fn():
                if v == "lora":
                    _, grads = loss_and_grads(base, x, y, adapters, LORA)
                else:
                    _, grads = loss_and_grads(full, x, y)
                opts[v].step(grads)

            return fn

        steps = {v: step(v) for v in opts}
        log(f"timing a LoRA step and a full step, B = {batch}, T = {T}, {reps} rounds after a warm-up ...")
        times = round_robin(steps, reps)
        square = matmul_gflops(*(3 * (256 if quick else 2048,)), reps)
        shape_cfg = dataclasses.replace(cfg, context_length=T)  # step_flops takes T from the config
        for v in opts:
            flops = step_flops(shape_cfg, batch, LORA if v == "lora" else None)["total"]
            t = times[v]
            result[v] = {**t, "flops": flops, "gflops_per_s": flops / t["median_s"] / 1e9,
                         "share_of_matmul": flops / t["median_s"] / 1e9 / square,
                         "peak_bytes": peak_bytes(steps[v]),
                         "optimizer_state_bytes": opts[v].state_bytes()}  # fmt: skip
        result["matmul_square_gflops"] = square
    result["lora_over_full_step_time"] = result["lora"]["median_s"] / result["full"]["median_s"]
    return result


def table(r):
    shapes = "tiny test shapes (--quick)" if r["quick"] else "GPT-2 124M shapes"
    lines = [f"{shapes}, float32, B = {r['batch']}, T = {r['T']}; matmul {r['matmul_square_gflops']:.0f} "
             f"GFLOP/s, threads {r['threads']['OPENBLAS_NUM_THREADS']}"
             + (f"; {r['machine']['cpu']}, {r['machine']['nproc']} cores" if "machine" in r else ""),  # fmt: skip
             f"load: {r['load']['seconds']:.3f} s to map, {r['load']['read_every_weight_seconds']:.2f} s to read every "
             f"weight once; resident {r['load']['rss_growth_over_file']:.2f}x the "
             f"{r['load']['file_bytes'] / 1e6:.0f} MB "
             f"file after reading every weight", "",
             f"{'step':<22}{'time':>9}{'GFLOP/s':>10}{'% matmul':>10}{'peak alloc':>12}"
             f"{'optim state':>13}"]  # fmt: skip
    for v, label in (("lora", "LoRA r=8 W_q,W_v"), ("full", "full fine-tuning")):
        s = r[v]
        lines.append(f"{label:<22}{s['median_s']:>8.2f}s{s['gflops_per_s']:>10.1f}{s['share_of_matmul']:>10.0%}"
                     f"{s['peak_bytes'] / 1e9:>10.2f}GB{s['optimizer_state_bytes'] / 1e6:>11.1f}MB")  # fmt: skip
    lines.append(f"\nLoRA / full step time: {r['lora_over_full_step_time']:.2f}")
    return "\n".join(lines)


def main(argv, prog="python -m lora_np gpt2 bench"):
    p = Parser(prog=prog, description="Time and memory of LoRA and full fine-tuning at GPT-2 124M's "
                                "shapes (random weights, written and loaded as published).")  # fmt: skip
    p.add_argument("--reps", type=int, default=3, help="timed rounds after a warm-up (default 3)")
    add_threads_flag(p)
    p.add_argument("--out", default="runs/bench/gpt2_124m.json", help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="tiny shapes instead of 124M: a smoke test of seconds")
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error(f"--reps must be an int >= 1, got {a.reps}")
    try:  # missing folders are created
        out = check_out_file("--out", a.out, create_parents=True)
    except ValueError as e:
        fail(prog, str(e))
    apply_threads(a.threads, (QUICK if a.quick else GPT2_124M).d_model)
    result = run(a.reps, a.quick)
    print(table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write(json.dumps(result, indent=1).encode("utf-8")))
    print(f"\nwrote {out}")
    return 0
