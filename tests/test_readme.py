"""The README's worked example runs as written (its asserts are part of the example), and the numbers
its demo section states agree with the demo table they come from."""

import json
import re
from pathlib import Path

from lora_np.counting import config_lora_params, config_params

from lora_np.bench.report import readme_table
from lora_np.studies.recipe import DemoConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md should show a worked example in a ```python block"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def demo_table_row(readme, label):
    """(trainable, val new, val old) of one row of the demo's printed table."""
    match = re.search(rf"^ +{re.escape(label)} +([\d,]+|-) .*$", readme, flags=re.M)
    assert match, f"README.md's demo table has no row {label!r}"
    losses = re.findall(r"\b\d+\.\d{4}\b", match.group(0))  # val new, val old: the two 4-decimal columns
    assert len(losses) == 2, f"row {label!r} should hold two losses with 4 decimals, got {losses}: {match.group(0)!r}"
    return match.group(1), float(losses[0]), float(losses[1])


def test_the_demo_section_states_what_its_table_shows():
    readme = README.read_text(encoding="utf-8")
    demo = DemoConfig()
    _, base_new, _ = demo_table_row(readme, "pretrained base")
    n_full, full_new, _ = demo_table_row(readme, "full fine-tuning")
    n_lora, lora_new, _ = demo_table_row(readme, f"LoRA r={demo.rank} W_q,W_v")
    gap = (base_new - lora_new) / (base_new - full_new)  # (L_base - L_lora) / (L_base - L_full)
    # the trainable counts are the demo configuration's, by formula
    assert (n_full, n_lora) == (f"{config_params(demo.model):,}", f"{config_lora_params(demo.model, demo.lora()):,}")
    # the table's summary line, as the demo prints it, and the prose below it, rounded to a percent
    assert f"LoRA closes {gap:.1%} of the gap" in readme, f"the table's losses give {gap:.1%}"
    assert f"LoRA closes {gap:.0%} of the gap" in " ".join(readme.split()), f"the table's losses give {gap:.0%}"


def test_the_performance_tables_are_the_committed_benchmark_run():
    """The README quotes figures/bench.json through bench.readme_table, so a rerun that is not pasted
    back (or a table edited by hand) fails here."""
    result = json.loads((README.parent / "figures" / "bench.json").read_text(encoding="utf-8"))
    assert readme_table(result) in README.read_text(encoding="utf-8")


def test_the_performance_prose_states_what_the_benchmark_measured():
    """The ranges the prose gives are those of figures/bench.json, rounded as the prose rounds them."""
    readme = " ".join(README.read_text(encoding="utf-8").split())  # line breaks as spaces
    result = json.loads((README.parent / "figures" / "bench.json").read_text(encoding="utf-8"))
    sizes = result["sizes"]
    merged = [s["forward"]["merged_qv"]["vs_base"] for s in sizes]
    assert f"({min(merged):.2f}–{max(merged):.2f} of its time at every size)" in readme
    unmerged = max(s["forward"]["lora_qv"]["vs_base"] for s in sizes)
    assert f"LoRA on `W_q, W_v` adds at most {round(100 * (unmerged - 1)):.0f}%" in readme
    faster = [1 - s["threads"]["idle"]["2"]["full"] / s["threads"]["idle"]["1"]["full"] for s in sizes]
    assert f"a second thread makes a step {min(faster):.0%}–{max(faster):.0%} faster".replace("%–", "–") in readme
    busy = next(s["threads"] for s in sizes if "one_core_busy" in s["threads"])
    slower = [busy["one_core_busy"]["2"][v] / busy["one_core_busy"]["1"][v] for v in ("full", "lora_qv")]
    assert f"the step takes {min(slower):.1f}–{max(slower):.1f} times as long as with one thread" in readme


def test_the_memory_and_demo_prose_states_what_the_benchmark_measured():
    """The page-fault bullet and the 25-second bullet, recomputed from figures/bench.json by hand."""
    from lora_np.studies.recipe import DemoConfig

    readme = " ".join(README.read_text(encoding="utf-8").split())
    sizes = json.loads((README.parent / "figures" / "bench.json").read_text(encoding="utf-8"))["sizes"]
    saved = [1 - s["heap"]["kept"]["median_s"] / s["heap"]["returned"]["median_s"] for s in sizes]
    assert f"saves {min(saved):.0%}–{max(saved):.0%} of a step".replace("%–", "–") in readme
    faults = [s["heap"]["returned"]["faults"] for s in sizes]
    assert f"a full step takes {min(faults):,.0f} to {max(faults):,.0f} page faults" in readme
    assert all(s["heap"]["kept"]["faults"] == 0 for s in sizes)  # "and none once the memory is kept"
    by = {s["name"]: s for s in sizes}
    share128, share512 = (by[n]["train"]["full"]["share_of_matmul_model"] for n in ("d128", "d512"))
    assert (f"reaches {share128:.0%} of the `(N, D) @ (D, D)` product's throughput at `d_model = 128` "
            f"and {share512:.0%} at 512") in readme  # fmt: skip
    d, demo = DemoConfig(), by["demo"]
    n_full, n_lora = d.pretrain_steps + d.steps, d.steps
    t, rate = demo["train"], demo["matmul_model_gflops"] * 1e9
    steps_s = n_full * t["full"]["median_s"] + n_lora * t["lora_qv"]["median_s"]
    products_s = (n_full * t["full"]["flops"]["total"] + n_lora * t["lora_qv"]["flops"]["total"]) / rate
    assert f"The demo is {n_full + n_lora:,} training steps" in readme
    assert f"({d.pretrain_steps} of pretraining, then {d.steps} of each method)" in readme
    layers_s = sum(n * sum(t[v]["elementwise_s"].values()) for v, n in (("full", n_full), ("lora_qv", n_lora)))
    assert f"they take {steps_s:.0f} s before any evaluation" in readme
    assert f"product, take {products_s:.1f} s, and with the element-wise layers added at their" in readme
    assert f"measured time {products_s + layers_s:.1f} s: past 25 s before attention" in readme
    assert products_s + layers_s > 25
