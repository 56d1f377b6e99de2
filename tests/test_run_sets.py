"""A run's outputs as one set (issue 21, items 1-4): locked while the run works, replacing the previous
set whole or not at all, Ctrl-C one line and exit status 130.

The set itself (lora_np.training.runset) is tested in this process; the commands in subprocesses,
each refused before any work or run for a few steps, so the file takes seconds.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lora_np.studies import demo
from lora_np.studies.recipe import DemoConfig, cache_path
from lora_np.training.runset import COMMIT, STAGING, LockedFile, OutputBusy, OutputRefused, RunSet

MEMBERS = {"adapter.npz": "file", "peft": "folder", "results.json": "file"}
TINY = ["--pretrain-steps", "2", "--steps", "2", "--threads", "1"]


def run_cli(args, cwd, timeout=120):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lora_np", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def write_set(folder, tag, peft=True):
    (folder / "adapter.npz").write_text(f"adapter {tag}")
    (folder / "results.json").write_text(json.dumps({"tag": tag}))
    if peft:
        (folder / "peft").mkdir()
        (folder / "peft" / "adapter_config.json").write_text(f"peft {tag}")


def contents(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def previous(tmp_path):
    """An output folder holding a previous run's set, the demo's cache and a user's own file."""
    out = tmp_path / "out"
    out.mkdir()
    write_set(out, "old")
    (out / "cache").mkdir()
    (out / "cache" / "base-x.npz").write_text("cached base")
    (out / "notes.txt").write_text("mine")
    return out


# ----------------------------------------------------------------------------
# the set, in this process


def test_a_commit_replaces_the_set_whole_and_touches_nothing_else(previous):
    with RunSet(previous, MEMBERS) as run:
        write_set(run.stage, "new", peft=False)  # this run adapts no weight PEFT can hold: no peft/
        assert run.commit() == sorted(MEMBERS)  # what it replaced, for the run to say so
    assert contents(previous) == {"adapter.npz": "adapter new", "results.json": '{"tag": "new"}',
                                  "cache/base-x.npz": "cached base", "notes.txt": "mine"}  # fmt: skip
    assert not (previous / "peft").exists() and not (previous / STAGING).exists()
    assert not (previous / ".lock").exists()  # released and removed


def test_a_folder_member_is_replaced_not_merged(previous):
    with RunSet(previous, MEMBERS) as run:
        (run.stage / "peft").mkdir()
        (run.stage / "peft" / "adapter_model.safetensors").write_text("new weights")
        run.commit()
    assert sorted(p.name for p in (previous / "peft").iterdir()) == ["adapter_model.safetensors"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_a_run_stopped_before_its_commit_leaves_the_previous_set(previous, interrupt):
    before = contents(previous)
    with pytest.raises(interrupt), RunSet(previous, MEMBERS) as run:
        (run.stage / "adapter.npz").write_text("adapter new")  # half of the new set is written...
        raise interrupt("stop")  # ...and Ctrl-C comes
    assert contents(previous) == before and not (previous / STAGING).exists()


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(previous):
    with RunSet(previous, MEMBERS):
        with pytest.raises(OutputBusy, match=rf"is in use by another run \(process {os.getpid()}\)"):
            RunSet(previous, MEMBERS).__enter__()
    with RunSet(previous, MEMBERS) as run:  # free again once the first is done
        run.commit()
    fresh = previous.parent / "fresh"
    with RunSet(fresh, MEMBERS) as run:
        assert run.commit() == []  # a first run replaces nothing


def test_a_killed_runs_staging_is_removed_at_once(previous):
    """No live process holds the lock: whatever .staging holds is a dead run's partial set."""
    (previous / STAGING).mkdir()
    (previous / STAGING / "adapter.npz").write_text("half of a killed run")
    (previous / ".lock").write_text("12345\n")  # the lock file it left: nobody holds its flock
    before = contents(previous)
    with RunSet(previous, MEMBERS) as run:
        assert list(run.stage.iterdir()) == []
    assert contents(previous) == {k: v for k, v in before.items() if not k.startswith((STAGING, ".lock"))}


def test_a_run_killed_while_committing_is_finished_by_the_next(previous):
    """COMMIT was written, then the writer died after one rename: the next run completes the set."""
    stage = previous / STAGING
    stage.mkdir()
    (stage / "results.json").write_text('{"tag": "new"}')
    (previous / "adapter.npz").write_text("adapter new")  # already moved in when it was killed
    (stage / COMMIT).write_text(json.dumps({"members": sorted(MEMBERS), "new": ["adapter.npz", "results.json"]}))
    with RunSet(previous, MEMBERS):
        pass
    assert contents(previous) == {"adapter.npz": "adapter new", "results.json": '{"tag": "new"}',
                                  "cache/base-x.npz": "cached base", "notes.txt": "mine"}  # fmt: skip


@pytest.mark.parametrize("name, kind", [("results.json", "folder"), ("adapter.npz", "folder"), ("peft", "file")])
def test_a_member_name_taken_by_the_wrong_kind_is_refused_up_front(tmp_path, name, kind):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if kind == "folder" else (out / name).write_text("in the way")
    with pytest.raises(OutputRefused, match=f"{name}' is a {kind}, where the run writes"):
        RunSet(out, MEMBERS)


def test_an_output_that_cannot_be_created_is_refused():
    with pytest.raises(OutputRefused, match="'/proc/lora': the folder cannot be created"):
        RunSet("/proc/lora", MEMBERS)


def test_a_results_file_is_locked_too(tmp_path):
    with LockedFile(tmp_path / "r.json"):
        with pytest.raises(OutputBusy, match="r.json' is in use by another run"):
            LockedFile(tmp_path / "r.json")
    with LockedFile(tmp_path / "r.json"):
        pass
    assert list(tmp_path.iterdir()) == []  # no lock file left behind


def test_the_studies_refuse_a_results_file_another_run_holds(tmp_path, capsys):
    from lora_np.studies.cli import results_command

    calls = []
    kw = dict(default_out=tmp_path / "r.json", default_cache=str(tmp_path / "cache"), check=None,
              run=lambda cache, out: calls.append(out), d_model=64)  # fmt: skip
    with LockedFile(tmp_path / "r.json"), pytest.raises(SystemExit) as e:
        results_command([], "prog", "d", **kw)
    assert e.value.code == 2 and calls == []
    assert "r.json' is in use by another run" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# the demo


def tiny_cfg():
    return DemoConfig(steps=2, pretrain_steps=2)


def test_the_demo_interrupted_while_writing_leaves_the_previous_run(tmp_path, monkeypatch):
    """Ctrl-C right after adapter.npz was written: the previous run's four files, all of them."""
    out = tmp_path / "run"
    demo.run(tiny_cfg(), out, log=lambda *a: None)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = demo.save_params

    def interrupted(path, params):
        if path.name == "base.npz":  # after full_finetuned.npz and adapter.npz
            raise KeyboardInterrupt
        return real(path, params)

    monkeypatch.setattr(demo, "save_params", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run(DemoConfig(steps=2, pretrain_steps=2, seed=1), out, log=lambda *a: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 0


def test_a_second_demo_on_the_same_out_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # a live run's lock: this process holds it
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        p = run_cli([*TINY, "--out", str(out)], tmp_path)
    finally:
        os.close(fd)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"python -m lora_np: error: --out '{out}' is in use by another run (process 4242); wait for it to finish, "
        "or choose another output"
    ]
    assert sorted(q.name for q in out.iterdir()) == [".lock"]  # nothing pretrained, nothing written


def test_ctrl_c_is_one_line_exit_130_and_the_previous_run_stays(tmp_path):
    out = tmp_path / "run"
    assert run_cli([*TINY, "--out", str(out)], tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # each line as it is printed
    p = subprocess.Popen([sys.executable, "-m", "lora_np", "--pretrain-steps", "2", "--steps", "100000", "--seed", "0",
                          "--threads", "1", "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in p.stdout:  # fine-tuning has started: the set is staged, not yet committed
        if "reusing the pretrained base" in line:
            break
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "python -m lora_np: interrupted (Ctrl-C); earlier results were left as they were"
    )
    assert {q.name: q.read_bytes() for q in out.iterdir() if q.is_file()} == before
    assert not (out / STAGING).exists() and not (out / ".lock").exists()


def test_the_demo_refuses_a_folder_where_its_cache_file_goes_before_pretraining(tmp_path):
    out = tmp_path / "run"
    taken = cache_path(tiny_cfg(), out / "cache")
    taken.mkdir(parents=True)
    p = run_cli([*TINY, "--out", str(out)], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "pretrain" not in p.stdout + p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"python -m lora_np: error: --out's cache file '{taken}' is a folder; it must be a file path"
    ]


# ----------------------------------------------------------------------------
# the studies: a file that cannot be kept or checked is refused at once


@pytest.mark.parametrize("text, words", [("{}", "holds no latency measurement for --only quality to keep"),
                                         ("[1, 2]", "holds a JSON list, not a results object"),
                                         ("not json", "is not valid JSON")])  # fmt: skip
def test_adapters_only_refuses_a_file_it_cannot_keep_before_any_work(tmp_path, text, words):
    (tmp_path / "e.json").write_text(text)
    p = run_cli(["adapters", "--only", "quality", "--out", "e.json", "--threads", "1"], tmp_path, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "without --only" in lines[0], lines
    assert (tmp_path / "e.json").read_text() == text and p.stdout == ""


@pytest.mark.parametrize("command", ["experiments", "successors", "fullrank", "adapters", "serving"])
@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_check_refuses_a_fifo_or_a_folder_without_hanging(tmp_path, command, kind):
    target = tmp_path / "r.json"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    p = run_cli([command, "--check", "--out", str(target)], tmp_path, timeout=30)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    words = "is not a regular file" if kind == "fifo" else "is a folder, not a results file"
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and words in p.stderr


@pytest.mark.parametrize("text", ['{"sizes": [1], "meta": {"quick": false}}', '{"sizes": [{}], "meta": []}', "[]",
                                  '{"sizes": [{"rows": 3, "lora": 1}], "meta": {"quick": false}}'])
def test_serving_check_refuses_a_malformed_file_in_one_line(tmp_path, text):
    (tmp_path / "s.json").write_text(text)
    p = run_cli(["serving", "--check", "--out", "s.json"], tmp_path, timeout=30)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "python -m lora_np serving" in p.stderr


def test_the_memory_guard_names_its_figures():
    from lora_np.studies.gpt2_finetune import check_memory

    cfg = tiny_cfg().model
    check_memory(cfg, 1000, 4, 16, np.float32, available=2**30)  # fits
    with pytest.raises(ValueError, match=r"--batch-size 100000 with --block-size 48: a training step needs about "
                                         r"[\d,.]+ GiB .* more than the 1.0 GiB of memory available"):  # fmt: skip
        check_memory(cfg, 1000, 100_000, 48, np.float32, available=2**30)


@pytest.mark.parametrize("command", ["adapters", "serving"])
def test_adapters_and_serving_refuse_a_results_file_another_run_holds(tmp_path, capsys, command):
    from lora_np.studies.adapter_baselines import main as adapters_main
    from lora_np.studies.serving_study import main as serving_main

    main = {"adapters": adapters_main, "serving": serving_main}[command]
    out = tmp_path / "r.json"
    with LockedFile(out), pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--threads", "1"], f"prog {command}")
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and "r.json' is in use by another run" in err


def test_without_flock_the_package_still_saves_and_commits(tmp_path):
    """Windows has no fcntl: there lora_np must still import, save atomically and commit a run's set,
    unlocked (the README says so). Simulated here by hiding the module from a fresh process."""
    code = f"""
import sys
sys.modules["fcntl"] = None  # import fcntl now raises ImportError, as on Windows
import numpy as np
from lora_np import ModelConfig, init_params
from lora_np.training.checkpoint import load_params, save_params
from lora_np.training.runset import RunSet
cfg = ModelConfig(vocab_size=8, context_length=4, d_model=8, n_heads=2, n_layers=1, d_mlp=16)
out = {str(tmp_path / "run")!r}
with RunSet(out, {{"base.npz": "file"}}) as run:
    save_params(run.stage / "base.npz", init_params(cfg, 0))
    run.commit()
back = load_params(out + "/base.npz")
assert np.array_equal(back["W_e"], init_params(cfg, 0)["W_e"])
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
