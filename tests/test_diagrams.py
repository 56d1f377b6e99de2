"""The LoRA layer diagrams: drawn from their arguments, shapes as the layer computes them, saved deterministically."""

import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from lora_np.layers import lora_linear_backward, lora_linear_forward
from matplotlib.text import Text

import lora_np.figures
from lora_np.__main__ import main
from lora_np.figures.diagrams import DIAGRAMS, draw_lora_backward, draw_lora_layer, save_diagrams

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FOUR = ["lora_layer.png", "lora_layer.svg", "lora_backward.png", "lora_backward.svg"]
DIMS = [(1000, 1000, 4), (64, 256, 8), (4096, 512, 64), (3, 5, 1), (7, 7, 7)]  # (d_in, d_out, r)


def texts(fig):
    """Every string drawn on the figure, legend included."""
    return [t.get_text() for t in fig.findobj(Text)]


@pytest.mark.parametrize("draw", [draw_lora_layer, draw_lora_backward])
def test_both_diagrams_draw_without_pyplot(draw):
    open_before = plt.get_fignums()
    fig, numbers = draw()
    assert isinstance(fig, matplotlib.figure.Figure)
    assert (numbers["d_in"], numbers["d_out"], numbers["r"]) == (1000, 1000, 4)
    assert plt.get_fignums() == open_before  # built on its own Agg canvas: no pyplot figure left open
    fig.canvas.draw()  # lays out every text without error


@pytest.mark.parametrize("d_in,d_out,r", DIMS)
@pytest.mark.parametrize("draw", [draw_lora_layer, draw_lora_backward])
def test_counts_match_independent_arithmetic(draw, d_in, d_out, r):
    _, n = draw(d_in, d_out, r)
    assert n["frozen_params"] == d_in * d_out
    assert n["lora_params"] == r * d_in + r * d_out  # A is r x d_in, B is d_out x r
    assert n["lora_share"] == pytest.approx((r * d_in + r * d_out) / (d_in * d_out))


@pytest.mark.parametrize("d_in,d_out,r", [(5, 3, 2), (8, 16, 4), (6, 6, 6)])
def test_shapes_are_those_the_layer_computes(d_in, d_out, r):
    rng = np.random.default_rng(0)
    x, W, A, B = (rng.normal(size=s) for s in [(d_in,), (d_out, d_in), (r, d_in), (d_out, r)])
    out, cache = lora_linear_forward(x, W, None, A, B, 0.5)  # one position, as the diagrams draw it
    dout = rng.normal(size=out.shape)
    dx, dA, dB = lora_linear_backward(dout, cache)
    xA = cache[4]
    forward = {"x": x.shape, "W": W.shape, "A": A.shape, "xA": (xA.size,), "B": B.shape, "out": out.shape}
    backward = {"dout": dout.shape, "dxA": (xA.size,), "dB": dB.shape, "dA": dA.shape, "dx": dx.shape}
    assert draw_lora_layer(d_in, d_out, r)[1]["shapes"] == forward
    n = draw_lora_backward(d_in, d_out, r)[1]
    assert n["shapes"] == {**forward, **backward}
    assert n["not_formed"] == {"dW": (d_out, d_in), "BA": (d_out, d_in)}


def test_shape_labels_come_from_the_arguments():
    d_in, d_out, r = 64, 256, 8
    forward = "\n".join(texts(draw_lora_layer(d_in, d_out, r)[0]))
    for label in ["(64,)", "(256, 64)", "(8, 64)", "(8,)", "(256, 8)", "(256,)", "α/8", "16,384", "2,560"]:
        assert label in forward, label
    assert "1000" not in forward  # nothing left over from the defaults

    drawn = texts(draw_lora_backward(d_in, d_out, r)[0])
    backward = "\n".join(drawn)
    for label in ["∂L/∂A = (s·Bᵀ·g)·xᵀ\n(8, 64)", "∂L/∂B\n= s·g·(A·x)ᵀ\n(256, 8)", "s·Bᵀ·g  (8,)", "∂L/∂x\n(64,)",
                  "g = ∂L/∂h\n(256,)", "W₀ᵀ·g", "Aᵀ·(s·Bᵀ·g)"]:  # fmt: skip
        assert label in backward, label
    ghosts = [t for t in drawn if t.endswith("not formed") and "(256, 64)" in t]
    assert len(ghosts) == 2 and any("∂L/∂W₀ = g·xᵀ" in t for t in ghosts) and any("B·A" in t for t in ghosts)
    assert "1000" not in backward


def test_save_writes_the_four_files_byte_identical_when_redrawn(tmp_path):
    names = save_diagrams(tmp_path / "a")
    assert names == FOUR
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(FOUR)  # and no temporary file left
    for name in FOUR:
        data = (tmp_path / "a" / name).read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG_MAGIC), name
        else:
            assert ET.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg", name
            assert b"<dc:date>" not in data, name
    # again in this process, into the same folder, and in a fresh process: the same bytes
    assert save_diagrams(tmp_path / "a", ["svg", "png"]) == [FOUR[1], FOUR[0], FOUR[3], FOUR[2]]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(FOUR)
    code = f"from lora_np.figures.diagrams import save_diagrams; save_diagrams({str(tmp_path / 'b')!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    for name in FOUR:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_formats_picks_the_files(tmp_path):
    assert save_diagrams(tmp_path, ("svg",)) == ["lora_layer.svg", "lora_backward.svg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora_backward.svg", "lora_layer.svg"]


@pytest.mark.parametrize(
    "formats", ["png", (), ["png", "pdf"], ("svg", "svg"), None, ("png", 1), [["png"]], {"png": 1}]
)  # fmt: skip
def test_bad_formats_refused_before_writing(tmp_path, formats):
    out = tmp_path / "out"
    pattern = r"formats must be a non-empty tuple or list of distinct values from \('png', 'svg'\), got "
    with pytest.raises(ValueError, match=pattern + re.escape(repr(formats))):
        save_diagrams(out, formats)
    assert not out.exists()


@pytest.mark.parametrize("out_dir", [None, 3, ""])
def test_bad_out_dir_refused(tmp_path, monkeypatch, out_dir):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"out_dir must be a non-empty str or Path naming a folder, got {out_dir!r}"):
        save_diagrams(out_dir)
    assert list(tmp_path.iterdir()) == []


def test_out_dir_that_is_a_file_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(ValueError, match=r"out_dir must be a folder, got '.*notes\.txt', which exists and is not"):
        save_diagrams(f)
    assert f.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("draw", list(DIAGRAMS.values()))
def test_bad_dimensions_named(draw):
    with pytest.raises(ValueError, match=r"r must be between 1 and min\(d_out, d_in\) = 8, got r=9"):
        draw(d_in=8, d_out=16, r=9)
    with pytest.raises(ValueError, match=r"r must be an int >= 1, got 0"):
        draw(r=0)
    with pytest.raises(TypeError, match=r"d_in must be an int, got 2\.5"):
        draw(d_in=2.5)
    with pytest.raises(TypeError, match=r"d_out must be an int, got True"):
        draw(d_out=True)


def test_figures_command_writes_the_diagrams_unless_names_are_given(tmp_path, monkeypatch, capsys):
    def tiny():
        fig, ax = plt.subplots(figsize=(1, 1))
        return fig, {}

    # one fast stand-in figure, so the command runs in seconds; tests/test_figures.py runs the real ones
    monkeypatch.setattr(lora_np.figures, "FIGURES", {"tiny.png": tiny})
    main(["figures", "--out", str(tmp_path / "all")])
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(["tiny.png", *FOUR])
    assert f"wrote {tmp_path / 'all'}/lora_backward.svg" in capsys.readouterr().out
    main(["figures", "--out", str(tmp_path / "some"), "tiny.png"])
    assert [p.name for p in (tmp_path / "some").iterdir()] == ["tiny.png"]
