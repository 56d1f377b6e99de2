"""`python -m lora_np gpt2 --weights DIR --data FILE.txt`: LoRA on the real GPT-2, in NumPy.

1. Load GPT-2 from the folder the user downloaded (lora_np.gpt2: mapped, no copy), tokenize
   the text file with GPT-2's own BPE (lora_np.bpe), keep its last tenth for validation.
2. Validation loss and a sample from --prompt, before.
3. LoRA (default r = 8 on W_q, W_v) with AdamW and the package's one training loop; every base
   weight frozen, W_e and its tied twin W_u included.
4. Validation loss and a sample, after; the adapter saved as lora_np's .npz and, for adapters of
   W_q, W_k, W_v, in PEFT's format (lora_np.peft), and the numbers in results.json.

Nothing is downloaded: the weights come from the folder given (GPT-2's files from the Hugging
Face hub, openai-community/gpt2: config.json, model.safetensors, vocab.json, merges.txt).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..core.config import LORA_TARGETS, LoraConfig, check_int
from ..core.lora import check_rank, init_lora
from ..core.params import cast
from ..io.gpt2 import check_folder, load_config, load_tokenizer, load_weights
from ..io.peft import QKV, export_peft
from ..training.checkpoint import CheckpointError, save_adapters, write_atomic
from ..training.counting import available_bytes, count_arrays, gpt_params, train_step_bytes
from ..training.optim import AdamW
from ..training.runset import RunSet
from ..training.threads import add_threads_flag, apply_threads
from ..training.train import TrainingDiverged, evaluate, generate, train
from .cli import Parser, check_out_dir, fail


def parser(prog):
    p = Parser(prog=prog, description="LoRA-fine-tune GPT-2 (published weights you have on disk) "
                                "on a plain-text file, in NumPy.")  # fmt: skip
    p.add_argument("--weights", required=True, help="folder with GPT-2's config.json, model.safetensors, vocab.json, "
                   "merges.txt (e.g. downloaded from huggingface.co/openai-community/gpt2)")  # fmt: skip
    p.add_argument("--data", required=True,
                   help="a UTF-8 text file to fine-tune on; its last 10%% is the validation set")  # fmt: skip
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    p.add_argument("--targets", default="W_q,W_v",
                   help=f"weights to adapt, from {','.join(LORA_TARGETS)} (default W_q,W_v)")  # fmt: skip
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence, at most n_positions (default 128)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--prompt", default="The", help="text the samples before and after continue (default 'The')")
    p.add_argument("--new-tokens", type=int, default=40, help="tokens sampled after the prompt (default 40)")
    p.add_argument("--eval-windows", type=int, default=16, help="validation windows of block-size tokens (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for the adapters, batches and samples (default 0)")
    p.add_argument("--out", default="runs/gpt2",
                   help="output folder: adapter.npz, peft/, results.json (default runs/gpt2)")  # fmt: skip
    add_threads_flag(p)
    return p


GPT2_FILES = {"adapter.npz": "file", "peft": "folder", "results.json": "file"}  # the run's set


def read_text(flag, path):
    """The UTF-8 text of the file `path`, or ValueError naming the flag, the file and the line of a bad byte."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {str(path)!r} cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{flag} {str(path)!r}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_args(a):
    """Every argument and path checked before any work: ValueError with one clear line.
    Returns (LoraConfig, the text of --data)."""
    for name in ("rank", "steps", "batch_size", "block_size", "new_tokens", "eval_windows"):
        check_int(f"--{name.replace('_', '-')}", getattr(a, name), 1)
    check_int("--seed", a.seed, 0)
    if not (np.isfinite(a.lr) and a.lr > 0) or not (np.isfinite(a.alpha) and a.alpha > 0):
        raise ValueError(f"--lr and --alpha must be finite numbers > 0, got {a.lr}, {a.alpha}")
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    lora = LoraConfig(r=a.rank, alpha=a.alpha, targets=targets)
    if not a.prompt:
        raise ValueError("--prompt must not be empty")
    try:  # bytes that are not UTF-8 reach Python as lone surrogates (os.fsdecode's surrogateescape)
        a.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"--prompt is not UTF-8 text (a byte {a.prompt[e.start].encode('utf-8', 'surrogateescape')!r} "
                         f"at position {e.start})") from None  # fmt: skip
    if not Path(a.weights).is_dir():
        raise ValueError(f"--weights {a.weights!r} is not a folder")
    data = Path(a.data)
    if not data.is_file() or data.stat().st_size == 0:
        raise ValueError(f"--data {a.data!r} is not a non-empty file")
    check_out_dir("--out", a.out)
    return lora, read_text("--data", data)  # before the model loads: seconds, not after it


def check_memory(cfg, n_trainable, batch_size, block_size, dtype, available=None):
    """ValueError, naming the figures, when a training step (counting.train_step_bytes) needs more
    memory than the system has available (counting.available_bytes, unless given)."""
    need = train_step_bytes(cfg, n_trainable, batch_size, block_size, dtype)
    available = available_bytes() if available is None else available
    if available is not None and need > available:
        raise ValueError(f"--batch-size {batch_size} with --block-size {block_size}: a training step needs about "
                         f"{need / 2**30:,.1f} GiB (activations, gradients, optimizer state), more than the "
                         f"{available / 2**30:,.1f} GiB of memory available; lower --batch-size")  # fmt: skip


def run(a, log=print, checked=None):
    """The command's work. Its files (GPT2_FILES) are written as one set replacing the previous
    run's whole (lora_np.training.runset): --out is locked from the start, so a second run on it is
    refused before any work; a run that fails or is interrupted leaves the previous set as it was,
    and a member this run does not write (peft/, when a target is not W_q, W_k or W_v) is removed."""
    lora, text = check_args(a) if checked is None else checked
    with RunSet(a.out, GPT2_FILES, "--out") as run_set:
        results = _run(a, lora, text, run_set.stage, log)
        replaced = run_set.commit()
    out = Path(a.out)
    log(f"\nwrote {out / 'adapter.npz'}{', ' + str(out / 'peft') if results['peft'] else ''} and "
        f"{out / 'results.json'}{', replacing the previous run' if replaced else ''}")  # fmt: skip
    return results


def _run(a, lora, text, stage, log):
    t0 = time.perf_counter()
    folder = check_folder(a.weights)  # the cheap checks first: the weights are the slow part
    cfg, tied = load_config(folder)
    check_rank(cfg, lora)
    if a.block_size > cfg.context_length:
        raise ValueError(f"--block-size {a.block_size} is longer than the model's n_positions {cfg.context_length}")
    tok = load_tokenizer(folder, cfg)
    ids = np.array(tok.encode(text), dtype=np.int64)
    split = int(0.9 * ids.size)
    train_ids, val_ids = ids[:split], ids[split:]
    T = a.block_size
    if val_ids.size < T + 1 or train_ids.size < T + 1:
        raise ValueError(f"--data is too short: its validation tenth has {val_ids.size} tokens and its training "
                         f"part {train_ids.size}; each needs at least --block-size + 1 = {T + 1}")  # fmt: skip
    tokenize_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    params = load_weights(folder, cfg, tied)  # mapped, not copied; every weight checked, NaN and infinities too
    load_s = time.perf_counter() - t0
    adapters = cast(init_lora(cfg, lora, seed=a.seed), params["W_e"].dtype)
    check_memory(cfg, count_arrays(adapters), a.batch_size, T, params["W_e"].dtype)  # before a step is tried
    apply_threads(a.threads, cfg.d_model, log)
    n_total = gpt_params(cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.context_length,
                         tied_head=params["W_u"] is params["W_e"])  # fmt: skip
    log(f"loaded GPT-2 from {a.weights}: {cfg.n_layers} layers, d_model {cfg.d_model}, {n_total:,} parameters, "
        f"{params['W_e'].dtype}, in {load_s:.1f} s")  # fmt: skip
    log(f"tokenized {a.data}: {len(text):,} characters, {ids.size:,} tokens ({train_ids.size:,} train, "
        f"{val_ids.size:,} validation) in {tokenize_s:.1f} s")  # fmt: skip
    prompt = np.array(tok.encode(a.prompt), dtype=np.int64)

    def measure(adapters=None):
        loss = evaluate(params, val_ids, adapters, lora if adapters else None, block_size=T,
                        max_windows=a.eval_windows, batch_size=a.batch_size)  # fmt: skip
        sample = generate(params, prompt, a.new_tokens, adapters, lora if adapters else None,
                          temperature=0.8, seed=a.seed)  # fmt: skip
        return loss, tok.decode(sample.tolist())

    before_loss, before_sample = measure()
    log(f"validation loss before: {before_loss:.4f}")

    optimizer = AdamW(adapters, lr=a.lr)
    n_train = count_arrays(adapters)
    log(f"LoRA r={lora.r} alpha={lora.alpha:g} on {','.join(lora.targets)}: {n_train:,} trainable parameters "
        f"({n_train / n_total:.3%} of the model); every base weight frozen")  # fmt: skip
    history = train(params, train_ids, optimizer, adapters=adapters, lora=lora, steps=a.steps,
                    batch_size=a.batch_size, block_size=T, seed=a.seed, log_every=10, label="LoRA")  # fmt: skip
    after_loss, after_sample = measure(adapters)

    save_adapters(stage / "adapter.npz", adapters, lora, params)
    exported = None
    if set(lora.targets) <= set(QKV):
        export_peft(adapters, lora, cfg, stage / "peft")
        exported = str(Path(a.out) / "peft")
    results = {
        "weights": str(a.weights), "data": str(a.data), "config": vars(cfg),
        "lora": {**vars(lora), "targets": list(lora.targets)}, "steps": a.steps, "batch_size": a.batch_size,
        "block_size": T, "lr": a.lr, "seed": a.seed, "total_params": n_total, "trainable": n_train,
        "load_seconds": load_s, "train_seconds": history["time"][-1], "tokens_per_s": history["tokens_per_s"],
        "val_loss_before": before_loss, "val_loss_after": after_loss,
        "sample_before": before_sample, "sample_after": after_sample, "peft": exported,
    }  # fmt: skip
    write_atomic(stage / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode("utf-8")))
    log(f"\nvalidation loss: {before_loss:.4f} before, {after_loss:.4f} after ({history['time'][-1]:.0f} s, "
        f"{history['tokens_per_s']:,.0f} tokens/s)")  # fmt: skip
    log(f"\nsample before, from {a.prompt!r}:\n  {before_sample!r}\nsample after:\n  {after_sample!r}")
    return results


def main(argv, prog="python -m lora_np gpt2"):
    p = parser(prog)
    a = p.parse_args(argv)
    try:
        checked = check_args(a)
    except (TypeError, ValueError) as e:
        fail(prog, str(e))
    try:
        run(a, checked=checked)
    except (CheckpointError, ValueError) as e:  # a file that does not fit, found once it is read
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
