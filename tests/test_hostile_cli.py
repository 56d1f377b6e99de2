"""Hostile use of the command line and of the API (issue 12): each misuse gets one clear line and
exit status 2 (1 for a run that diverged), no traceback, and no file written; an accepted value
never crashes after the work is done. A script of its own, so that these stay fixed.

Every run is tiny (a few training steps); the file takes seconds.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from lora_np.layers import cross_entropy_forward
from lora_np.optim import AdamW
from lora_np.train import TrainingDiverged, generate, train

from lora_np import ModelConfig, init_params, model_backward, model_forward

TINY = ["--pretrain-steps", "2", "--steps", "2"]
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def run_cli(args, cwd):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lora_np", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.fixture
def place(tmp_path):
    """A scratch folder with a regular file, an empty folder, a broken JSON file and a read-only folder."""
    (tmp_path / "file.txt").write_text("some text, to fine-tune on or to be in the way\n" * 50)
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.json").write_text('{"format_version": 1, ')
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    yield tmp_path
    ro.chmod(0o755)


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# (argv with {F} a regular file, {D} an empty folder, {B} the broken JSON; the words stderr must
# hold). Each is a misuse: one line on stderr, exit status 2, nothing written.
MISUSES = [
    (["figurse"], "unknown command 'figurse'; commands are"),
    (["figurse", "--out", "x"], "unknown command 'figurse'"),
    # the demo
    (["--out", "", *TINY], "--out must be a folder path, got ''"),
    (["--out", "{F}", *TINY], "is a file; it must be a folder"),
    (["--out", "{F}/sub", *TINY], "is not a folder"),
    (["demo", "--out", "{F}", *TINY], "is a file; it must be a folder"),
    # figures
    (["figures", "--out", "{F}"], "is a file; it must be a folder"),
    (["figures", "--out", ""], "--out must be a folder path"),
    # bench
    (["bench", "--quick", "--threads", "1", "--out", "{D}"], "is a folder; it must be a file path"),
    (["bench", "--quick", "--threads", "1", "--out", ""], "--out must be a file path"),
    (["bench", "--quick", "--threads", "1", "--out", "{F}/x.json"], "is not a folder"),
    # experiments
    (["experiments", "--out", "/nonexistent_dir_lora_np/x.json"], "does not exist"),
    (["experiments", "--out", ""], "--out must be a file path"),
    (["experiments", "--out", "{D}"], "is a folder; it must be a file path"),
    (["experiments", "--out", "{D}/x.json", "--cache-dir", "{F}"], "--cache-dir"),
    # successors
    (["successors", "--out", "/nonexistent_dir_lora_np/x.json"], "does not exist"),
    (["successors", "--out", ""], "--out must be a file path"),
    (["successors", "--out", "{D}/x.json", "--cache-dir", "{F}"], "--cache-dir"),
    # course
    (["course", "make", "{F}"], "is a file; it must be a folder"),
    (["course", "make", ""], "must be a folder path"),
    (["course", "grade", "{D}", "--json", "{D}"], "--json"),
    (["course", "grade", "{D}", "--json", "/nonexistent_dir_lora_np/x.json"], "--json"),
    # gpt2 (its --weights need only be a folder and --data a file for the paths to be checked first)
    (["gpt2", "--weights", "{D}", "--data", "{F}", "--out", "{F}"], "is a file; it must be a folder"),
    (["gpt2", "--weights", "{D}", "--data", "{F}", "--out", ""], "--out must be a folder path"),
    (["gpt2", "bench", "--quick", "--threads", "1", "--out", "{D}"], "is a folder; it must be a file path"),
    (["gpt2", "bench", "--quick", "--threads", "1", "--out", "{F}/x.json"], "is not a folder"),
    # a folder that cannot be created, though its parent is writable (for root, too): issue 21, item 8
    (["--out", "/proc/lora", *TINY], "--out '/proc/lora': the folder cannot be created"),
    (["gpt2", "--weights", "{D}", "--data", "{F}", "--out", "/proc/lora"], "the folder cannot be created"),
]
if not ROOT:  # root can write anywhere: the cases below a regular file cover it
    MISUSES.append((["--out", "{R}/run", *TINY], "is not writable"))


@pytest.mark.parametrize("argv, words", MISUSES, ids=[" ".join(a) for a, _ in MISUSES])
def test_misuse_is_one_line_exit_2_nothing_written(place, argv, words):
    subs = {"{F}": "file.txt", "{D}": "folder", "{B}": "broken.json", "{R}": "readonly"}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, str(place / v))
        args.append(a)
    before = snapshot(place)
    p = run_cli(args, place)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert words in lines[0], lines[0]
    assert snapshot(place) == before
    assert p.stdout == ""


def test_experiments_check_names_a_broken_file(place):
    p = run_cli(["experiments", "--check", "--out", str(place / "broken.json")], place)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "broken.json" in p.stderr and "not valid JSON" in p.stderr


def test_successors_check_names_a_broken_file(place):
    p = run_cli(["successors", "--check", "--out", str(place / "broken.json")], place)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "broken.json" in p.stderr and "not valid JSON" in p.stderr


# ----------------------------------------------------------------------------
# item 1: a divergence is an error, and nothing of the run is written


def test_demo_divergence_exits_1_and_writes_no_results(tmp_path):
    out = tmp_path / "run"
    p = run_cli(["--pretrain-steps", "3", "--steps", "2", "--lr", "1e9", "--out", str(out)], tmp_path)
    assert p.returncode == 1, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: lora: the model diverged")
    written = {q.name for q in out.glob("*")} if out.exists() else set()
    assert not written & {"results.json", "base.npz", "full_finetuned.npz", "adapter.npz"}, written


CFG = ModelConfig(vocab_size=12, context_length=8, d_model=8, n_heads=2, n_layers=1, d_mlp=16)


def test_train_raises_when_layernorm_collapses():
    # weights so large that LayerNorm's float32 variance overflows: rstd = 0, the logits are a
    # constant, the loss a finite log V and every gradient zero. That is a divergence.
    from lora_np.params import cast

    params = cast(init_params(CFG, 0), np.float32)
    params["W_e"][...] = 1e30
    params["W_e"][:, ::2] = -1e30  # varying along D: the variance is ~1e60
    ids = np.arange(200) % CFG.vocab_size
    opt = AdamW(params, lr=1e-3)
    with pytest.raises(TrainingDiverged, match=r"LayerNorm"):
        train(params, ids, opt, steps=2, batch_size=2, block_size=8, seed=0, log_every=0)


def test_train_raises_when_an_update_is_not_finite():
    from lora_np.params import cast

    params = cast(init_params(CFG, 0), np.float32)
    ids = np.arange(200) % CFG.vocab_size
    opt = AdamW(params, lr=1e39)  # an update of ~1e39 is inf in float32
    with pytest.raises(TrainingDiverged, match=r"non-finite values after the update of step 0"):
        train(params, ids, opt, steps=1, batch_size=2, block_size=8, seed=0, log_every=0)


# ----------------------------------------------------------------------------
# item 3: full fine-tuning that does not move the loss


def test_full_lr_tiny_reports_undefined_gap_and_keeps_results(tmp_path):
    out = tmp_path / "run"
    p = run_cli([*TINY, "--full-lr", "1e-30", "--out", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "undefined: full fine-tuning did not move the loss" in p.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["gap_closed"] is None


# ----------------------------------------------------------------------------
# item 4: the API's small ones


@pytest.fixture(scope="module")
def tiny():
    return init_params(CFG, 0)


def test_generate_accepts_numpy_temperature_and_tiny_ones(tiny):
    out = generate(tiny, [1, 2], 3, temperature=np.float32(0.5))
    assert out.shape == (5,)
    out = generate(tiny, [1, 2], 3, temperature=1e-300)  # greedy in effect, not "probabilities contain NaN"
    assert out.shape == (5,)


@pytest.mark.parametrize("t", [True, 0, -1.0, float("nan"), float("inf"), "1", None])
def test_generate_refuses_bad_temperature(tiny, t):
    with pytest.raises((TypeError, ValueError), match=r"temperature must be a finite number > 0, got"):
        generate(tiny, [1, 2], 1, temperature=t)


@pytest.mark.parametrize("prompt", [[1.5, 2.0], np.array([0.5]), ["a"]])
def test_generate_refuses_non_integer_prompt(tiny, prompt):
    with pytest.raises((TypeError, ValueError), match=r"prompt_ids must be integer"):
        generate(tiny, prompt, 1)


def test_cross_entropy_takes_a_list_of_targets():
    loss, _ = cross_entropy_forward(np.zeros((2, 3)), [0, 2])
    assert np.isclose(loss, np.log(3))


def test_cross_entropy_refuses_zero_positions():
    with pytest.raises(ValueError, match=r"logits must have at least one position"):
        cross_entropy_forward(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))


def test_cross_entropy_refuses_float_targets():
    with pytest.raises(ValueError, match=r"targets must be integer ids"):
        cross_entropy_forward(np.zeros((2, 3)), [0.0, 1.0])


@pytest.mark.parametrize("cache", [{}, {"logits": ((1, 2, 12), np.float64)}, None, [1, 2]])
def test_model_backward_refuses_a_cache_not_from_model_forward(tiny, cache):
    with pytest.raises((TypeError, ValueError), match=r"cache must be the cache model_forward returned"):
        model_backward(np.zeros((1, 2, 12)), cache)


def test_model_backward_refuses_non_str_trainable(tiny):
    logits, cache = model_forward(tiny, np.array([[1, 2]]))
    with pytest.raises(TypeError, match=r"trainable must hold parameter names \(str\), got 3 \(int\)"):
        model_backward(np.zeros_like(logits), cache, ["W_e", 3])


def test_a_results_command_checks_every_path_before_it_trains(tmp_path, capsys):
    """The shared command of experiments, successors and fullrank: run is called only with paths that
    were checked, --check reports a file that does not fit with exit status 1, and nothing is written
    by the command itself."""
    from lora_np.studies.cli import results_command

    calls = []

    def check(path):
        if "bad" in str(path):
            raise ValueError("does not fit")

    def run(cache_dir, out):
        calls.append((cache_dir, out))
        return "trained"

    kw = dict(default_out=tmp_path / "r.json", default_cache=str(tmp_path / "cache"), check=check, run=run, d_model=64)
    assert results_command(["--check", "--out", "good.json"], "prog", "d", **kw) == 0
    assert results_command(["--check", "--out", "bad.json"], "prog", "d", **kw) == 1
    assert "error: does not fit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        results_command(["--out", str(tmp_path / "missing" / "r.json")], "prog", "d", **kw)
    assert e.value.code == 2 and calls == []  # refused before any training
    assert results_command([], "prog", "d", **kw) == 0
    assert calls == [(str(tmp_path / "cache"), tmp_path / "r.json")] and "trained" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # run wrote nothing here; the command writes nothing
