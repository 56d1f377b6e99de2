"""GPT-2 in the published layout: loading, saving, PEFT's adapter format, the fine-tuning command.

Nothing is downloaded: each test writes its own small checkpoint in GPT-2's layout (Conv1D
weights stored (in, out), q, k, v fused in c_attn, the "transformer." prefix or not, the stored
causal-mask buffers) and its own small vocab.json / merges.txt. The loaded model is checked
against a forward pass written here from GPT-2's own description, in the Conv1D orientation,
sharing no code with lora_np's model.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from lora_np.checkpoint import CheckpointError
from lora_np.counting import gpt_params
from lora_np.gpt2 import load_gpt2, save_gpt2, untie
from lora_np.peft import KEY, export_peft, import_peft
from lora_np.safetensors import read_safetensors, write_safetensors

from lora_np import LoraConfig, init_lora, model_forward

D, H, L, V, NPOS = 8, 2, 2, 300, 16  # V > 256: every byte token plus a few merges
M = 4 * D


def published(rng, tied=True, dtype=np.float64):
    """Random weights in GPT-2's published layout and orientation (Conv1D: (in, out))."""
    w = {"wte.weight": rng.normal(size=(V, D)), "wpe.weight": rng.normal(size=(NPOS, D))}
    for l in range(L):
        h = f"h.{l}."
        w.update({
            h + "ln_1.weight": 1 + 0.1 * rng.normal(size=D), h + "ln_1.bias": 0.1 * rng.normal(size=D),
            h + "attn.c_attn.weight": 0.3 * rng.normal(size=(D, 3 * D)),
            h + "attn.c_attn.bias": 0.1 * rng.normal(size=3 * D),
            h + "attn.c_proj.weight": 0.3 * rng.normal(size=(D, D)), h + "attn.c_proj.bias": 0.1 * rng.normal(size=D),
            h + "ln_2.weight": 1 + 0.1 * rng.normal(size=D), h + "ln_2.bias": 0.1 * rng.normal(size=D),
            h + "mlp.c_fc.weight": 0.3 * rng.normal(size=(D, M)), h + "mlp.c_fc.bias": 0.1 * rng.normal(size=M),
            h + "mlp.c_proj.weight": 0.3 * rng.normal(size=(M, D)), h + "mlp.c_proj.bias": 0.1 * rng.normal(size=D),
        })  # fmt: skip
    w.update({"ln_f.weight": 1 + 0.1 * rng.normal(size=D), "ln_f.bias": 0.1 * rng.normal(size=D)})
    if not tied:
        w["lm_head.weight"] = rng.normal(size=(V, D))
    return {k: v.astype(dtype) for k, v in w.items()}


def gpt2_logits(w, ids, tied=True):
    """GPT-2's forward pass from the published arrays, as Radford et al. describe it (pre-LN,
    tanh GELU, eps 1e-5), in the Conv1D orientation x @ weight + bias. Independent of lora_np."""

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w[p + ".weight"] + w[p + ".bias"]

    def conv1d(x, p):
        return x @ w[p + ".weight"] + w[p + ".bias"]

    Bsz, T = ids.shape
    x = w["wte.weight"][ids] + w["wpe.weight"][:T]
    for l in range(L):
        h = f"h.{l}."
        q, k, v = np.split(conv1d(ln(x, h + "ln_1"), h + "attn.c_attn"), 3, axis=-1)
        q, k, v = (t.reshape(Bsz, T, H, D // H).transpose(0, 2, 1, 3) for t in (q, k, v))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // H) + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        y = (p / p.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(Bsz, T, D)
        x = x + conv1d(y, h + "attn.c_proj")
        u = conv1d(ln(x, h + "ln_2"), h + "mlp.c_fc")
        x = x + conv1d(0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3))), h + "mlp.c_proj")
    return ln(x, "ln_f") @ (w["wte.weight"] if tied else w["lm_head.weight"]).T


def config_json(**changes):
    cfg = {"model_type": "gpt2", "activation_function": "gelu_new", "n_layer": L, "n_embd": D, "n_head": H,
           "n_positions": NPOS, "n_ctx": NPOS, "vocab_size": V, "n_inner": None, "layer_norm_epsilon": 1e-5,
           "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
           "tie_word_embeddings": True}  # fmt: skip
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not DROP}


DROP = object()


def bytes_to_unicode():
    """GPT-2's map from bytes to printable characters (Radford et al.'s encoder.py), written out."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def write_tokenizer(path):
    """256 byte tokens, a few merges, and <|endoftext|>: V - 256 - 1 merges would fill V; fewer is fine."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def checkpoint(path, w, cfg=None, prefix="transformer.", buffers=True, dtype=None):
    path.mkdir(parents=True, exist_ok=True)
    arrays = {prefix + k: v for k, v in w.items()}
    if buffers:  # what GPT-2's code stored beside the weights: the causal mask, and -1e4
        for l in range(L):
            arrays[f"{prefix}h.{l}.attn.bias"] = np.tril(np.ones((1, 1, NPOS, NPOS), dtype=np.float32))
            arrays[f"{prefix}h.{l}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    write_safetensors(path / "model.safetensors", arrays, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg or config_json()), encoding="utf-8")
    write_tokenizer(path)
    return path


IDS = np.random.default_rng(9).integers(0, V, size=(2, 7))


@pytest.mark.parametrize("prefix, buffers", [("transformer.", True), ("", False), ("", True)])
def test_every_weight_lands_where_the_math_says(tmp_path, prefix, buffers):
    w = published(np.random.default_rng(0))
    params, tok = load_gpt2(checkpoint(tmp_path / "m", w, prefix=prefix, buffers=buffers))
    assert params["W_e"].dtype == np.float64 and tok.vocab_size == 256 + 7 + 1
    logits, _ = model_forward(params, IDS)
    np.testing.assert_allclose(logits, gpt2_logits(w, IDS), rtol=1e-10, atol=1e-10)


def test_a_float32_checkpoint_is_mapped_not_copied(tmp_path):
    w = published(np.random.default_rng(1), dtype=np.float32)
    params, _ = load_gpt2(checkpoint(tmp_path / "m", w))
    for name in ("W_e", "blocks.0.W_q", "blocks.1.W_2", "blocks.0.b_v"):
        a = params[name]
        assert a.dtype == np.float32 and not a.flags.writeable and not a.flags.owndata, name
    assert params["W_u"] is params["W_e"]  # the tie, kept: one array
    np.testing.assert_allclose(model_forward(params, IDS)[0], gpt2_logits(w, IDS), rtol=2e-4, atol=2e-4)


def test_an_untied_head_reads_lm_head(tmp_path):
    w = published(np.random.default_rng(2), tied=False)
    params, _ = load_gpt2(checkpoint(tmp_path / "m", w, config_json(tie_word_embeddings=False)))
    np.testing.assert_allclose(model_forward(params, IDS)[0], gpt2_logits(w, IDS, tied=False), rtol=1e-10, atol=1e-10)


def test_save_then_load_round_trips(tmp_path):
    w = published(np.random.default_rng(3))
    params, tok = load_gpt2(checkpoint(tmp_path / "a", w))
    save_gpt2(params, tmp_path / "b", tok)
    again, tok_again = load_gpt2(tmp_path / "b")
    text = "the tea in the pot, then a rather long one: Ünïcödé ✓"
    assert tok_again.encode(text) == tok.encode(text) and tok_again.decode(tok.encode(text)) == text
    assert again["W_u"] is again["W_e"]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["tie_word_embeddings"]
    for name in params:
        np.testing.assert_array_equal(again[name], params[name])
    stored, _ = read_safetensors(tmp_path / "b" / "model.safetensors")
    for name, a in w.items():  # the published names and orientation, exactly
        np.testing.assert_array_equal(stored[name], a)
    # full fine-tuning unties: W_u becomes its own matrix and is saved as lm_head.weight
    trained = untie(params)
    trained["W_u"] += 1.0
    save_gpt2(trained, tmp_path / "c")
    write_tokenizer(tmp_path / "c")
    loaded, _ = load_gpt2(tmp_path / "c")
    np.testing.assert_array_equal(loaded["W_u"], trained["W_u"])
    np.testing.assert_array_equal(params["W_u"], w["wte.weight"])  # untie copied: the original is untouched


def test_a_head_equal_to_wte_is_saved_tied_though_it_is_another_array(tmp_path):
    """Tied means equal values, not the same object: untie(params), saved before any training,
    is GPT-2's own tied layout again (no lm_head.weight); one changed number unties it."""
    params, _ = load_gpt2(checkpoint(tmp_path / "a", published(np.random.default_rng(3))))
    copy = untie(params)
    assert copy["W_u"] is not copy["W_e"] and np.array_equal(copy["W_u"], copy["W_e"])
    for changed in (False, True):
        if changed:
            copy["W_u"][0, 0] += 1.0
        out = tmp_path / f"changed={changed}"
        save_gpt2(copy, out)
        stored, _ = read_safetensors(out / "model.safetensors")
        assert ("lm_head.weight" in stored) is changed
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is not changed


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"activation_function": "gelu"}, "activation_function"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"model_type": "llama"}, "model_type"),
        ({"n_head": 3}, "divisible"),
        ({"n_layer": DROP}, "n_layer"),
        ({"tie_word_embeddings": False}, "lm_head.weight"),
        ({"n_layer": True}, "n_layer = True: must be an integer >= 1"),  # JSON's true is no layer count
        ({"n_inner": True}, "n_inner"),
    ],
)
def test_another_architecture_is_refused_naming_the_field(tmp_path, changes, field):
    path = checkpoint(tmp_path / "m", published(np.random.default_rng(4)), config_json(**changes))
    with pytest.raises(CheckpointError, match=field):
        load_gpt2(path)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_weight_that_is_not_finite_is_refused_naming_the_file_and_tensor(tmp_path, value):
    w = published(np.random.default_rng(5), dtype=np.float32)
    w["h.1.mlp.c_fc.weight"][2, 5] = value
    with pytest.raises(CheckpointError, match=r"model.safetensors: h\.1\.mlp\.c_fc\.weight holds 1 NaN or infinite "
                                              r"values \(the first at flat index 69: -?(nan|inf)\)"):  # fmt: skip
        load_gpt2(checkpoint(tmp_path / "m", w))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    w = published(np.random.default_rng(5))
    w["h.1.mlp.c_fc.weight"] = w["h.1.mlp.c_fc.weight"][:, :-1]
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(8, 31\)"):
        load_gpt2(checkpoint(tmp_path / "m", w))
    w = published(np.random.default_rng(5))
    del w["h.0.ln_2.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['h\.0\.ln_2\.bias'\]"):
        load_gpt2(checkpoint(tmp_path / "n", w))


def test_gpt2_124m_count():
    # 124,439,808: the number of GPT-2 small's tensors summed, as published (the head tied)
    assert gpt_params(12, 768, 3072, 50257, 1024, tied_head=True) == 124_439_808


# ----------------------------------------------------------------------------
# PEFT


def trained(cfg, lora, seed):
    adapters = init_lora(cfg, lora, seed)
    rng = np.random.default_rng(seed)
    return {k: v + 0.2 * rng.normal(size=v.shape) for k, v in adapters.items()}


@pytest.mark.parametrize("targets", [("W_q", "W_v"), ("W_v", "W_q", "W_k"), ("W_k",)])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_has_peft_keys_shapes_and_config(tmp_path, targets, rslora):
    params, _ = load_gpt2(checkpoint(tmp_path / "m", published(np.random.default_rng(6))))
    lora = LoraConfig(r=2, alpha=3.0, targets=targets, rslora=rslora)
    adapters = trained(params.config, lora, 1)
    export_peft(adapters, lora, params.config, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    r_peft = 2 * len(targets)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["target_modules"] == ["c_attn"]
    assert cfg["fan_in_fan_out"] is True and cfg["r"] == r_peft and cfg["use_rslora"] is rslora
    # PEFT's scaling, lora_alpha / r' (or / √r'), is lora_np's s
    assert np.isclose(cfg["lora_alpha"] / (np.sqrt(r_peft) if rslora else r_peft), lora.scaling)
    arrays, _ = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: a.shape for k, a in arrays.items()} == {
        f"base_model.model.transformer.h.{l}.attn.c_attn.lora_{f}.weight": s
        for l in range(L) for f, s in (("A", (r_peft, D)), ("B", (3 * D, r_peft)))
    }  # fmt: skip
    # the block structure: B'·A' is ΔW_q, ΔW_k, ΔW_v stacked, zero for what is not adapted
    for l in range(L):
        delta = arrays[KEY.format(l=l, f="B")] @ arrays[KEY.format(l=l, f="A")]  # (3D, D)
        for i, t in enumerate(("W_q", "W_k", "W_v")):
            want = adapters[f"blocks.{l}.{t}.B"] @ adapters[f"blocks.{l}.{t}.A"] if t in targets else 0
            np.testing.assert_allclose(delta[i * D : (i + 1) * D], want, atol=1e-12)


def test_peft_import_applies_what_peft_would(tmp_path):
    """A PEFT c_attn adapter made by hand, applied to the published weights the way PEFT does
    (Conv1D weight + ((α'/r')·B'·A')ᵀ), against lora_np's model with the imported adapters."""
    rng = np.random.default_rng(7)
    w = published(rng)
    params, _ = load_gpt2(checkpoint(tmp_path / "m", w))
    r, alpha = 3, 5.0
    peft = {}
    merged = dict(w)
    for l in range(L):
        A, B = rng.normal(size=(r, D)), rng.normal(size=(3 * D, r))
        peft[KEY.format(l=l, f="A")], peft[KEY.format(l=l, f="B")] = A, B
        merged[f"h.{l}.attn.c_attn.weight"] = w[f"h.{l}.attn.c_attn.weight"] + (alpha / r * B @ A).T  # fan_in_fan_out
    (tmp_path / "peft").mkdir()
    write_safetensors(tmp_path / "peft" / "adapter_model.safetensors", peft)
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["c_attn"], "fan_in_fan_out": True}))
    adapters, lora = import_peft(tmp_path / "peft", params.config)
    assert lora.targets == ("W_q", "W_k", "W_v") and lora.r == r and lora.scaling == alpha / r
    np.testing.assert_allclose(model_forward(params, IDS, adapters, lora)[0], gpt2_logits(merged, IDS), rtol=1e-10,
                               atol=1e-10)  # fmt: skip


def test_peft_export_then_import_keeps_the_adapted_logits(tmp_path):
    params, _ = load_gpt2(checkpoint(tmp_path / "m", published(np.random.default_rng(8))))
    lora = LoraConfig(r=2, alpha=4.0, targets=("W_q", "W_v"), rslora=True)
    adapters = trained(params.config, lora, 2)
    export_peft(adapters, lora, params.config, tmp_path / "peft")
    back, lora_back = import_peft(tmp_path / "peft", params.config)
    np.testing.assert_allclose(model_forward(params, IDS, back, lora_back)[0],
                               model_forward(params, IDS, adapters, lora)[0], rtol=1e-12, atol=1e-12)  # fmt: skip


def test_peft_import_keeps_only_adapted_blocks_and_a_round_trip_keeps_the_rank(tmp_path):
    params, _ = load_gpt2(checkpoint(tmp_path / "m", published(np.random.default_rng(8))))
    lora = LoraConfig(r=2, alpha=4.0, targets=("W_q", "W_v"))
    adapters = trained(params.config, lora, 3)
    export_peft(adapters, lora, params.config, tmp_path / "p1")
    back, lora_back = import_peft(tmp_path / "p1", params.config)
    assert lora_back.targets == ("W_q", "W_v") and lora_back.r == 4  # B_k was zero: W_k is left alone
    export_peft(back, lora_back, params.config, tmp_path / "p2")  # the A's are shared: rank 4 again, not 8
    assert json.loads((tmp_path / "p2" / "adapter_config.json").read_text())["r"] == 4
    again, lora_again = import_peft(tmp_path / "p2", params.config)
    np.testing.assert_allclose(model_forward(params, IDS, again, lora_again)[0],
                               model_forward(params, IDS, adapters, lora)[0], rtol=1e-12, atol=1e-12)  # fmt: skip
    # PEFT turns fan_in_fan_out on for a Conv1D whatever the file says; so does the import
    cfg = json.loads((tmp_path / "p2" / "adapter_config.json").read_text())
    (tmp_path / "p2" / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": False}))
    assert import_peft(tmp_path / "p2", params.config)[1] == lora_again


def test_peft_export_refuses_what_c_attn_cannot_hold(tmp_path):
    params, _ = load_gpt2(checkpoint(tmp_path / "m", published(np.random.default_rng(8))))
    lora = LoraConfig(r=2, targets=("W_q", "W_o"))
    with pytest.raises(ValueError, match=r"must be among \('W_q', 'W_k', 'W_v'\)"):
        export_peft(init_lora(params.config, lora, 0), lora, params.config, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# ----------------------------------------------------------------------------
# the command


def test_the_gpt2_command_fine_tunes_and_writes_its_results(tmp_path):
    w = published(np.random.default_rng(10), dtype=np.float32)
    weights = checkpoint(tmp_path / "gpt2", w)
    data = tmp_path / "data.txt"
    data.write_text("the tea is in the pot. " * 200, encoding="utf-8")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lora_np", "gpt2", "--weights", str(weights), "--data", str(data),
                        "--steps", "5", "--block-size", "8", "--batch-size", "2", "--new-tokens", "4",
                        "--out", str(out), "--lr", "0.01"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["trainable"] == L * 2 * 8 * (D + D) and res["val_loss_after"] < res["val_loss_before"]
    assert (out / "adapter.npz").is_file() and (out / "peft" / "adapter_config.json").is_file()
    assert "validation loss" in r.stdout and "sample after" in r.stdout


def gpt2_cli(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "lora_np", "gpt2", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)  # fmt: skip


@pytest.fixture
def small_run(tmp_path):
    """A small GPT-2 folder, a text to fine-tune on, and the arguments of a run of a few steps."""
    weights = checkpoint(tmp_path / "gpt2", published(np.random.default_rng(10), dtype=np.float32))
    (tmp_path / "data.txt").write_text("the tea is in the pot. " * 200, encoding="utf-8")
    args = ["--weights", str(weights), "--data", str(tmp_path / "data.txt"), "--steps", "2", "--block-size", "8",
            "--batch-size", "2", "--new-tokens", "4", "--threads", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    return tmp_path, args


def one_line(r):
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_rerun_replaces_the_whole_set_its_stale_peft_folder_too(small_run):
    """Issue 21, item 1: a run adapting W_1 (which PEFT's c_attn cannot hold) after one adapting W_q, W_v."""
    tmp_path, args = small_run
    assert gpt2_cli(args, tmp_path).returncode == 0
    assert (tmp_path / "run" / "peft" / "adapter_config.json").is_file()
    r = gpt2_cli([*args, "--targets", "W_1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "results.json, replacing the previous run" in r.stdout  # said, not silent
    assert json.loads((tmp_path / "run" / "results.json").read_text())["peft"] is None
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter.npz", "results.json"]


@pytest.mark.parametrize("name, kind", [("results.json", "folder"), ("adapter.npz", "folder"), ("peft", "file")])
def test_an_output_name_taken_by_the_wrong_kind_is_refused_before_training(small_run, name, kind):
    tmp_path, args = small_run
    taken = tmp_path / "run" / name
    taken.mkdir(parents=True) if kind == "folder" else (taken.parent.mkdir(), taken.write_text("in the way"))
    r = gpt2_cli(args, tmp_path)
    assert r.returncode == 2 and f"'{taken}' is a {kind}, where the run writes its {name}" in one_line(r)
    assert "validation loss" not in r.stdout  # refused before the model was even loaded
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [name]


def test_the_data_is_read_before_the_model(small_run):
    """A non-UTF-8 --data beside a truncated model.safetensors: the data's error, found first."""
    tmp_path, args = small_run
    (tmp_path / "data.txt").write_bytes(b"the tea\nis caf\x9d. " * 50)
    with open(tmp_path / "gpt2" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    r = gpt2_cli(args, tmp_path)
    assert r.returncode == 2
    assert one_line(r) == (f"python -m lora_np gpt2: error: --data '{tmp_path / 'data.txt'}', line 2: not UTF-8 text "
                           f"(invalid start byte at byte 14)")  # fmt: skip


def test_a_prompt_that_is_not_utf8_is_named(small_run):
    tmp_path, args = small_run
    r = gpt2_cli([*args, "--prompt", "caf\udc9d"], tmp_path)  # the byte 0x9d on the command line
    assert r.returncode == 2
    assert one_line(r) == "python -m lora_np gpt2: error: --prompt is not UTF-8 text (a byte b'\\x9d' at position 3)"


@pytest.mark.parametrize("name", ["config.json", "vocab.json", "merges.txt", "model.safetensors", "--data", "folder"])
def test_an_unreadable_file_or_folder_is_one_line_naming_it(small_run, monkeypatch, capsys, name):
    """Issue 21, item 7. Permission bits cannot refuse root, so the refusal is simulated where every read
    starts (open, and os.stat for a folder that cannot be entered) with the error the kernel gives."""
    import builtins
    import io

    from lora_np.studies.gpt2_finetune import main

    tmp_path, args = small_run
    denied = {"--data": tmp_path / "data.txt", "folder": tmp_path / "gpt2"}.get(name, tmp_path / "gpt2" / name)
    real_open, real_stat = builtins.open, os.stat

    def refuse(path):
        p = os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
        # a folder without its x bit can itself be looked at, not its entries
        if (name != "folder" and p == str(denied)) or (name == "folder" and p and os.path.dirname(p) == str(denied)):
            raise PermissionError(13, "Permission denied", os.fspath(path))

    def open_(file, *a, **k):
        refuse(file)
        return real_open(file, *a, **k)

    def stat_(path, *a, **k):
        if name == "folder":
            refuse(path)
        return real_stat(path, *a, **k)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "stat", stat_)
    try:
        status = main(args)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    words = {"--data": f"--data '{denied}' cannot be read (Permission denied)",
             "folder": f"{denied}: the folder cannot be entered (Permission denied)"}  # fmt: skip
    assert words.get(name, f"{denied}: cannot be read (Permission denied)") in err, err
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_batch_that_cannot_fit_is_refused_naming_the_figures(small_run, monkeypatch, capsys):
    import lora_np.studies.gpt2_finetune as command

    tmp_path, args = small_run
    monkeypatch.setattr(command, "available_bytes", lambda: 2**20)  # a machine with 1 MiB to spare
    assert command.main([*args, "--batch-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 64 with --block-size 8: a training step needs about 0.0 GiB" in err
    assert "more than the 0.0 GiB of memory available; lower --batch-size" in err
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "nowhere", "--data", "DATA"], "--weights 'nowhere' is not a folder"),
        (["--weights", "W", "--data", "nothing.txt"], "is not a non-empty file"),
        (["--weights", "W", "--data", "DATA", "--rank", "0"], "--rank must be an int >= 1"),
        (["--weights", "W", "--data", "DATA", "--targets", "W_x"], "unknown LoRA target"),
        (["--weights", "W", "--data", "DATA", "--out", "DATA"], "is a file; it must be a folder"),
    ],
)
def test_the_gpt2_command_refuses_bad_arguments_before_any_work(tmp_path, args, message):
    data = tmp_path / "data.txt"
    data.write_text("hello there", encoding="utf-8")
    (tmp_path / "W").mkdir()
    args = [str(data) if a == "DATA" else str(tmp_path / "W") if a == "W" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "lora_np", "gpt2", *args], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_gpt2_help_and_the_quick_bench(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lora_np", "gpt2", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--weights" in r.stdout and "--data" in r.stdout
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "lora_np", "gpt2", "bench", "--quick", "--reps", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["quick"] and res["load"]["checksum"] != 0 and res["lora"]["optimizer_state_bytes"] > 0
    # the LoRA step's flops, from the shapes: fewer than full fine-tuning's (no dW of a frozen weight)
    assert 0 < res["lora"]["flops"] < res["full"]["flops"]


def test_the_readme_quotes_the_committed_124m_bench():
    """The README's GPT-2 124M table is the committed figures/gpt2_124m.json, as the bench printed it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "figures" / "gpt2_124m.json").read_text())
    readme = (root / "README.md").read_text(encoding="utf-8")
    for v in ("lora", "full"):
        s = r[v]
        cells = [f"{s['median_s']:.2f} s", f"{s['gflops_per_s']:.1f}", f"{s['share_of_matmul']:.0%}",
                 f"{s['peak_bytes'] / 1e9:.2f} GB"]  # fmt: skip
        assert all(c in readme for c in cells), (v, cells)
    load = r["load"]
    assert f"{load['seconds']:.3f} s to map, {load['read_every_weight_seconds']:.2f} s" in readme
    assert f"{load['rss_growth_over_file']:.2f}× the {load['file_bytes'] / 1e6:.0f} MB file" in readme
    assert f"({r['matmul_square_gflops']:.1f} GFLOP/s" in readme
    assert f"takes {r['lora_over_full_step_time']:.2f} of the full step's time" in readme
