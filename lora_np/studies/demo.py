"""The demo behind `python -m lora_np`: pretrain, then fine-tune two ways, side by side.

1. Pretrain a tiny GPT on plain word order ("the quick fox chases a red ball."), or reuse
   the base model a previous run saved in the cache folder (its fingerprint checked).
2. Fine-tune on Yoda's word order ("a red ball, the quick fox chases.") from the same
   weights and with the same batches, twice: every weight (full fine-tuning), and LoRA.
3. Report trainable parameters, optimizer state, file sizes, validation loss on the new
   domain and on the old one (what was forgotten), time, samples, and the merge check.
"""

import json

import numpy as np

from ..core.lora import merge
from ..core.model import model_forward
from ..methods.adapters import ADAPTER_METHODS
from ..training.checkpoint import save_adapters, save_params, write_atomic
from ..training.data import decode, encode, eval_windows
from ..training.runset import RunSet
from ..training.train import generate
from .cli import check_out_dir, check_out_file
from .recipe import DemoConfig, cache_path, finetune_full_and_lora, gap_closed, method_label

DEMO_FILES = {"base.npz": "file", "full_finetuned.npz": "file", "adapter.npz": "file", "results.json": "file"}


def run(cfg=DemoConfig(), out_dir="runs/demo", use_cache=True, log=print, flag="out_dir"):
    """Run the demo; returns a dict of every number it reports (also written to results.json).

    Files in out_dir: cache/base-<key>.npz (the pretrained base, reused by later runs with
    the same pretraining settings), and the run's set, DEMO_FILES: base.npz, full_finetuned.npz,
    adapter.npz, results.json. The set replaces the previous run's whole, or not at all
    (lora_np.training.runset): out_dir is locked from the start, so a second run on it is refused
    (OutputBusy) before any work, and a run that diverges (TrainingDiverged) or is interrupted
    leaves the previous set as it was. `flag` is how errors name out_dir (the CLI's "--out").
    """
    cfg.validate()
    out_dir = check_out_dir(flag, out_dir)  # before any work: a bad path is refused, not found at the end
    check_out_dir(f"{flag}'s cache folder", out_dir / "cache")
    # a folder where the pretrained base goes: found before pretraining, not after it
    check_out_file(f"{flag}'s cache file", cache_path(cfg, out_dir / "cache"), create_parents=True)
    with RunSet(out_dir, DEMO_FILES, flag) as run_set:
        results = _run(cfg, out_dir, run_set.stage, use_cache, log)
        replaced = run_set.commit()
    log(report(results, cfg))
    log(f"\nwrote {', '.join(DEMO_FILES)} to {out_dir}{', replacing the previous run' if replaced else ''}")
    return results


def _run(cfg, out_dir, stage, use_cache, log):
    runs = finetune_full_and_lora(cfg, out_dir / "cache", log, reuse=use_cache)  # may raise TrainingDiverged
    base, full, adapters, lora, val = runs["base"], runs["full"], runs["adapters"], runs["lora"], runs["val"]
    lora_base = runs["lora_base"]  # the base the adapters were trained on (PiSSA's residual, QLoRA's 4-bit copy)
    T = cfg.model.context_length
    rows = {"base": dict(val["base"])}
    for k in ("full", "lora"):
        rows[k] = {
            **val[k],
            "seconds": runs["history"][k]["time"][-1],
            "trainable": runs["trainable"][k],
            "state": runs["state_bytes"][k],
        }
    new_val = runs["data"]["new_val"]

    # merge check: W' = W0 + s·B·A as a plain model against the unmerged adapters
    x, _ = eval_windows(new_val, T, 16)
    merge_diff = None  # adapter layers cannot be merged (lora_np.adapters): nothing to check
    if lora.method not in ADAPTER_METHODS:
        merged = merge(lora_base, adapters, lora)
        unmerged_logits, _ = model_forward(lora_base, x, adapters, lora)
        merged_logits, _ = model_forward(merged, x)
        merge_diff = float(np.abs(merged_logits - unmerged_logits).max())

    prompt = encode("the ")
    samples = {
        "base": decode(generate(base, prompt, 120, seed=cfg.seed)),
        "full": decode(generate(full, prompt, 120, seed=cfg.seed)),
        "lora": decode(generate(lora_base, prompt, 120, adapters, lora, seed=cfg.seed)),
    }
    # Everything is computed; only now are files written, into the staging folder of the run's set.
    rows["full"]["file"] = save_params(stage / "full_finetuned.npz", full).stat().st_size
    rows["lora"]["file"] = save_adapters(stage / "adapter.npz", adapters, lora, lora_base).stat().st_size
    rows["base"]["file"] = save_params(stage / "base.npz", base).stat().st_size
    results = {
        "config": {**{k: v for k, v in vars(cfg).items() if k != "model"}, "model": vars(cfg.model)},
        "total_params": runs["total_params"],
        "pretrain_seconds": runs["pretrain_seconds"],
        "rows": rows,
        "gap_closed": gap_closed(rows["base"]["new"], rows["lora"]["new"], rows["full"]["new"]),
        "fewer_params": rows["full"]["trainable"] / rows["lora"]["trainable"],
        "merge_max_abs_diff": merge_diff,
        "samples": samples,
    }
    text = json.dumps(results, indent=1, default=str).encode()
    write_atomic(stage / "results.json", lambda f: f.write(text))
    return results


def report(res, cfg):
    """The demo's table and notes, as text."""
    rows, n = res["rows"], res["total_params"]
    targets = ",".join(cfg.lora().targets)  # () for the adapter baselines, which adapt no weight
    head = (
        f"{'method':<26}{'trainable':>11}{'share':>8}{'optim state':>13}{'file':>11}"
        f"{'val new':>9}{'val old':>9}{'time':>8}"
    )
    lines = [head, "-" * len(head)]
    lora_row = f"{method_label(cfg.lora())} {targets}".rstrip()  # no targets: an adapter baseline
    names = {"base": "pretrained base", "full": "full fine-tuning", "lora": lora_row}
    for key in ("base", "full", "lora"):
        r = rows[key]
        t = res["pretrain_seconds"] if key == "base" else r["seconds"]
        time_s = "cached" if t is None else f"{t:.1f}s"
        if key == "base":
            cells = f"{'-':>11}{'-':>8}{'-':>13}"
        else:
            cells = f"{r['trainable']:>11,}{r['trainable'] / n:>8.2%}{r['state'] / 1024:>10.1f}KiB"
        lines.append(f"{names[key]:<26}{cells}{r['file'] / 1024:>8.1f}KiB{r['new']:>9.4f}{r['old']:>9.4f}{time_s:>8}")
    ratio = "(L_base - L_lora) / (L_base - L_full)"
    if res["gap_closed"] is None:
        gap = f"LoRA's share of the gap {ratio} is undefined: full fine-tuning did not move the loss"
    else:
        who = method_label(cfg.lora()) if cfg.lora().method in ADAPTER_METHODS else "LoRA"
        gap = f"{who} closes {res['gap_closed']:.1%} of the gap {ratio}"
    lines += [
        "",
        "val new: validation loss on the fine-tuning domain (Yoda order); val old: on the pretraining domain.",
        f"{gap}, with {res['fewer_params']:.1f}x fewer trainable parameters.",
        f"merged (W0 + s·B·A) vs unmerged LoRA logits, float32: max |difference| = {res['merge_max_abs_diff']:.2e}"
        if res["merge_max_abs_diff"] is not None
        else "adapter layers cannot be merged into the weights: inference runs them (the latency of Table 1)",
        "",
        "samples from the prompt 'the ':",
    ]
    for key in ("base", "full", "lora"):
        text = res["samples"][key].split("\n")
        lines.append(f"  {names[key]}:")
        lines += [f"    {line}" for line in text[:3]]
    return "\n".join(lines)
