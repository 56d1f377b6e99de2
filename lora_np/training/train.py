"""One training loop for pretraining, full fine-tuning and LoRA fine-tuning.

What differs between the three is only what is trainable:

    pretraining, full fine-tuning:  every parameter
    LoRA:                           the adapters (+ some biases, per `bias`), W0 frozen

Dimension legend: B batch, T time (block size), V vocabulary.
"""

import math
import sys
import time
from numbers import Real

import numpy as np

from ..core.config import check_int
from ..core.layers import cross_entropy_backward, cross_entropy_forward
from ..core.model import model_backward, model_forward
from .data import eval_windows, sample_batch
from .threads import blas_threads

BIAS_OPTIONS = ("none", "all", "lora_only")


class TrainingDiverged(FloatingPointError):
    """The loss, a gradient or a LayerNorm stopped being finite (the failing step updated
    nothing: the parameters hold what the previous step's update made of them), or an update
    itself made a parameter non-finite (the message says which)."""

    def __init__(self, message, step, history):
        super().__init__(message)
        self.step, self.history = step, history


def trainable_names(params, adapters=None, lora=None, bias="none"):
    """The names to train.

    Without adapters: every parameter (pretraining or full fine-tuning). With adapters: every
    adapter entry but VeRA's shared random matrices, plus, following loralib's `mark_only_lora_as_trainable(bias=...)`:
    "none" no bias; "all" every bias, LayerNorm betas included; "lora_only" the biases of the
    adapted layers (e.g. b_q, b_v).
    """
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be one of {BIAS_OPTIONS}, got {bias!r}")
    if adapters is None:
        if bias != "none":
            raise ValueError(f"bias={bias!r} only applies with adapters; full fine-tuning trains every bias already")
        return list(params)
    names = [n for n in adapters if not n.startswith("vera.")]  # VeRA's shared random matrices stay frozen
    for name in params:
        leaf = name.rsplit(".", 1)[-1]
        is_bias = leaf.startswith("b_") or leaf == "beta"
        if bias == "all" and is_bias:
            names.append(name)
        elif bias == "lora_only" and leaf.startswith("b_") and "W_" + leaf[2:] in lora.targets:
            names.append(name)
    return names


def loss_and_grads(params, x, y, adapters=None, lora=None, trainable=None, *, train=True, rng=None):
    """Mean next-token cross-entropy on a batch, and its gradients for the trainable names.

    Inputs:
    - x, y: (B, T) int64 inputs and targets
    - the rest as in model_forward / model_backward

    Returns:
    - loss: float
    - grads: dict name -> array, exactly the trainable names
    """
    loss, grads, _ = _loss_grads_cache(params, x, y, adapters, lora, trainable, train=train, rng=rng)
    return loss, grads


def _loss_grads_cache(params, x, y, adapters, lora, trainable, *, train, rng):
    # loss_and_grads, and the forward's cache, whose LayerNorms train() checks for a collapse
    logits, cache = model_forward(params, x, adapters, lora, train=train, rng=rng)  # (B, T, V)
    loss, ce_cache = cross_entropy_forward(logits, y)
    dlogits = cross_entropy_backward(1.0, ce_cache)
    return loss, model_backward(dlogits, cache, trainable), cache


def collapsed_layernorms(cache):
    """Names of the LayerNorms of a model_forward cache whose normalizer collapsed.

    rstd = 1/sqrt(var + eps) lies in (0, 1/sqrt(eps)] for any finite input. When float32 activations
    grow past ~1e19 their variance overflows to inf and rstd becomes 0: the LayerNorm outputs its
    beta whatever came in, the model a constant, the loss a finite log V and every gradient below
    it 0. A finite loss then hides a diverged run, so the normalizers are checked themselves
    (a NaN fails `rstd > 0` too). Cheap: rstd is (B, T, 1).
    """
    lns = [(f"blocks.{l}.{k}", c[k]) for l, c in enumerate(cache["blocks"]) for k in ("ln1", "ln2")]
    lns.append(("ln_f", cache["ln_f"]))
    return [name for name, (_, rstd, _) in lns if not np.all(rstd > 0)]


def evaluate(params, ids, adapters=None, lora=None, *, block_size, max_windows=64, batch_size=32, label="evaluation"):
    """Mean cross-entropy over fixed windows of a stream (deterministic: no sampling, no dropout).

    Raises TrainingDiverged (step None; its message starts with `label`) when the model's loss
    is not finite or a LayerNorm collapsed (collapsed_layernorms): the loss of such a model is
    not a measurement. A run whose last update overflowed is caught here, right after train.
    """
    x, y = eval_windows(ids, block_size, max_windows)  # (n, T) each
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]  # the last batch may be shorter
        logits, cache = model_forward(params, xb, adapters, lora)
        loss = cross_entropy_forward(logits, yb)[0]
        collapsed = collapsed_layernorms(cache)
        if not math.isfinite(loss) or collapsed:
            what = f"loss {loss}" if not math.isfinite(loss) else f"variance overflowed in LayerNorm {collapsed[:3]}"
            raise TrainingDiverged(f"{label}: the model diverged ({what}); if it was just trained, try a lower "
                                   f"learning rate", None, None)  # fmt: skip
        total += loss * len(xb)  # a mean over a batch, weighted by its size
    return total / len(x)


class Progress:
    """A live line on a terminal (step, loss, tokens/s, BLAS threads, time left); plain lines otherwise."""

    def __init__(self, label, steps, every, stream=None):
        self.label, self.steps, self.every = label, steps, every
        n = blas_threads()  # tokens/s depends on it (lora_np.training.threads)
        self.threads = f"{n} thread{'s' if n > 1 else ''}"
        self.stream = sys.stderr if stream is None else stream
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step, loss, tokens_per_s, elapsed):
        done = step + 1
        left = elapsed / done * (self.steps - done)
        text = (f"{self.label} step {done}/{self.steps}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s "
                f"({self.threads})  {left:.0f}s left")  # fmt: skip
        if self.live:
            end = "\n" if done == self.steps else ""
            print(f"\r{text}\x1b[K", end=end, file=self.stream, flush=True)
        elif self.every and (done % self.every == 0 or done == self.steps):
            print(text, file=self.stream, flush=True)


def train(
    params,
    train_ids,
    optimizer,
    *,
    adapters=None,
    lora=None,
    trainable=None,
    steps,
    batch_size,
    block_size,
    seed,
    lr_schedule="cosine",
    warmup=0,
    log_every=100,
    label="train",
    stream=None,
):
    """Train in place; returns the history.

    The batches come from np.random.default_rng([seed, 0]) and LoRA dropout from
    np.random.default_rng([seed, 1]), so two runs with the same seed see the same batches
    whatever they train: full fine-tuning and LoRA can be compared batch for batch.

    Inputs:
    - params, adapters, lora, trainable: as in model_forward / model_backward; `optimizer`
      must hold exactly the trainable arrays
    - train_ids: (N,) token stream
    - steps, batch_size, block_size: optimizer steps, B, T
    - lr_schedule: "constant" or "cosine": lr_t = lr·(0.1 + 0.9·½(1 + cos(π·t/S))) after the
      warm-up, t counting from 0 over the S = steps - warmup remaining steps, so it decays from
      lr towards 10% of lr (cosine annealing, Loshchilov & Hutter 2017)
    - warmup: steps of linear warm-up
    - log_every: plain progress lines every this many steps when not on a terminal (0: none)

    Returns:
    - history: {"loss": [per step], "lr": [...], "time": [seconds since start], "tokens_per_s": float}

    Raises TrainingDiverged at the first step whose loss or gradients are not finite, or whose
    LayerNorms collapsed (collapsed_layernorms); that step updates nothing, so the arrays hold
    what the steps before it made of them. Also when an update itself made a non-finite value.
    """
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_int("block_size", block_size, 1)
    check_int("seed", seed, 0)
    check_int("warmup", warmup, 0)
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if trainable is None:
        trainable = trainable_names(params, adapters, lora)
    missing, extra = sorted(set(trainable) - set(optimizer.arrays)), sorted(set(optimizer.arrays) - set(trainable))
    if missing or extra:
        raise ValueError(f"optimizer must hold exactly the trainable arrays: missing {missing[:4]}, extra {extra[:4]}")
    for name in trainable:
        live = adapters[name] if adapters is not None and name in adapters else params.get(name)
        if (
            live is not None and optimizer.arrays[name] is not live
        ):  # unknown names: model_backward says so  # e.g. AdamW(cast(adapters, ...)): it would train a copy
            raise ValueError(
                f"optimizer.arrays[{name!r}] is a copy, not the array being trained; "
                f"build the optimizer on the same dict that is passed to train"
            )
    batch_rng, dropout_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    base_lr = float(optimizer.lr)
    history = {"loss": [], "lr": [], "time": []}
    progress = Progress(label, steps, log_every, stream)
    start = time.perf_counter()
    try:
        for step in range(steps):
            if step < warmup:
                lr = base_lr * (step + 1) / warmup
            elif lr_schedule == "cosine":
                frac = (step - warmup) / max(1, steps - warmup)
                lr = base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))
            else:
                lr = base_lr
            x, y = sample_batch(train_ids, batch_size, block_size, batch_rng)
            loss, grads, cache = _loss_grads_cache(params, x, y, adapters, lora, trainable, train=True,
                                                   rng=dropout_rng)  # fmt: skip
            bad = [n for n, g in grads.items() if not np.all(np.isfinite(g))]
            collapsed = collapsed_layernorms(cache)
            if not math.isfinite(loss) or bad or collapsed:
                if not math.isfinite(loss):
                    what = f"loss {loss}"
                elif bad:
                    what = f"gradients of {bad[:3]}"
                else:
                    what = f"activations: the variance overflowed in LayerNorm {collapsed[:3]} (rstd = 0)"
                held = "the values this call started with" if step == 0 else f"the update of step {step - 1}"
                raise TrainingDiverged(
                    f"{label}: non-finite {what} at step {step}; nothing was updated at this step, the "
                    f"parameters hold {held} (try a lower learning rate than {base_lr})",
                    step,
                    history,
                )
            optimizer.lr = lr
            optimizer.step(grads)
            # an update can overflow where the gradient did not (a huge learning rate)
            bad = [n for n in trainable if not np.all(np.isfinite(optimizer.arrays[n]))]
            if bad:
                raise TrainingDiverged(
                    f"{label}: non-finite values after the update of step {step} in {bad[:3]} (try a lower "
                    f"learning rate than {base_lr})",
                    step,
                    history,
                )
            elapsed = time.perf_counter() - start
            history["loss"].append(loss)
            history["lr"].append(lr)
            history["time"].append(elapsed)
            progress.update(step, loss, (step + 1) * batch_size * block_size / elapsed, elapsed)
    finally:
        optimizer.lr = base_lr
    history["tokens_per_s"] = steps * batch_size * block_size / history["time"][-1]
    return history


def generate(params, prompt_ids, n_new, adapters=None, lora=None, *, temperature=1.0, seed=0):
    """Sample n_new tokens after prompt_ids, one at a time (no cache: the model is tiny).

    Inputs:
    - prompt_ids: (T0,) int64, T0 >= 1
    - temperature: > 0; logits are divided by it before the softmax

    Returns:
    - ids: (T0 + n_new,) int64, the prompt followed by the samples
    """
    ok = isinstance(temperature, Real) and not isinstance(temperature, bool)  # np.float32 too; True is no 1.0
    if not (ok and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    check_int("n_new", n_new, 0)
    ids = np.asarray(prompt_ids)
    if not (np.issubdtype(ids.dtype, np.integer) or (ids.size == 0 and ids.dtype == np.float64)):
        # a float id would be truncated silently by astype
        raise TypeError(f"prompt_ids must be integer token ids, got {ids.dtype} values {ids.ravel()[:4].tolist()}")
    ids = ids.astype(np.int64)
    if ids.ndim != 1 or ids.size < 1:
        raise ValueError(f"prompt_ids must be a non-empty 1-D array of ids, got shape {ids.shape}")
    rng = np.random.default_rng(seed)
    ctx = params.config.context_length
    for _ in range(n_new):
        logits, _ = model_forward(params, ids[None, -ctx:], adapters, lora)  # (1, T, V)
        z = logits[0, -1].astype(np.float64)
        z = (z - z.max()) / float(temperature)  # max first: the top logit is 0 at any temperature, never nan
        p = np.exp(z)
        ids = np.append(ids, rng.choice(len(p), p=p / p.sum()))
    return ids
