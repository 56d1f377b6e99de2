"""`python -m lora_np` as a newcomer runs it: a subprocess, a handful of steps."""

import json
import subprocess
import sys


def run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lora_np", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_demo_runs_and_prints_its_table(tmp_path):
    out = tmp_path / "run"
    r = run("--steps", "3", "--pretrain-steps", "3", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for row in ("pretrained base", "full fine-tuning", "LoRA r=4 W_q,W_v"):
        assert row in r.stdout
    assert "closes" in r.stdout and "merged (W0 + s·B·A) vs unmerged" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["rows"]["lora"]["trainable"] == 2 * 2 * 4 * (64 + 64)  # layers · targets · r(d_in + d_out)
    assert res["merge_max_abs_diff"] < 1e-4
    assert (out / "adapter.npz").stat().st_size == res["rows"]["lora"]["file"]
    # a second run reuses the cached base, checked by its fingerprint
    r2 = run("--steps", "3", "--pretrain-steps", "3", "--out", str(out), cwd=tmp_path)
    assert "reusing the pretrained base model" in r2.stdout
    assert f"to {out}, replacing the previous run" in r2.stdout and "replacing" not in r.stdout  # never silently
    assert json.loads((out / "results.json").read_text())["rows"]["lora"]["new"] == res["rows"]["lora"]["new"]


def test_bad_flags_get_the_api_errors_before_any_work(tmp_path):
    for args, message in (
        (("--rank", "0"), "r must be an int >= 1, got 0"),
        (("--targets", "W_q,W_x"), "unknown LoRA target 'W_x'"),
        (("--alpha", "-1"), "alpha must be a finite number > 0, got -1.0"),
        (("--rank", "65"), "r must be between 1 and min(d_out, d_in) = 64"),
        (("--lr", "0"), "lr must be a finite number > 0, got 0.0"),
    ):
        r = run(*args, "--out", str(tmp_path / "x"), cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x").exists()


def test_help_explains_each_flag(tmp_path):
    r = run("--help", cwd=tmp_path)
    for flag in ("--steps", "--rank", "--alpha", "--targets", "--lr", "--seed", "--out"):
        assert flag in r.stdout


def test_check_command(tmp_path):
    r = run("check", cwd=tmp_path)
    assert r.returncode == 0 and "worst relative error" in r.stdout and "ok" in r.stdout
