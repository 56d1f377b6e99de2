"""The bench's report: what its measurements say about the targets, as a table and as the README's tables.

`python -m lora_np bench` (bench/cost.py) measures; this module reads what it wrote.
"""

from ..studies.recipe import DemoConfig

THREAD_COUNTS = (1, 2)  # the threads table: BLAS threads per step


def targets(sizes):
    """The benchmark's targets, each with its measured figure and pass/fail (never asserted).

    The step-time target is stated for d_model = 512 and judged at the widest size that was run;
    the throughput targets at d_model = 128 and 512, at the sizes of the run nearest to them. Each
    record says which size it was judged at.
    """
    out = []
    top = max(sizes, key=lambda s: s["config"]["d_model"])
    D = top["config"]["d_model"]
    r = top["lora_over_full"]["lora_qv"]
    out.append({
        "target": f"LoRA W_q,W_v step time <= 0.64 x full fine-tuning's (d_model=512; run at {D})",
        "measured": r["step_time"], "pass": r["step_time"] <= 0.64,
        "note": f"count predicts {r['flops']:.3f} (matmuls), {r['predicted']:.3f} (matmuls + AdamW traffic)",
    })  # fmt: skip
    for want, bar in ((128, 0.65), (512, 0.80)):
        s = min(sizes, key=lambda s: abs(s["config"]["d_model"] - want))
        full = s["train"]["full"]
        # the best share a step could reach with its element-wise layers as they are: every product at
        # the measured rate, nothing else but those layers' measured time
        products_s = full["flops"]["total"] / (s["matmul_model_gflops"] * 1e9)
        ceiling = products_s / (products_s + sum(full["elementwise_s"].values()))
        out.append({
            "target": f"full fine-tuning step >= {bar:.0%} of the measured (N, D)@(D, D) matmul throughput "
                      f"(d_model={want}; run at {s['config']['d_model']})",
            "measured": full["share_of_matmul_model"], "pass": full["share_of_matmul_model"] >= bar,
            "note": f"{full['gflops_per_s']:.1f} of {s['matmul_model_gflops']:.1f} GFLOP/s; element-wise "
                    f"layers {full['elementwise_share']:.0%} of the step; at most {ceiling:.0%} with those layers "
                    f"as they are and every product at that rate",
        })  # fmt: skip
    for s in sizes:
        if s["name"] == "demo":  # the demo's steps are this size's steps, at its batch
            d, t, rate = DemoConfig(), s["train"], s["matmul_model_gflops"] * 1e9
            n_full, n_lora = d.pretrain_steps + d.steps, d.steps  # pretraining, then each method
            steps_s = n_full * t["full"]["median_s"] + n_lora * t["lora_qv"]["median_s"]
            matmul_s = (n_full * t["full"]["flops"]["total"] + n_lora * t["lora_qv"]["flops"]["total"]) / rate
            ew = {v: sum(t[v]["elementwise_s"].values()) for v in ("full", "lora_qv")}  # seconds per step
            ew_s = n_full * ew["full"] + n_lora * ew["lora_qv"]
            out.append({
                "target": f"the demo <= 25 s idle, pretraining included: its {n_full + n_lora:,} training steps at "
                          f"the measured step times (the demo also evaluates and samples)",
                "measured": steps_s, "pass": steps_s <= 25,
                "note": f"their matrix products alone, at the measured (N, D)@(D, D) rate: {matmul_s:.1f} s; "
                        f"with the element-wise layers at their measured time: {matmul_s + ew_s:.1f} s",
            })  # fmt: skip
    for s in sizes:
        if "one_core_busy" in s["threads"]:
            idle, busy = s["threads"]["idle"]["1"]["lora_qv"], s["threads"]["one_core_busy"]["1"]["lora_qv"]
            busy2 = s["threads"]["one_core_busy"]["2"]["lora_qv"] / s["threads"]["idle"]["2"]["lora_qv"]
            out.append({
                "target": f"{s['name']}: one BLAS thread, LoRA step with another process on one core <= 1.5x idle",
                "measured": busy / idle, "pass": busy / idle <= 1.5,
                "note": f"at 2 threads: x{busy2:.2f} of its idle time",
            })  # fmt: skip
    for s in sizes:
        vs = s["forward"]["merged_qv"]["vs_base"]
        out.append({
            "target": f"{s['name']}: merged forward within 5% of the base model's",
            "measured": vs, "pass": abs(vs - 1.0) <= 0.05,
            "note": f"unmerged LoRA: W_q,W_v x{s['forward']['lora_qv']['vs_base']:.3f}, "
                    f"all six x{s['forward']['lora_all']['vs_base']:.3f} of the base's time",
        })  # fmt: skip
    for s in sizes:
        q = s["lora_over_full"]["lora_qv"]["optimizer_state"]
        out.append({
            "target": f"{s['name']}: LoRA W_q,W_v optimizer state >= 100x smaller than full fine-tuning's",
            "measured": q, "pass": q >= 100,
            "note": f"all six targets: {s['lora_over_full']['lora_all']['optimizer_state']:.1f}x",
        })  # fmt: skip
    return out


def table(result):
    """The terminal report of a run, as text."""
    m = result["meta"]
    lines = [
        f"BLAS threads {m['blas_threads']}, load average {m['load_before'][0]:.2f} before / "
        f"{m['load_after'][0]:.2f} after, "
        f"{m['reps']} reps; {m['cpu']} ({m['nproc']} cores), numpy {m['numpy']}, {m['blas']}",
        f"square float32 matmul {m['matmul_square_shape']}: {m['matmul_square_gflops']:.1f} GFLOP/s",
        "",
    ]
    head = (
        f"{'size':<6}{'variant':<10}{'step ms':>9}{'cpu ms':>8}{'pred ms':>9}{'GFLOP':>8}{'GF/s':>7}"
        f"{'%mm':>6}{'%sq':>6}{'%ew':>6}{'trainable':>12}{'grads MB':>10}{'optim MB':>10}{'peak MB':>9}"
    )
    lines += [head, "-" * len(head)]
    for s in result["sizes"]:
        for v, t in s["train"].items():
            lines.append(
                f"{s['name']:<6}{v:<10}{t['median_s'] * 1e3:>9.1f}{t['cpu_median_s'] * 1e3:>8.1f}"
                f"{t['predicted_s'] * 1e3:>9.1f}{t['flops']['total'] / 1e9:>8.2f}{t['gflops_per_s']:>7.1f}"
                f"{t['share_of_matmul_model']:>6.0%}{t['share_of_matmul_square']:>6.0%}"
                f"{t['elementwise_share']:>6.0%}{t['trainable']:>12,}"
                f"{t['grad_bytes'] / 1e6:>10.3f}{t['optimizer_state_bytes'] / 1e6:>10.3f}{t['peak_bytes'] / 1e6:>9.1f}"
            )
        c = s["config"]
        r = s["lora_over_full"]
        lines.append(
            f"      D={c['d_model']} L={c['n_layers']} T={c['context_length']} B={s['batch']}; "
            f"(N,D)@(D,D) matmul {s['matmul_model_gflops']:.1f} GFLOP/s, elementwise {s['stream_gbps']:.1f} GB/s; "
            f"LoRA W_q,W_v / full: step {r['lora_qv']['step_time']:.3f} (cpu {r['lora_qv']['step_cpu_time']:.3f}), "
            f"count {r['lora_qv']['flops']:.3f}, count+AdamW {r['lora_qv']['predicted']:.3f}"
        )
    lines += ["", f"{'size':<6}{'forward':<11}{'ms':>8}{'vs base':>9}{'GFLOP':>8}{'GF/s':>7}"]
    for s in result["sizes"]:
        for v, t in s["forward"].items():
            lines.append(
                f"{s['name']:<6}{v:<11}{t['median_s'] * 1e3:>8.2f}{t['vs_base']:>9.3f}"
                f"{t['flops']['total'] / 1e9:>8.3f}{t['gflops_per_s']:>7.1f}"
            )
    lines += ["", f"{'size':<6}{'threads':<14}" + "".join(f"{f'{v} {n}T ms':>16}" for n in THREAD_COUNTS
                                                     for v in ("full", "lora_qv"))]  # fmt: skip
    for s in result["sizes"]:
        for load, t in s["threads"].items():
            lines.append(f"{s['name']:<6}{load:<14}" + "".join(f"{t[str(n)][v] * 1e3:>16.1f}" for n in THREAD_COUNTS
                                                               for v in ("full", "lora_qv")))  # fmt: skip
    lines += ["", f"{'size':<6}{'full step':<17}{'faults':>7}{'ms':>9}"]
    for s in result["sizes"]:
        for mode, h in (s["heap"] or {}).items():
            lines.append(f"{s['name']:<6}{'memory ' + mode:<17}{h['faults']:>7,.0f}{h['median_s'] * 1e3:>9.1f}")
    lines += [
        "",
        "step = loss_and_grads + AdamW.step; pred = matmul flops at the (N,D)@(D,D) rate + AdamW bytes at the "
        "elementwise rate; %mm, %sq: GF/s as a share of the model-shaped and the square matmul; %ew: share of the "
        "step in GELU, LayerNorm, embeddings, cross-entropy and AdamW; peak: tracemalloc; nT: n BLAS threads; "
        "one_core_busy: another process spinning on one core; "
        "faults: page faults per step with freed memory returned to the system (glibc's starting thresholds) or kept "
        "(lora_np.training.heap).",
        "",
        "targets:",
    ]
    for t in result["targets"]:
        lines.append(f"  [{'pass' if t['pass'] else 'FAIL'}] {t['target']}: {t['measured']:.3f}  ({t['note']})")
    return "\n".join(lines)


def readme_table(result):
    """The README's table of a run, as Markdown: the README quotes it verbatim (a test checks)."""

    def ms(s):
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"

    lines = [
        "| D, L, T, B | full step | LoRA W_q,W_v step | LoRA / full (count) | full: % of matmul | element-wise "
        "share, full / LoRA | 2 threads / 1, full | merged / base forward | unmerged / base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["sizes"]:
        c, t, r, f = s["config"], s["train"], s["lora_over_full"]["lora_qv"], s["forward"]
        idle = s["threads"]["idle"]
        name = " (demo)" if s["name"] == "demo" else ""
        lines.append(
            f"| {c['d_model']}, {c['n_layers']}, {c['context_length']}, {s['batch']}{name} "
            f"| {ms(t['full']['median_s'])} | {ms(t['lora_qv']['median_s'])} | {r['step_time']:.2f} ({r['flops']:.2f}) "
            f"| {t['full']['share_of_matmul_model']:.0%} | {t['full']['elementwise_share']:.0%} / "
            f"{t['lora_qv']['elementwise_share']:.0%} | {idle['2']['full'] / idle['1']['full']:.2f} "
            f"| {f['merged_qv']['vs_base']:.2f} | {f['lora_qv']['vs_base']:.2f} |"
        )
    if all(s["heap"] for s in result["sizes"]):  # measured where glibc's malloc can be set
        lines += ["", "| D | full step, freed memory returned | kept (lora_np.training.heap) | kept / returned "
                  "| page faults per step, returned | kept |", "|---|---|---|---|---|---|"]  # fmt: skip
        for s in result["sizes"]:
            ret, kept = s["heap"]["returned"], s["heap"]["kept"]
            ratio = kept["median_s"] / ret["median_s"]
            lines.append(f"| {s['config']['d_model']} | {ms(ret['median_s'])} | {ms(kept['median_s'])} "
                         f"| {ratio:.2f} | {ret['faults']:,.0f} | {kept['faults']:,.0f} |")  # fmt: skip
    for s in result["sizes"]:  # the busy-core rows, where they were measured
        if "one_core_busy" in s["threads"]:
            idle, busy = s["threads"]["idle"], s["threads"]["one_core_busy"]
            lines += ["", f"| {s['name']} size, step | 1 thread, idle | 1 thread, one core busy | 2 threads, idle "
                      "| 2 threads, one core busy |", "|---|---|---|---|---|"]  # fmt: skip
            for v, label in (("full", "full fine-tuning"), ("lora_qv", "LoRA W_q,W_v")):
                lines.append(f"| {label} | {ms(idle['1'][v])} | {ms(busy['1'][v])} | {ms(idle['2'][v])} "
                             f"| {ms(busy['2'][v])} |")  # fmt: skip
    return "\n".join(lines)

