"""Numbers in prose come from code: every figure that the markdown of notebooks 06-09, notebooks/COURSE.md and the
README's GPT-2 paragraph state, and that a committed results file holds, recomputed here from that file and rounded
as the prose rounds it.

The files: notebooks/successors_results.json (07), adapters_results.json (08), fullrank_results.json and
serving_results.json (09), figures/gpt2_124m.json (README). Notebook 06 has no results file: everything it states is
computed and asserted live. COURSE.md's lecture plan quotes the paper, not a results file; what it does state about
this repository (how many notebooks there are, what was measured) is checked against the repository.

Prose is compared with its line breaks as spaces, so reflowing a paragraph does not break a check. Each check is a
sentence of the prose with the file's numbers put in: change a number in either place and the check fails. (The
README's demo and performance figures are checked in test_readme.py, its GPT-2 table in test_gpt2.py.)
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 9: "nine"}


def results(name):
    return json.loads((NOTEBOOKS / f"{name}_results.json").read_text(encoding="utf-8"))


def flat(text):
    return " ".join(text.split())


def markdown(notebook):
    """The notebook's markdown cells, one string, line breaks as spaces."""
    cells = json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text(encoding="utf-8"))["cells"]
    return flat(" ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"))


def says(prose, sentence):
    assert flat(sentence) in prose, f"the prose should say {flat(sentence)!r}"


# ----------------------------------------------------------------------------
# notebook 09, part A: notebooks/fullrank_results.json


@pytest.fixture(scope="module")
def fullrank():
    r = results("fullrank")
    base, full, span = r["base"]["test"], r["full"]["best"]["test"], r["span"]["best"]["test"]
    best = {row["r"]: row["best"]["test"] for row in r["lora"]}
    return r, base, full, span, best


def test_09_the_study_as_the_file_records_it(fullrank):
    r, *_ = fullrank
    prose, cfg = markdown("09_full_rank_and_serving"), r["config"]
    runs = (len(r["full"]["grid"]) + len(r["span"]["grid"]) + sum(len(row["grid"]) for row in r["lora"])
            + sum(not p["reused"] for p in r["paper"]))  # fmt: skip
    says(prose, f"Part A is {runs} fine-tuning runs of {cfg['steps']} steps, "
                f"about {round(r['provenance']['seconds'] / 60, -1):.0f} minutes")  # fmt: skip
    says(prose, f"{cfg['steps']} steps of AdamW, batch {cfg['batch_size']}, no weight decay")
    says(prose, "$r \\in \\{" + ", ".join(str(x) for x in cfg["ranks"]) + "\\}$")
    assert cfg["lrs"] == [3e-3, 1e-2, 3e-2] and cfg["full_lrs"] == [3e-4, 1e-3, 3e-3]
    says(prose, "($3\\cdot10^{-3}, 10^{-2}, 3\\cdot10^{-2}$ for LoRA, "
                "$3\\cdot10^{-4}, 10^{-3}, 3\\cdot10^{-3}$ for full")
    assert cfg["paper_lr"] == 1e-2
    says(prose, f"rsLoRA with $\\alpha = {cfg['alpha']:g}$")
    says(prose, f"the demo's $\\alpha = {cfg['paper_alpha']:g}$ and fixed learning rate $10^{{-2}}$")


def test_09_what_the_curve_shows(fullrank):
    r, base, full, span, best = fullrank
    prose = markdown("09_full_rank_and_serving")
    gap = {k: (base - v) / (base - full) for k, v in best.items()}
    top = best[max(best)]
    says(prose, f"at $r = 1$ already closes {gap[1]:.1%} of the gap")
    says(prose, f"({span - top:.3f} nats below it)")
    says(prose, f"that is worth about {span - full:.2f} nats here")
    cut = dict(zip(r["truncation"]["ranks"], r["truncation"]["test"], strict=True))
    says(prose, f"(by {cut[1] - best[1]:.3f} nats at $r = 1$, {cut[4] - best[4]:.3f} at $r = 4$, "
                f"{cut[16] - best[16]:.3f} at $r = 16$)")  # fmt: skip
    losses = ", ".join(f"{best[k]:.4f}" for k in sorted(best))
    says(prose, f"the improvements with $r$ ({losses}: {best[1] - top:.4f} in all)")
    # the learning-rate grid's spread at each rank; an unstable point (far above the rank's best) left out
    unstable = [(row["r"], x) for row in r["lora"] for x in row["grid"] if x["test"] > row["best"]["test"] + 0.1]
    spreads = []
    for row in r["lora"]:
        kept = [x["test"] for x in row["grid"] if (row["r"], x) not in unstable]
        spreads.append(max(kept) - min(kept))
    says(prose, f"({min(spreads):.3f} to {max(spreads):.3f}, with $r = 64$'s spread taken without its unstable point)")
    assert [(k, x["lr"]) for k, x in unstable] == [(64, 3e-2)]
    says(prose, f"$r = 64$ at $3\\cdot10^{{-2}}$ went unstable (test loss {unstable[0][1]['test']:.2f})")
    lag = max(p["test"] - best[p["r"]] for p in r["paper"])
    says(prose, f"lags rsLoRA by at most {lag:.3f} here")
    r1 = next(row for row in r["lora"] if row["r"] == 1)
    assert r1["best"]["lr"] == max(r["config"]["lrs"])  # "r = 1 chose the largest learning rate of its grid"
    says(prose, "$r = 1$ chose the largest learning rate of its grid")


def test_09_the_rank_of_full_fine_tunings_change(fullrank):
    r, base, full, span, best = fullrank
    prose = markdown("09_full_rank_and_serving")
    top4, k90 = {}, {}
    for name, s in r["truncation"]["singular_values"].items():
        share = np.cumsum(np.square(s)) / np.sum(np.square(s))
        top4[name], k90[name] = share[3], int(np.searchsorted(share, 0.9) + 1)
    says(prose, f"Its top 4 directions hold {min(top4.values()):.0%} to {max(top4.values()):.0%} of")
    n = len(next(iter(r["truncation"]["singular_values"].values())))
    says(prose, f"90% takes {min(k90.values())} to {max(k90.values())} of the {n} "
                "(the most for layer 0's MLP)")  # fmt: skip
    assert max(k90, key=k90.get) in ("blocks.0.W_1", "blocks.0.W_2")  # layer 0's MLP
    cut4 = dict(zip(r["truncation"]["ranks"], r["truncation"]["test"], strict=True))[4]
    says(prose, f"costs {cut4 - span:.3f} nats at $r = 4$: {cut4:.4f} against {span:.4f}")


def test_09_summary(fullrank):
    r, base, full, span, best = fullrank
    prose = markdown("09_full_rank_and_serving")
    gaps = [(base - v) / (base - full) for v in best.values()]
    losses = ", ".join(f"{best[k]:.4f}" for k in sorted(best))
    says(prose, f"(test loss; base {base:.3f}) | {losses}: {min(gaps):.1%} to {max(gaps):.1%} "
                "of full fine-tuning's gain")
    says(prose, f"full fine-tuning of the span / of everything | {span:.4f} / {full:.4f}")


# ----------------------------------------------------------------------------
# notebook 09, part B: notebooks/serving_results.json


def test_09_serving_as_timed():
    s = results("serving")
    prose = markdown("09_full_rank_and_serving")
    sizes = {z["name"]: z for z in s["sizes"]}
    demo, d128 = sizes["demo"], sizes["d128"]
    assert demo["batch"] == d128["batch"] == 16 and demo["lora"]["r"] == 8 and demo["lora"]["targets"] == ["W_q", "W_v"]
    says(prose, f"times one mixed batch of {demo['batch']} rows of $T$ tokens")
    says(prose, f"LoRA $r = {demo['lora']['r']}$ on $W_q, W_v$ (random $B$)")

    def at(z, k, way):
        return next(row["vs_base"][way] for row in z["rows"] if row["tasks"] == k)

    says(prose, f"at $K = 16$, one row per task, it takes {at(demo, 16, 'merged'):.2f} (demo) and "
                f"{at(d128, 16, 'merged'):.2f} (d128) times the base")  # fmt: skip
    middle = [at(z, k, "merged") for z in (demo, d128) for k in (2, 4, 8)]
    assert min(middle) < 1 < max(middle)  # "on both sides of 1"
    says(prose, f"Between $K = 2$ and $8$ it wanders on both sides of 1 ({min(middle):.2f} to {max(middle):.2f})")
    unmerged = [row["vs_base"][w] for z in (demo, d128) for row in z["rows"] for w in ("group", "gather")]
    says(prose, f"costs about the same whatever $K$: {min(unmerged):.2f} to {max(unmerged):.2f} times the base")
    smaller = [z["bytes"]["merged_copy"] // z["bytes"]["adapter"] for z in (demo, d128)]
    assert all(z["bytes"]["merged_copy"] % z["bytes"]["adapter"] == 0 for z in (demo, d128))
    says(prose, f"keeps only the adapters, {smaller[0]} (demo) and {smaller[1]} (d128) times smaller here")
    merged16 = sorted(at(z, 16, "merged") for z in (demo, d128))
    says(prose, f"unmerged {min(unmerged):.2f} to {max(unmerged):.2f} x the base at any number of tasks; "
                f"merged {merged16[0]:.2f} to {merged16[1]:.2f} x at 16 tasks")  # fmt: skip


# ----------------------------------------------------------------------------
# notebook 07: notebooks/successors_results.json


def test_07_the_runs_as_the_file_records_them():
    r = results("successors")
    prose, cfg = markdown("07_after_lora"), r["config"]
    demo = cfg["demo"]
    says(prose, f"fine-tuned for {cfg['steps']} steps of AdamW on the shifted domain")
    says(prose, f"all of them on the demo task over {WORDS[len(cfg['seeds'])]} seeds")
    assert (demo["lr"], demo["full_lr"]) == (1e-2, 1e-3)
    says(prose, f"Every adapter method uses the demo's learning rate $10^{{-2}}$, rank {cfg['rank']} on "
                f"${', '.join(cfg['targets'])}$ and $\\alpha = {cfg['alpha']:g}$; "
                "full fine-tuning $10^{-3}$")  # fmt: skip
    vera_r = next(m["r"] for name, m in cfg["methods"].items() if m and m.get("method") == "vera")
    says(prose, f"In the results file VeRA runs at $r = {vera_r}$")
    says(prose, f"Here, at $r = {vera_r}$ with far fewer trainable numbers than LoRA")
    assert vera_r == demo["model"]["d_model"]  # "the largest rank lora_np's `check_rank` accepts on the 64-wide model"
    says(prose, f"accepts on the {demo['model']['d_model']}-wide model")
    says(prose, f"PEFT's default VeRA rank, 256 [PEFT, `VeraConfig`], is {WORDS[256 // demo['model']['d_model']]} "
                "times this model's width")  # fmt: skip
    ratio = next(m["lr_ratio"] for m in cfg["methods"].values() if m and "lr_ratio" in m)
    assert ratio == 2**4
    says(prose, f"The ratio used here, $\\lambda = 2^4 = {ratio:g}$")
    says(prose, f"a {ratio:g}× larger step for $B$")
    full = r["runs"]["full fine-tuning"]
    assert len({run["trainable"] for run in full}) == 1
    says(prose, f"against {round(full[0]['trainable'] / 1000)}k parameters")
    says(prose, f"a {round(full[0]['trainable'] / 1000)}k-parameter model with one shared learning rate")


def test_readme_init_adapters_states_the_starts_the_file_records():
    """The README's "After LoRA": QLoRA's 4-bit base starts elsewhere; every other method at the base's loss."""
    r = results("successors")
    readme = flat((ROOT / "README.md").read_text(encoding="utf-8"))
    start = {name: {round(run["start"], 4) for run in runs} for name, runs in r["runs"].items()}
    base = round(r["base"]["new"], 4)
    nf4, dq = start.pop("QLoRA (NF4)"), start.pop("QLoRA (NF4, double quant)")
    assert all(s == {base} for s in start.values()), start  # everything else starts at the base model's loss
    assert len(nf4) == len(dq) == 1 and nf4 != {base}
    says(readme, f"at step 0 its loss on the new domain is {nf4.pop():.4f}, {dq.pop():.4f} with double "
                 f"quantization, against the float32 base's {base:.4f}")  # fmt: skip


# ----------------------------------------------------------------------------
# notebook 08: notebooks/adapters_results.json


def test_08_quality_as_the_file_records_it():
    r = results("adapters")
    prose, cfg = markdown("08_adapters_and_latency"), r["config"]
    runs = r["runs"]
    lora, h, l_ = runs["LoRA (W_q, W_v)"], runs["AdapterH"], runs["AdapterL"]
    says(prose, f"fine-tuned on Yoda's word order for the demo's {cfg['steps']} steps")
    says(prose, f"{WORDS[len(cfg['seeds'])]} seeds. LoRA ($r = {cfg['rank']}$ on $W_q, W_v$) and both adapters "
                f"($r = {cfg['rank']}$)")  # fmt: skip
    # "all three close more than nine tenths of full fine-tuning's gain at every seed"
    assert all(run["gap_closed"] > 0.9 for runs_ in (lora, h, l_) for run in runs_)
    says(prose, "all three close more than nine tenths of full fine-tuning's gain at every seed")
    # "training one to two percent of the model's numbers"
    total = runs["full fine-tuning"][0]["trainable"]
    shares = [run["trainable"] / total for runs_ in (lora, h, l_) for run in runs_]
    lo, hi = round(100 * min(shares)), round(100 * max(shares))  # whole percents, as the prose says them
    says(prose, f"training {WORDS[lo]} to {WORDS[hi]} percent of the model's numbers")
    # "AdapterH and LoRA end within two hundredths of a nat of each other"; "AdapterL ... behind LoRA at every seed"
    assert all(abs(a["new"] - b["new"]) < 0.02 for a, b in zip(h, lora, strict=True))
    says(prose, "AdapterH and LoRA end within two hundredths of a nat of each other")
    assert all(a["new"] > b["new"] for a, b in zip(l_, lora, strict=True))
    # latency: r = 8, on a model twice the demo's width and depth
    lat, demo = r["latency"]["meta"], cfg["model"]
    assert (lat["model"]["d_model"], lat["model"]["n_layers"]) == (2 * demo["d_model"], 2 * demo["n_layers"])
    says(prose, f"all at $r = {lat['r']}$, on a model twice the demo's width and depth")


# ----------------------------------------------------------------------------
# notebooks/COURSE.md


def test_course_counts_the_notebooks_it_has_and_states_no_unrecorded_timing():
    course = flat((NOTEBOOKS / "COURSE.md").read_text(encoding="utf-8"))
    n = len(sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")))
    says(course, f"The lecture uses notebooks 01–05 of the {WORDS[n]} in this folder")
    # a time "measured" must come from a committed file; COURSE.md quotes none, so it states none
    assert not re.search(r"\d(\.\d+)? ?s measured", course), "COURSE.md states a measured time no file records"


# ----------------------------------------------------------------------------
# the README's GPT-2 124M paragraph: figures/gpt2_124m.json


def gpt2_paragraph():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("**Cost at GPT-2's real size.**")
    return flat(readme[start:readme.index("\n## ", start)])


def test_readme_gpt2_paragraph_names_the_machine_the_file_records():
    r = json.loads((ROOT / "figures" / "gpt2_124m.json").read_text(encoding="utf-8"))
    para = gpt2_paragraph()
    if "machine" in r:
        says(para, f"{r['machine']['cpu']}, {r['machine']['nproc']} cores")
    else:  # a run from before the bench recorded the machine: the paragraph may name none
        assert not re.search(r"Intel|AMD|EPYC|Xeon|Ryzen|Apple|Graviton|\d+ cores", para), para
        says(para, "it names no CPU")
    # every throughput the paragraph states is one the file holds
    held = {f"{r[v]['gflops_per_s']:.1f}" for v in ("lora", "full")} | {f"{r['matmul_square_gflops']:.1f}"}
    stated = set(re.findall(r"(\d+(?:\.\d+)?) GFLOP/s", para)) | set(re.findall(r"\| (\d+\.\d) \|", para))
    assert stated and stated <= held, f"GFLOP/s figures {sorted(stated - held)} are in no committed file"


def test_the_gpt2_bench_records_the_machine():
    """Runs from now on carry the CPU, so the README can print it from the file."""
    from lora_np.bench.gpt2 import run, table

    r = run(reps=1, quick=True, log=lambda *a: None)
    assert r["machine"]["cpu"] and r["machine"]["nproc"] >= 1
    assert f"{r['machine']['cpu']}, {r['machine']['nproc']} cores" in table(r)
