"""How many BLAS threads a command uses: chosen on purpose, printed, and changeable with --threads.

NumPy's matrix products run in OpenBLAS, which starts one thread per core. Two measurements
(`python -m lora_np bench`, its "threads" table) decide the policy:

- On the demo's matrices, (1536, 64) @ (64, 64), a second thread saves little on an idle machine
  (nothing on one machine the project ran on, a tenth to a quarter of a step on another): the
  product is nearly over before the hand-off pays for itself.
- With another process on one of the cores, the threads of a product wait for each other, and
  OpenBLAS waits by spinning: the step becomes several times slower, not merely 2x. One thread
  shares the machine gracefully.

So the policy is one thread below d_model = 512 (the tiny GPT, the tests, the notebooks, the
experiments, the course's grader), giving up the small gain to avoid the large loss, and every core
from there (GPT-2's 768, the bench's d512), where the products are large enough to divide.
`--threads N` overrides it on every command.

The pool is limited at run time with threadpoolctl: OpenBLAS reads OPENBLAS_NUM_THREADS only when
it loads, which happens when lora_np imports NumPy, before any command line is read. The same
count goes into the environment for the processes a command starts (the grader's workers).
"""

import argparse
import os

from threadpoolctl import threadpool_info, threadpool_limits

MIN_D_MODEL_FOR_THREADS = 512  # below this width, one thread (see the module docstring)
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def policy_threads(d_model):
    """The policy's thread count for a model of width d_model (None: no model, small products)."""
    if d_model is not None and d_model >= MIN_D_MODEL_FOR_THREADS:
        return os.cpu_count() or 1
    return 1


def parse_threads(value):
    """The --threads argument: an int >= 1, or 'auto' (None) for the policy's choice."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"threads must be an int >= 1 or 'auto', got {value!r}")
    return n


def add_threads_flag(parser):
    """Add --threads to an argparse parser (its value: None for 'auto', or an int >= 1)."""

    def check(value):
        try:
            return parse_threads(value)
        except ValueError as e:  # argparse words it "argument --threads: must be ..."
            raise argparse.ArgumentTypeError(str(e).removeprefix("threads ")) from None

    parser.add_argument(
        "--threads",
        type=check,
        default=None,
        metavar="N",
        help=f"BLAS threads for matrix products: an int, or 'auto' (default): 1 below d_model "
        f"{MIN_D_MODEL_FOR_THREADS}, every core from there",
    )


def blas_threads():
    """The thread count the BLAS pool has now (the largest, if NumPy loaded more than one BLAS)."""
    counts = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return max(counts) if counts else 1


def set_blas_threads(n):
    """Limit the BLAS pool to n threads for the rest of the process, and its child processes."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    threadpool_limits(limits=n, user_api="blas")
    os.environ.update(dict.fromkeys(THREAD_VARS, str(n)))  # read by child processes when they start


def apply_threads(requested, d_model=None, log=print):
    """Set the BLAS thread count a command asked for (None: the policy's, for d_model); print it.

    Returns the count set.
    """
    n = policy_threads(d_model) if requested is None else requested
    set_blas_threads(n)
    if requested is not None:
        why = "--threads"
    elif d_model is None:
        why = "the policy for small products; --threads N to change"
    else:
        cmp = "<" if d_model < MIN_D_MODEL_FOR_THREADS else ">="
        why = f"the policy for d_model {d_model} {cmp} {MIN_D_MODEL_FOR_THREADS}; --threads N to change"
    log(f"BLAS threads: {n} ({why})")
    return n
