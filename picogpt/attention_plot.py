"""Attention pictures: where each token of a prompt looks, as a heatmap with the tokens on both axes.

    picogpt attention "The cat sat on the mat" --layer 5 --head 1 --out attn.png
    picogpt attention "The cat sat on the mat" --layer 5 --out heads.png      # all heads of layer 5

From Python:

    from picogpt.attention_plot import attention_weights, plot_attention, token_labels
    weights = attention_weights(model, ids)                  # n_layer x [n_head, n_seq, n_seq]
    picture = plot_attention(weights, token_labels(ids), layer=5, head=1, out_path="attn.png")
    picture.weights                                          # the [n_seq, n_seq] matrix drawn
    picture                                                  # a notebook cell's last line: the picture (_repr_png_)

Row t of a picture is the query at position t (the token doing the looking), column s the key at
position s (the token looked at); a cell is the weight softmax gave that key, and each row sums to 1.
The upper triangle is 0: the causal mask hides later tokens. Colours run from 0 to 1 in every picture,
so pictures of different heads compare directly.

matplotlib is an optional extra (picogpt's `plot`), imported only when a picture is drawn.
Figures are drawn with matplotlib's Agg renderer directly (no pyplot, no window, no change to
matplotlib's global backend), and written atomically: to a temporary file in the same folder, renamed
into place when complete.
"""

import io
import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import PicogptError, plural
from .outputs import atomic_output, output_file
from .hints import install_command
from .generate import prompt_ids
from .tokenizer import load_tokenizer
from .trace import collect

FORMATS = ("png", "svg", "pdf")


class AttentionPicture(NamedTuple):
    weights: np.ndarray  # what was drawn: [n_seq, n_seq] for one head, [n_head, n_seq, n_seq] for a grid
    figure: Any  # the matplotlib Figure (one Axes per head drawn, then the colour bar)
    path: Path | None  # where it was written, if anywhere

    def _repr_png_(self):
        """The picture as PNG bytes: what Jupyter shows for a cell whose last line is one."""
        if self.figure is None:
            return None
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from")  # emoji, CJK in labels
            self.figure.savefig(buffer, format="png")
        return buffer.getvalue()


def _matplotlib():
    """matplotlib's Figure and Agg canvas, or a one-sentence error naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PicogptError(f"attention pictures need matplotlib, which is not installed: "
                           f"{install_command('plot')}") from None
    return Figure, FigureCanvasAgg


# ---------------------------------------------------------------------------------------------------
# The numbers

def attention_weights(model, ids):
    """Every layer's attention weights over token ids [n_seq]: n_layer x [n_head, n_seq, n_seq] float32.

    They are the softmax output inside picogpt.model.attention, as picogpt.trace.collect records them;
    row t holds query t's weights over keys 0..n_seq-1.
    """
    return collect(model, np.asarray(ids)).attentions


def check_layer_head(n_layer, n_head, layer, head=None):
    """Refuse a layer or head the model does not have, in one sentence."""
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layer:
        raise PicogptError(f"layer {layer} does not exist: this model has layers 0-{n_layer - 1}")
    if head is not None and (not isinstance(head, (int, np.integer)) or not 0 <= head < n_head):
        raise PicogptError(f"head {head} does not exist: this model has heads 0-{n_head - 1} in each layer")


# ---------------------------------------------------------------------------------------------------
# The labels

def token_label(token_bytes):
    """A token as a visible label: spaces as ␣, newlines and tabs as \\n and \\t, other control
    characters escaped, and the bytes of a partial UTF-8 character as \\xNN."""
    try:
        text = token_bytes.decode("utf-8")
    except UnicodeDecodeError:  # part of a character split over several tokens
        return "".join(f"\\x{b:02x}" for b in token_bytes)
    visible = {" ": "\u2423", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return "".join(visible.get(ch, ch if ch.isprintable() else repr(ch)[1:-1]) for ch in text)


def token_labels(ids):
    """Labels for token ids: each token decoded on its own and made visible by token_label."""
    tokenizer = load_tokenizer()
    return [token_label(tokenizer.decode_single_token_bytes(int(i))) for i in ids]


# ---------------------------------------------------------------------------------------------------
# The picture

def _ticks(ax, x_labels, y_labels, show_x, show_y, fontsize):
    """Tick marks for every token (every k-th beyond 64), labelled on the axes that show them."""
    for axis, labels, show in ((ax.xaxis, x_labels, show_x), (ax.yaxis, y_labels, show_y)):
        positions = list(range(0, len(labels), max(1, math.ceil(len(labels) / 64))))
        axis.set_ticks(positions)
        axis.set_ticklabels([labels[i] for i in positions] if show else [], fontsize=fontsize)
    ax.tick_params(axis="x", labelrotation=90)


def plot_attention(weights, tokens, layer, head=None, out_path=None):
    """Draw one head of one layer (or, with head=None, all heads of the layer as a grid).

    weights: every layer's weights, as attention_weights returns them (n_layer x [n_head, n_seq,
    n_seq]); tokens: a label for each key (token_labels), the queries being the last n_seq of them.
    Writes the picture to out_path if given (the format follows its suffix: .png, .svg or .pdf).
    Returns an AttentionPicture whose `weights` are exactly the numbers drawn.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    check_layer_head(len(weights), 0, layer)
    layer_weights = np.asarray(weights[layer])
    check_layer_head(len(weights), layer_weights.shape[0], layer, head)
    if layer_weights.ndim != 3 or layer_weights.shape[2] != len(tokens):
        raise ValueError(f"expected weights [n_head, n_seq, {len(tokens)}] for {len(tokens)} tokens, "
                         f"got {list(layer_weights.shape)}")
    n_head, n_seq = layer_weights.shape[:2]
    keys = [str(t) for t in tokens]
    queries = keys[len(keys) - n_seq:]

    if head is not None:
        drawn = layer_weights[head]
        side = min(16.0, max(4.5, 2.5 + 0.22 * len(keys)))
        figure = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        image = ax.imshow(drawn, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        fontsize = max(5, min(10, 240 / len(keys)))
        _ticks(ax, keys, queries, True, True, fontsize)
        ax.set_xlabel("key: the token looked at")
        ax.set_ylabel("query: the token looking")
        ax.set_title(f"layer {layer}, head {head}")
        if len(keys) <= 12:  # few enough cells to print each weight
            for (t, s), w in np.ndenumerate(drawn):
                ax.text(s, t, f"{w:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if w > 0.6 else "white")
        figure.colorbar(image, ax=ax, label="attention weight")
    else:
        drawn = layer_weights
        n_cols = math.ceil(math.sqrt(n_head))
        n_rows = math.ceil(n_head / n_cols)
        cell = min(5.0, max(2.2, 1.0 + 0.15 * len(keys)))
        figure = Figure(figsize=(n_cols * cell + 1.2, n_rows * cell + 0.6), dpi=100, layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(n_rows, n_cols, squeeze=False)
        fontsize = max(4, min(8, 120 / len(keys)))
        for h, ax in enumerate(axes.flat):
            if h >= n_head:
                ax.set_visible(False)
                continue
            image = ax.imshow(drawn[h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"head {h}", fontsize=9)
            col = h % n_cols
            show = len(keys) <= 32  # beyond that, labels on small panels are unreadable
            bottom = h + n_cols >= n_head  # no panel below this one
            _ticks(ax, keys, queries, show and bottom, show and col == 0, fontsize)
        figure.suptitle(f"layer {layer}: attention of all {n_head} heads (rows: query, columns: key)")
        figure.colorbar(image, ax=axes, label="attention weight", shrink=0.8)

    path = None if out_path is None else save_figure(figure, out_path)
    return AttentionPicture(drawn, figure, path)


def save_figure(figure, out_path):
    """Write a figure atomically: into a temporary file beside out_path, renamed onto it when complete."""
    path = Path(out_path)
    fmt = path.suffix[1:].lower() or "png"
    if fmt not in FORMATS:
        raise PicogptError(f"cannot draw a picture as {path.name}: use a name ending in "
                           f"{', '.join('.' + f for f in FORMATS)}")
    with atomic_output(path) as f, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # emoji, CJK in labels
        figure.savefig(f, format=fmt)
    return path


def attention_picture(model, prompt, layer, head=None, out_path="attn.png"):
    """What `picogpt attention "prompt" --layer L [--head H] --out FILE` does: tokenize the prompt, run
    the model once, draw layer L's head H (all heads if None) with the tokens on both axes, and write
    the picture atomically. Bad layer or head numbers, or a prompt beyond the context, are one-sentence
    PicogptErrors raised before any work. Returns the AttentionPicture.
    """
    h = model.hparams
    check_layer_head(h["n_layer"], h["n_head"], layer, head)
    _matplotlib()  # fail on a missing extra, or a place the picture cannot go, before running the model
    out_path = output_file(out_path, default_name="attn.png")  # a folder: attn.png in it
    ids = prompt_ids(prompt)
    if len(ids) > h["n_ctx"]:
        raise PicogptError(f"the prompt is {plural(len(ids), 'token')}, more than the model's context of {h['n_ctx']}; "
                           f"shorten it")
    return plot_attention(attention_weights(model, ids), token_labels(ids), layer, head, out_path)
