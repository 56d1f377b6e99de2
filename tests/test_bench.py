"""The benchmark: its --quick run writes every figure, and its operation count matches the products run.

Timings are never asserted (they depend on the machine and its load); counts and bytes are.
"""

import json
import os
import subprocess
import sys
from collections import defaultdict

import lora_np.model as model_module
import numpy as np
import pytest
from lora_np.counting import config_lora_params, config_params
from lora_np.train import loss_and_grads

from lora_np import LORA_TARGETS, LoraConfig, ModelConfig, cast, init_lora, init_params, model_forward
from lora_np.__main__ import main as cli_main
from lora_np.bench.cost import FORWARD_VARIANTS, TRAIN_VARIANTS, main, run, step_flops
from lora_np.bench.report import targets
from lora_np.figures import draw_bench
from lora_np.studies.measure import QUICK_SIZES
from lora_np.studies.recipe import DemoConfig
from lora_np.training.heap import transparent_huge_pages

TRAIN_KEYS = {
    "wall_s", "cpu_s", "median_s", "cpu_median_s", "flops", "gflops_per_s", "share_of_matmul_model",
    "share_of_matmul_square", "predicted_s", "trainable", "grad_bytes", "optimizer_state_bytes", "adamw_ops",
    "adamw_bytes", "peak_bytes", "elementwise_share", "elementwise_s",
}  # fmt: skip
FORWARD_KEYS = {"wall_s", "cpu_s", "median_s", "cpu_median_s", "flops", "gflops_per_s", "vs_base"}
META_KEYS = {
    "cpu", "nproc", "numpy", "blas", "python", "threads", "blas_threads", "load_before", "load_after", "reps", "quick",
    "started", "matmul_square_shape", "matmul_square_gflops",
}  # fmt: skip


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # the command as a user runs it: lora_np.bench.cost measures, `python -m lora_np bench` also draws
    assert cli_main(["bench", "--quick", "--threads", "1", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_quick_run_writes_every_key(quick):
    out, res = quick
    assert set(res) == {"meta", "sizes", "targets", "serving", "latency"}
    assert res["serving"]["meta"]["quick"] and res["latency"]["meta"]["quick"]  # their own tests check the rest
    assert set(res["meta"]) == META_KEYS
    assert [s["name"] for s in res["sizes"]] == list(QUICK_SIZES)
    for s in res["sizes"]:
        assert set(s["train"]) == set(TRAIN_VARIANTS) and set(s["forward"]) == set(FORWARD_VARIANTS)
        for t in s["train"].values():
            assert set(t) == TRAIN_KEYS
            assert len(t["wall_s"]) == len(t["cpu_s"]) == res["meta"]["reps"] == 2
            assert t["median_s"] > 0 and t["peak_bytes"] > 0 and t["predicted_s"] > 0
        for t in s["forward"].values():
            assert set(t) == FORWARD_KEYS
        assert set(s["lora_over_full"]) == {"lora_qv", "lora_all"}
        assert s["merge_max_abs_diff"] < 1e-5  # the merged model computes what the unmerged one does
        # the threads table: idle at every size, with a busy core at the first one only
        assert list(s["threads"]) == (["idle", "one_core_busy"] if s is res["sizes"][0] else ["idle"])
        for by_threads in s["threads"].values():
            assert list(by_threads) == ["1", "2"]
            assert all(set(t) == {"full", "lora_qv"} and min(t.values()) > 0 for t in by_threads.values())
        # freed memory returned to the system against kept (lora_np.training.heap)
        # (what the faults must be is tested in a fresh process below: here the heap holds earlier tests' memory)
        assert set(s["heap"]) == {"returned", "kept"}
        assert all(h["median_s"] > 0 and h["faults"] >= 0 for h in s["heap"].values())
        for t in s["train"].values():
            assert 0 < t["elementwise_share"] < 1
            assert set(t["elementwise_s"]) == {"gelu", "layernorm", "embedding", "cross_entropy", "adamw"}
    assert res["meta"]["blas_threads"] == 1
    for t in res["targets"]:
        assert set(t) == {"target", "measured", "pass", "note"} and isinstance(t["pass"], bool)
    assert out.with_suffix(".png").stat().st_size > 10_000  # the figure of this run, beside its JSON


def test_quick_run_bytes_follow_from_the_counts(quick):
    """Gradients exist exactly for the trainable numbers, and AdamW keeps two moments for each (float32)."""
    _, res = quick
    for s in res["sizes"]:
        cfg = ModelConfig(**s["config"])
        expected = {
            "full": config_params(cfg),
            "lora_qv": config_lora_params(cfg, LoraConfig(r=4, targets=("W_q", "W_v"))),
            "lora_all": config_lora_params(cfg, LoraConfig(r=4, targets=LORA_TARGETS)),
        }
        for v, n in expected.items():
            t = s["train"][v]
            assert t["trainable"] == n
            assert t["grad_bytes"] == 4 * n
            assert t["optimizer_state_bytes"] == 2 * 4 * n
        assert s["lora_over_full"]["lora_qv"]["optimizer_state"] == expected["full"] / expected["lora_qv"]


def _instrument(monkeypatch):
    """Wrap the layer functions the model calls; count 2·m·k·n for every product they run, from the shapes."""
    count = {"linear": 0, "lora": 0, "attention": 0}
    real = {name: getattr(model_module, name) for name in (
        "linear_forward", "linear_backward", "lora_linear_forward", "lora_linear_backward",
        "attention_forward", "attention_backward",
    )}  # fmt: skip

    def linear_forward(x, W, b):
        count["linear"] += 2 * (x.size // W.shape[1]) * W.shape[0] * W.shape[1]
        return real["linear_forward"](x, W, b)

    def linear_backward(dout, cache, **kw):
        dx, dW, db = real["linear_backward"](dout, cache, **kw)
        x, W, _ = cache
        rows = x.size // W.shape[1]
        count["linear"] += 2 * rows * W.shape[0] * W.shape[1] * ((dx is not None) + (dW is not None))
        return dx, dW, db

    def lora_linear_forward(x, W, b, A, B, scaling, **kw):
        rows, r = x.size // W.shape[1], A.shape[0]
        count["linear"] += 2 * rows * W.shape[0] * W.shape[1]
        count["lora"] += 2 * rows * r * W.shape[1] + 2 * rows * r * W.shape[0]  # x·Aᵀ, then (x·Aᵀ)·Bᵀ
        return real["lora_linear_forward"](x, W, b, A, B, scaling, **kw)

    def lora_linear_backward(dout, cache, **kw):
        dx, dA, dB = real["lora_linear_backward"](dout, cache, **kw)
        x, W, _, _, _, A, B, _ = cache
        rows, (d_out, d_in), r = x.size // W.shape[1], W.shape, A.shape[0]
        count["linear"] += 2 * rows * d_out * d_in * (dx is not None)  # g·W0
        count["lora"] += 2 * rows * d_out * r  # g·B, needed by dA and dx alike
        count["lora"] += 2 * rows * d_out * r * (dB is not None) + 2 * rows * r * d_in * (dA is not None)
        count["lora"] += 2 * rows * r * d_in * (dx is not None)  # (s·Bᵀ·g)·A
        return dx, dA, dB

    def attention_forward(q, k, v, n_heads):
        Bsz, T, D = q.shape
        count["attention"] += 2 * (2 * Bsz * n_heads * T * T * (D // n_heads))  # q·kᵀ and att·v, per head
        return real["attention_forward"](q, k, v, n_heads)

    def attention_backward(dy, cache):
        Bsz, H, T, hs = cache[0].shape
        count["attention"] += 4 * (2 * Bsz * H * T * T * hs)  # datt, dv, dq, dk
        return real["attention_backward"](dy, cache)

    wrappers = (linear_forward, linear_backward, lora_linear_forward, lora_linear_backward, attention_forward,
                attention_backward)  # fmt: skip
    for fn in wrappers:
        monkeypatch.setattr(model_module, fn.__name__, fn)
    return count


@pytest.mark.parametrize("variant", ["full", "lora_qv", "lora_all", "forward", "forward_lora"])
def test_step_flops_matches_the_products_actually_run(monkeypatch, variant):
    cfg = ModelConfig(vocab_size=30, context_length=8, d_model=16, n_heads=2, n_layers=2, d_mlp=48)
    batch = 3
    params = cast(init_params(cfg, seed=0), np.float32)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 30, size=(2, batch, cfg.context_length))
    lora = {
        "lora_qv": LoraConfig(r=4, targets=("W_q", "W_v")),
        "lora_all": LoraConfig(r=3, targets=LORA_TARGETS),
        "forward_lora": LoraConfig(r=2, targets=("W_k", "W_1")),
    }.get(variant)
    adapters = None if lora is None else cast(init_lora(cfg, lora, seed=1), np.float32)
    count = _instrument(monkeypatch)
    if variant.startswith("forward"):
        model_forward(params, x, adapters, lora)
    else:
        loss_and_grads(params, x, y, adapters, lora)
    predicted = step_flops(cfg, batch, lora, backward=not variant.startswith("forward"))
    assert predicted["linear"] + predicted["head"] == count["linear"]
    assert predicted["lora"] == count["lora"]
    assert predicted["attention"] == count["attention"]
    assert predicted["total"] == sum(count.values())


def test_step_flops_by_hand():
    """One case worked out on paper: D = 4, M = 8, V = 5, T = 2, B = 1, one layer, full fine-tuning.

    N = 2 positions. Six weights hold 4·16 + 2·32 = 128 numbers: 3 products of 2·N·128 = 512 each.
    Attention: 6 products of 2·B·T²·D = 32. Head (5, 4): 3 products of 2·2·4·5 = 80.
    """
    cfg = ModelConfig(vocab_size=5, context_length=2, d_model=4, n_heads=1, n_layers=1, d_mlp=8)
    f = step_flops(cfg, 1)
    assert (f["linear"], f["attention"], f["head"], f["lora"]) == (1536, 192, 240, 0)
    assert f["total"] == 1968


def test_bad_input_is_named():
    cfg = QUICK_SIZES["q32"][0]
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        step_flops(cfg, 0)
    with pytest.raises(TypeError, match="lora must be a LoraConfig or None"):
        step_flops(cfg, 2, lora="W_q")
    with pytest.raises(ValueError, match="sizes must be names from"):
        run(["d1024"], 1)
    with pytest.raises(SystemExit):
        main(["--sizes", "d1024"])
    with pytest.raises(SystemExit):
        main(["--threads", "env"])


def test_draw_bench_without_a_json_runs_the_quick_benchmark(tmp_path):
    fig, numbers = draw_bench(None)
    assert numbers["source"].startswith("quick run") and numbers["sizes"] == list(QUICK_SIZES)
    assert len(fig.axes) >= 6


def test_timed_elementwise_times_every_elementwise_call_and_restores_the_functions():
    """Each wrapped layer runs (the loss is the unwrapped one's, bit for bit) and is put back after."""
    from lora_np.optim import AdamW

    from lora_np.bench.cost import ELEMENTWISE, timed_elementwise

    cfg = QUICK_SIZES["q32"][0]
    params = cast(init_params(cfg, seed=0), np.float32)
    x, y = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 2, cfg.context_length))
    before = {name: getattr(model_module, name) for name in ELEMENTWISE if hasattr(model_module, name)}
    step = AdamW.step
    plain = loss_and_grads(params, x, y)[0]
    seconds = defaultdict(float)
    with timed_elementwise(seconds):
        assert model_module.gelu_forward is not before["gelu_forward"]
        loss, grads = loss_and_grads(params, x, y)
        AdamW(params, lr=1e-3).step(grads)
    assert loss == plain
    assert set(seconds) == {"gelu", "layernorm", "embedding", "cross_entropy", "adamw"}
    assert all(s > 0 for s in seconds.values())
    assert {name: getattr(model_module, name) for name in before} == before and AdamW.step is step


def test_paired_ratio_is_the_median_of_round_by_round_ratios():
    from lora_np.studies.measure import paired_ratio

    # a slow round (the third) scales both timings alike and drops out of the ratio
    assert paired_ratio([2.0, 4.0, 30.0, 2.0], [1.0, 2.0, 10.0, 1.0]) == 2.0
    assert paired_ratio([1.0, 3.0, 6.0], [1.0, 1.0, 1.0]) == 3.0


@pytest.mark.skipif(transparent_huge_pages() == "always", reason="huge pages 'always': faults per 2 MiB")
def test_heap_table_counts_the_page_faults_that_kept_memory_saves():
    # In a fresh process: a test process's heap already holds memory freed by earlier tests, and malloc
    # hands that out again whatever its thresholds say, so the faults counted here would depend on them.
    code = (
        "import json, numpy as np\n"
        "from lora_np.bench.cost import heap_table\n"
        "def step():\n"  # a step's temporaries, in miniature: ten 1 MiB arrays, each written and freed
        "    for _ in range(10):\n"
        "        np.empty(256 * 1024, dtype=np.float32).fill(1.0)\n"
        "print(json.dumps(heap_table(step, reps=3)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    h = json.loads(out.stdout)
    if h is None:
        pytest.skip("no glibc: nothing to set")
    pages = 256  # 4 KiB pages in 1 MiB (NumPy asks for huge pages from 4 MiB on, which fault fewer times)
    assert h["returned"]["faults"] >= 0.9 * 10 * pages  # each array back from the system, page by page
    assert h["kept"]["faults"] < pages  # less than one fresh array in the whole step


def test_the_demo_target_adds_up_the_demos_steps(quick):
    _, res = quick
    sizes = [dict(res["sizes"][0], name="demo")]  # a quick size standing in for the demo's
    (record,) = [t for t in targets(sizes) if t["target"].startswith("the demo")]
    d, t = DemoConfig(), sizes[0]["train"]
    by_hand = (d.pretrain_steps + d.steps) * t["full"]["median_s"] + d.steps * t["lora_qv"]["median_s"]
    assert record["measured"] == pytest.approx(by_hand, rel=1e-12)
    counts = (("full", d.pretrain_steps + d.steps), ("lora_qv", d.steps))
    products = sum(n * t[v]["flops"]["total"] for v, n in counts) / (sizes[0]["matmul_model_gflops"] * 1e9)
    layers = sum(n * sum(t[v]["elementwise_s"].values()) for v, n in counts)
    with_layers = products + layers
    assert f"rate: {products:.1f} s; with the element-wise layers at their measured time: {with_layers:.1f} s" in (
        record["note"]
    )
    assert record["pass"] == (by_hand <= 25)
    assert f"{d.pretrain_steps + 2 * d.steps:,} training steps" in record["target"]


def test_the_throughput_targets_say_the_best_share_the_elementwise_layers_leave(quick):
    _, res = quick
    s = res["sizes"][-1]
    full = s["train"]["full"]
    products_s = full["flops"]["total"] / s["matmul_model_gflops"] / 1e9
    ceiling = products_s / (products_s + sum(full["elementwise_s"].values()))
    assert 0 < ceiling < 1
    notes = [t["note"] for t in targets(res["sizes"]) if "matmul throughput" in t["target"]]
    assert notes and all(f"at most {ceiling:.0%} with those layers as they are" in n for n in notes)
