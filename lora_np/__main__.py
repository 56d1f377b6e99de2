"""python -m lora_np [demo flags] | figures | check | bench | experiments | course | gpt2

- `python -m lora_np`: pretrain, then full fine-tuning against LoRA (the demo);
  `python -m lora_np --help` lists its flags, e.g. `--rank 8 --targets W_q,W_k,W_v,W_o`
- `python -m lora_np figures`: regenerate every figure in figures/
- `python -m lora_np check`: gradient check of the LoRA model against finite differences
- `python -m lora_np bench`: LoRA's cost model, measured (time, flops, memory)
- `python -m lora_np experiments`: rerun the Section 7 experiments behind notebook 05
- `python -m lora_np course make DIR [--solutions]` / `course grade DIR`: the homework and its autograder
- `python -m lora_np gpt2 --weights DIR --data FILE.txt`: LoRA on GPT-2's published weights
- `python -m lora_np successors`: LoRA's successors on the demo task, over seeds (notebook 07's numbers)
- `python -m lora_np adapters`: the adapter baselines against LoRA on the demo task, and Table 1's
  latency (notebook 08's numbers)
- `python -m lora_np latency`: Table 1's latency alone (the adapters, merged and unmerged LoRA)
- `python -m lora_np fullrank` / `serving`: full-rank LoRA against full fine-tuning, and one batch
  served with a different adapter per row (notebook 09's numbers)
"""

# This module is the top of the house: it may import any layer. Each command imports what it runs
# inside its own function, so that a command pays only for itself (the demo never loads matplotlib,
# which the figures need, nor the course kit).

import argparse
import sys
from pathlib import Path

import numpy as np

from .core.config import LORA_TARGETS
from .studies.cli import Parser, check_out_dir, check_out_file, fail
from .training.heap import keep_freed_memory
from .training.threads import add_threads_flag, apply_threads


def demo_parser(prog):
    from .studies.recipe import DemoConfig

    d = DemoConfig()
    p = Parser(
        prog=prog,
        description="Pretrain a tiny GPT on plain word order, then fine-tune it on Yoda's word order "
        "two ways (every weight, and LoRA) from the same weights and batches, and compare.",
        epilog="other commands (each with its own --help): figures, check, bench, experiments, "
        "course make|grade, gpt2 (LoRA on GPT-2's published weights), gpt2 bench, successors (DoRA, VeRA, "
        "PiSSA, LoRA+, QLoRA on the demo task), adapters (the paper's adapter baselines), latency, fullrank, serving",
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"fine-tuning steps for each method (default {d.steps})")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps,
                   help=f"pretraining steps, if no cached base model fits (default {d.pretrain_steps})")  # fmt: skip
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"LoRA alpha; the update is scaled by alpha/r (default {d.alpha})")  # fmt: skip
    p.add_argument("--targets", default=",".join(d.targets),
                   help=f"comma-separated weights to adapt, from {','.join(LORA_TARGETS)} "
                        f"(default {','.join(d.targets)})")  # fmt: skip
    p.add_argument("--method", default=d.method, choices=("lora", "dora", "vera", "adapter_h", "adapter_l"),
                   help="LoRA, or one of its successors: DoRA (magnitude and direction), VeRA (shared random "
                        "matrices, trained vectors), or the paper's adapter baselines AdapterH, AdapterL "
                        "(--rank is their bottleneck width) (default lora)")  # fmt: skip
    p.add_argument("--init", default=d.init, choices=("gaussian", "kaiming", "pissa"),
                   help="A's initialization; pissa: A, B from W0's top-r singular triplets (default gaussian)")
    p.add_argument("--loraplus", type=float, default=d.lr_ratio, metavar="RATIO",
                   help="LoRA+: train B at RATIO times A's learning rate, e.g. 16 as PEFT's example (default 1: LoRA)")
    p.add_argument("--nf4", action="store_true", help="QLoRA: keep the base's linear weights in 4-bit NormalFloat")
    p.add_argument("--double-quant", action="store_true", help="with --nf4: quantize the 4-bit scales too")
    p.add_argument("--lr", type=float, default=d.lr, help=f"LoRA learning rate (default {d.lr})")
    p.add_argument(
        "--full-lr", type=float, default=d.full_lr, help=f"full fine-tuning learning rate (default {d.full_lr})"
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for weights, data and batches (default {d.seed})")
    p.add_argument(
        "--out", default="runs/demo", help="output folder: models, adapter, results.json (default runs/demo)"
    )
    p.add_argument("--no-cache", action="store_true",
                   help="pretrain again (and refresh the cache) even if a cached base model fits")  # fmt: skip
    add_threads_flag(p)
    return p


def run_demo(argv, prog):
    from .studies.demo import run
    from .studies.recipe import DemoConfig, cache_path
    from .training.runset import OutputRefused, make_folder
    from .training.train import TrainingDiverged

    parser = demo_parser(prog)
    a = parser.parse_args(argv)
    try:  # the output folder and its cache folder, before any work (the cache is written first)
        check_out_dir("--out", a.out)
        check_out_dir("--out's cache folder", str(Path(a.out) / "cache"))
    except ValueError as e:
        fail(prog, str(e))
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    try:
        cfg = DemoConfig(steps=a.steps, pretrain_steps=a.pretrain_steps, rank=a.rank, alpha=a.alpha,
                         targets=targets, lr=a.lr, full_lr=a.full_lr, seed=a.seed, method=a.method, init=a.init,
                         lr_ratio=a.loraplus, base_quant="nf4" if a.nf4 else None,
                         double_quant=a.double_quant)  # fmt: skip
        cfg.validate()
    except (ValueError, TypeError) as e:
        parser.error(str(e))  # the API's own message, exit status 2, before any work
    try:  # a folder where the pretrained base goes: found before pretraining, not after
        check_out_file("--out's cache file", cache_path(cfg, Path(a.out) / "cache"), create_parents=True)
        make_folder(a.out, "--out")  # the only test of a folder that cannot be created (/proc/lora)
    except ValueError as e:
        fail(prog, str(e))
    apply_threads(a.threads, cfg.model.d_model)
    try:
        run(cfg, out_dir=a.out, use_cache=not a.no_cache, flag="--out")
    except OutputRefused as e:  # --out cannot be created, or another run holds it: before any work
        fail(prog, str(e))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_figures(argv, prog):
    from .figures import FIGURES, make_all
    from .figures.diagrams import save_diagrams

    p = Parser(
        prog=f"{prog} figures", description="Regenerate every figure (PNG) and the LoRA layer diagrams (PNG, SVG)."
    )
    p.add_argument("--out", default="figures", help="output folder (default figures)")
    p.add_argument("--results", default="notebooks",
                   help="the folder of section7_results.json, which the Section 7 figures draw (default notebooks)")
    p.add_argument("--bench", default=None,
                   help="the benchmark JSON bench.png draws (default OUT/bench.json; a quick run if there is none)")
    p.add_argument("names", nargs="*", help=f"only these figures (no diagrams), from: {', '.join(FIGURES)}")
    add_threads_flag(p)
    a = p.parse_args(argv)
    try:
        check_out_dir("--out", a.out)
    except ValueError as e:
        fail(f"{prog} figures", str(e))
    apply_threads(a.threads)  # the figures train the demo's model and smaller ones
    try:
        written = list(make_all(a.out, a.names or None, a.results, a.bench))
        if not a.names:  # a full run also redraws the layer diagrams (a second or two)
            written += save_diagrams(a.out)
    except ValueError as e:
        p.error(str(e))
    for name in written:
        print(f"wrote {a.out}/{name}")


def run_check(argv, prog):
    """A gradient check a student can run: the LoRA model against centered finite differences."""
    from . import LoraConfig, ModelConfig, init_lora, init_params, model_backward, model_forward
    from .core.gradcheck import numerical_vjp, rel_error

    p = Parser(prog=f"{prog} check", description=run_check.__doc__)
    add_threads_flag(p)
    apply_threads(p.parse_args(argv).threads)
    cfg = ModelConfig(vocab_size=32, context_length=16, d_model=32, n_heads=4, n_layers=2, d_mlp=128)
    lora = LoraConfig(r=4, alpha=4.0, targets=LORA_TARGETS)
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    adapters = init_lora(cfg, lora, seed=1)
    for k in adapters:  # a non-zero B, so that dA is not trivially zero
        adapters[k] = adapters[k] + 0.1 * rng.normal(size=adapters[k].shape)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 8))
    logits, cache = model_forward(params, tokens, adapters, lora)
    dlogits = rng.normal(size=logits.shape)
    grads = model_backward(dlogits, cache)
    print(f"{cfg}\n{lora}\nhand-written backward against centered finite differences, float64:")
    worst = 0.0
    for name in adapters:
        num = numerical_vjp(lambda: model_forward(params, tokens, adapters, lora)[0], adapters[name], dlogits)
        err = rel_error(grads[name], num)
        worst = max(worst, err)
        print(f"  {name:16s} {str(grads[name].shape):9s} relative error {err:.1e}")
    print(f"worst relative error {worst:.1e} ({'ok' if worst < 1e-6 else 'FAILED'}: the bar is 1e-6)")
    return 0 if worst < 1e-6 else 1


def run_bench(argv, prog):
    from .bench.cost import DEFAULT_OUT
    from .bench.cost import main as bench_main

    rc = bench_main(argv)
    if rc == 0 and not {"-h", "--help"} & set(argv):  # the figure depends on the measurement, drawn here
        from .figures.bench import save_bench_png

        out = argparse.ArgumentParser(add_help=False)
        out.add_argument("--out", default=DEFAULT_OUT)
        print(f"wrote {save_bench_png(out.parse_known_args(argv)[0].out)}")
    return rc


def run_experiments(argv, prog):
    from .studies.experiments import main as experiments_main

    return experiments_main(argv, f"{prog} experiments")


def run_successors(argv, prog):
    from .studies.successors import main as successors_main

    return successors_main(argv, f"{prog} successors")


def run_adapters(argv, prog):
    from .studies.adapter_baselines import main as adapters_main

    return adapters_main(argv, f"{prog} adapters")


def run_fullrank(argv, prog):
    from .studies.fullrank import main as fullrank_main

    return fullrank_main(argv, f"{prog} fullrank")


def run_latency(argv, prog):
    from .studies.latency import main as latency_main

    return latency_main(argv, f"{prog} latency")


def run_serving(argv, prog):
    from .studies.serving_study import main as serving_main

    return serving_main(argv, f"{prog} serving")


def run_gpt2(argv, prog):
    if argv[:1] == ["bench"]:  # `gpt2 bench`: the GPT-2 benchmark (bench layer), not the fine-tune (a study)
        from .bench.gpt2 import main as bench_main

        return bench_main(argv[1:], f"{prog} gpt2 bench")
    from .studies.gpt2_finetune import main as gpt2_main

    return gpt2_main(argv, f"{prog} gpt2")


def run_course(argv, prog):
    from .course import main as course_main

    return course_main(argv, f"{prog} course")


def main(argv=None):
    """Run one command; returns its exit status. Ctrl-C anywhere is one line and status 130 (128 +
    SIGINT, as a shell reports it): every output is written as a set that replaces the previous one
    whole (lora_np.training.runset) or by one rename (write_atomic), so an interrupted run leaves the
    previous results as they were."""
    prog = "python -m lora_np"
    try:
        return _dispatch(sys.argv[1:] if argv is None else list(argv), prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); earlier results were left as they were", file=sys.stderr)
        return 130


def _dispatch(argv, prog):
    keep_freed_memory()  # every command allocates the same temporaries step after step (lora_np/training/heap.py)
    commands = {"figures": run_figures, "check": run_check, "bench": run_bench, "experiments": run_experiments,
                "course": run_course, "gpt2": run_gpt2, "successors": run_successors, "adapters": run_adapters,
                "fullrank": run_fullrank, "serving": run_serving, "latency": run_latency}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:], prog)
    if argv and argv[0] == "demo":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):  # the demo takes flags only: a bare word is a mistyped command
        fail(prog, f"unknown command {argv[0]!r}; commands are {', '.join(['demo', *commands])}, or demo flags "
                   f"(see --help)")  # fmt: skip
    return run_demo(argv, prog)


if __name__ == "__main__":
    sys.exit(main())
