"""`python -m lora_np figures` writes every figure, as PNG, and the layer diagrams, deterministically."""

from pathlib import Path

import pytest

from lora_np.__main__ import main as cli_main
from lora_np.figures import FIGURES, make_all
from lora_np.figures.diagrams import DIAGRAMS, FORMATS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"  # the committed results files


def test_figures_command_writes_every_expected_file(tmp_path, monkeypatch):
    """The command as a user runs it, with one substitution: the fine-tuning curves come from a
    small demo configuration, not the demo's 1,400 training steps (the draw function and its file
    are the same; notebook 04 runs it at full size)."""
    from lora_np.figures.training import draw_finetune_curves
    from lora_np.studies.recipe import DemoConfig

    small = DemoConfig(steps=10, pretrain_steps=20, n_lines=(400, 200))
    monkeypatch.setitem(FIGURES, "finetune_curves.png", lambda: draw_finetune_curves(small, tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "figs"
    assert cli_main(["figures", "--out", str(out), "--results", str(NOTEBOOKS)]) is None  # the figures command returns nothing on success
    written = sorted(p.name for p in out.iterdir())
    diagrams = [f"{d}.{fmt}" for d in DIAGRAMS for fmt in FORMATS]  # lora_layer.png, lora_layer.svg, ...
    assert written == sorted([*FIGURES, *diagrams])  # every registered figure and diagram, no stray temporary file
    for name in written:
        data = (out / name).read_bytes()
        if name.endswith(".svg"):
            assert b"<svg" in data[:1000] and len(data) > 10_000, name
        else:
            assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_a_figure_is_byte_identical_when_redrawn(tmp_path):
    make_all(tmp_path / "a", ["params_vs_rank.png"])
    make_all(tmp_path / "b", ["params_vs_rank.png"])
    assert (tmp_path / "a" / "params_vs_rank.png").read_bytes() == (tmp_path / "b" / "params_vs_rank.png").read_bytes()


def test_unknown_figure_name_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"unknown figure names \['nope\.png'\]; known figures are"):
        make_all(tmp_path / "c", ["nope.png"])
    assert not (tmp_path / "c").exists()


def test_zero_init_figure_refuses_a_base_of_another_config():
    from lora_np import ModelConfig, init_params
    from lora_np.figures.training import draw_zero_init_grad_norms

    other = init_params(ModelConfig(vocab_size=30, context_length=8, d_model=16, n_heads=2, n_layers=1, d_mlp=32), 0)
    with pytest.raises(ValueError, match=r"base must be a model of this recipe's config .*, got ModelConfig"):
        draw_zero_init_grad_norms(other)
