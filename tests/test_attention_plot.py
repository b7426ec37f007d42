"""Attention pictures: the PNG read back (size, not blank, the colours of its cells) and the numbers drawn
checked against the model's attention weights and against attention computed here from the weights."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import matplotlib.image  # the plot extra, part of the test extra

from picogpt.attention_plot import (  # noqa: E402
    attention_picture, attention_weights, plot_attention, token_label, token_labels)
from picogpt.errors import PicogptError  # noqa: E402
from picogpt.model import GPT2  # noqa: E402
from picogpt.tokenizer import encode  # noqa: E402
from picogpt.trace import collect  # noqa: E402
from tf_fixture import random_weights, to_model_dat_names  # noqa: E402

# GPT-2's vocabulary (prompts are real text), 2 layers of 6 heads, narrow so that it builds in no time.
HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=48, n_head=6, n_layer=2, layer_norm_epsilon=1e-5)
PROMPT = "Hello, world!\nNew line"
LABELS = ["Hello", ",", "\u2423world", "!", "\\n", "New", "\u2423line"]


@pytest.fixture(scope="module")
def model():
    tensors = to_model_dat_names(random_weights(HPARAMS, seed=7))
    for i in range(HPARAMS["n_layer"]):  # sharper attention than random weights give: pictures with contrast
        tensors[f"h{i}/attn/c_attn/w"] = tensors[f"h{i}/attn/c_attn/w"] * np.float32(15)
    return GPT2(HPARAMS, tensors)


def reference_attention_layer0(model, ids):
    """Layer 0's attention weights [n_head, n_seq, n_seq] computed here, from the weights alone."""
    p, n_head = model.params, HPARAMS["n_head"]
    x = (p["wte"][ids] + p["wpe"][:len(ids)]).astype(np.float64)
    ln = p["blocks"][0]["ln_1"]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * ln["g"] + ln["b"]
    qkv = x @ p["blocks"][0]["attn"]["c_attn"]["w"] + p["blocks"][0]["attn"]["c_attn"]["b"]
    q, k, _ = (part.reshape(len(ids), n_head, -1).transpose(1, 0, 2) for part in np.split(qkv, 3, axis=-1))
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    scores[:, np.triu(np.ones((len(ids), len(ids)), bool), 1)] = -np.inf
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def png_pixels(path, figure):
    """The PNG as [height, width, RGBA] floats, checked to have the figure's pixel size and not be blank."""
    pixels = matplotlib.image.imread(path)
    width, height = figure.get_size_inches() * figure.dpi
    assert pixels.shape == (round(height), round(width), 4)
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 300
    assert pixels[..., :3].var() > 0.01  # not blank: a white page has variance 0
    return pixels


def weights_read_from_png(pixels, ax, n_rows, n_cols):
    """Each cell's weight, recovered from its colour in the PNG by inverting the viridis colour map.

    Sampled near a cell's top-left corner, clear of the number printed at its centre."""
    lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    height = pixels.shape[0]
    read = np.empty((n_rows, n_cols))
    for t in range(n_rows):
        for s in range(n_cols):
            x, y = ax.transData.transform((s - 0.3, t - 0.3))
            colour = pixels[int(height - y), int(x), :3]
            read[t, s] = np.argmin(((lut - colour) ** 2).sum(-1)) / 255
    return read


def test_one_head_as_a_png(model, tmp_path):
    out = tmp_path / "attn.png"
    picture = attention_picture(model, PROMPT, layer=1, head=2, out_path=out)
    ids = encode(PROMPT)
    expected = collect(model, ids).attentions[1][2]  # [n_seq, n_seq]

    assert picture.path == out and out.is_file() and [p.name for p in tmp_path.iterdir()] == ["attn.png"]
    assert picture.weights.shape == (7, 7)
    np.testing.assert_allclose(picture.weights, expected, atol=1e-6, rtol=0)
    ax = picture.figure.axes[0]
    (image,) = ax.images
    np.testing.assert_allclose(np.asarray(image.get_array()), expected, atol=1e-6, rtol=0)  # what imshow drew
    assert image.get_clim() == (0, 1)
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS
    assert [t.get_text() for t in ax.get_yticklabels()] == LABELS
    assert ax.get_title() == "layer 1, head 2"

    pixels = png_pixels(out, picture.figure)
    np.testing.assert_allclose(weights_read_from_png(pixels, ax, 7, 7), expected, atol=0.01)
    assert expected.max() - expected[expected > 0].min() > 0.3  # the colours really differ


def test_in_jupyter_a_picture_shows_itself_as_a_png(model, tmp_path):
    """_repr_png_: a notebook cell whose last line is a picture shows it: a PNG of the figure's size, not blank
    (not pixel for pixel the file: each drawing of a constrained layout moves it a little)."""
    from IPython.core.formatters import DisplayFormatter

    weights, labels = attention_weights(model, encode(PROMPT)), LABELS
    for head in (2, None):
        picture = plot_attention(weights, labels, layer=1, head=head, out_path=tmp_path / f"{head}.png")
        shown, _ = DisplayFormatter().format(picture)
        png = shown["image/png"]
        assert png.startswith(b"\x89PNG\r\n\x1a\n")  # (IPython asked _repr_png_: nothing else gives one)
        (tmp_path / "shown.png").write_bytes(png)
        assert png_pixels(tmp_path / "shown.png", picture.figure).shape == \
            png_pixels(tmp_path / f"{head}.png", picture.figure).shape
    assert picture._replace(figure=None)._repr_png_() is None


def test_layer_0_against_attention_computed_from_the_weights(model, tmp_path):
    ids = encode(PROMPT)
    reference = reference_attention_layer0(model, ids)
    np.testing.assert_allclose(attention_weights(model, ids)[0], reference, atol=1e-5)
    picture = plot_attention(attention_weights(model, ids), token_labels(ids), 0, 4, tmp_path / "a.png")
    np.testing.assert_allclose(picture.weights, reference[4], atol=1e-5)


def test_all_heads_of_a_layer_as_a_grid(model, tmp_path):
    out = tmp_path / "heads.png"
    picture = attention_picture(model, PROMPT, layer=0, out_path=out)
    expected = collect(model, encode(PROMPT)).attentions[0]
    np.testing.assert_allclose(picture.weights, expected, atol=1e-6, rtol=0)
    panels = [ax for ax in picture.figure.axes if ax.images and ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(6)]
    pixels = png_pixels(out, picture.figure)
    for h, ax in enumerate(panels):
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected[h], atol=1e-6, rtol=0)
        np.testing.assert_allclose(weights_read_from_png(pixels, ax, 7, 7), expected[h], atol=0.01)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == LABELS  # left column: query labels
    assert [t.get_text() for t in panels[3].get_xticklabels()] == LABELS  # bottom row: key labels
    assert all(t.get_text() == "" for t in panels[1].get_yticklabels())


def test_bad_layer_or_head_is_one_sentence_before_any_work(model, tmp_path):
    out = tmp_path / "attn.png"
    for layer, head, message in [(2, 0, "layer 2 does not exist: this model has layers 0-1"),
                                 (-1, None, "layer -1 does not exist: this model has layers 0-1"),
                                 (0, 6, "head 6 does not exist: this model has heads 0-5 in each layer"),
                                 (1, -1, "head -1 does not exist")]:
        with pytest.raises(PicogptError, match=message):
            attention_picture(model, PROMPT, layer, head, out)
    with pytest.raises(PicogptError, match="layer 3 does not exist"):
        plot_attention(attention_weights(model, [1, 2]), ["a", "b"], 3)
    with pytest.raises(PicogptError, match="more than the model's context of 64"):
        attention_picture(model, "word " * 70, 0, 0, out)
    assert not out.exists()


def test_writing_is_atomic(model, tmp_path, monkeypatch):
    with pytest.raises(PicogptError, match="cannot write .*missing.*: the folder .*missing does not exist"):
        attention_picture(model, PROMPT, 0, 0, tmp_path / "missing" / "attn.png")
    with pytest.raises(PicogptError, match=r"use a name ending in \.png, \.svg, \.pdf"):
        attention_picture(model, PROMPT, 0, 0, tmp_path / "attn.jpeg")

    out = tmp_path / "attn.png"
    out.write_bytes(b"the previous picture")
    from matplotlib.figure import Figure

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(PicogptError, match="cannot write .*attn.png: No space left on device"):
        attention_picture(model, PROMPT, 0, 0, out)
    assert out.read_bytes() == b"the previous picture" and os.listdir(tmp_path) == ["attn.png"]
    monkeypatch.undo()
    attention_picture(model, PROMPT, 0, 0, out)  # replaces it
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["attn.png"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    svg = attention_picture(model, PROMPT, 0, None, tmp_path / "heads.svg").path
    assert svg.read_text().lstrip().startswith("<?xml")


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_without_matplotlib_the_error_names_the_extra(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure now fails
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(PicogptError, match=r"^attention pictures need matplotlib, which is not installed: "
                                           r".* -m pip install 'matplotlib>=3.6'$"):
        attention_picture(model, PROMPT, 0, 0, tmp_path / "attn.png")
    assert not (tmp_path / "attn.png").exists()


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, picogpt.attention_plot, picogpt.trace; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_token_labels_show_spaces_newlines_and_partial_characters():
    assert token_label(b" the") == "\u2423the"
    assert token_label(b"\n\n") == "\\n\\n"
    assert token_label(b"\t") == "\\t"
    assert token_label(b"\x00") == "\\x00"
    assert token_label(b"\xe2\x80") == "\\xe2\\x80"  # the first two bytes of a three-byte character
    assert token_label("café".encode()) == "café"
    assert token_labels(encode(PROMPT)) == LABELS
