"""What one forward pass computes, gathered for a learner: the data behind `picogpt explain`'s page.

    import picogpt
    from picogpt.explain import explain
    model = picogpt.load("demo")
    seen = explain(model, "The optional argument", ablate=[(1, 0)])
    seen.attentions[1, 0]          # [n_seq, n_seq]: layer 1, head 0; row = query, column = key
    seen.lens_ids[:, -1]           # [n_layer + 1, 5]: the top-5 next tokens after each layer, last position
    seen.next_logits               # [n_vocab]: the model's logits after the last token
    seen.to_json()                 # the page's data, exactly (picogpt.explain_page draws it)
    seen                           # as a notebook cell's last line: the page itself, inline (_repr_html_)

Everything is computed by picogpt.model's own functions: the attention weights and the residual stream
are recorded by a trace of the forward pass (picogpt.trace), and the ablation is a trace that zeroes the
chosen heads' outputs as the pass runs, which is what Hugging Face's head_mask does. Nothing here
re-implements the model's math; `sources` names the functions that did it, with their lines, read from
the source when the data is gathered.
"""

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from . import model as _model
from . import sampling, tokenizer
from .attention_plot import token_labels
from .errors import BadArgument, shown
from .trace import tracing

MAX_TOKENS = 128  # the page holds n_layer x n_head x n_seq² / 2 attention weights: it grows with the square
TOP = 5  # next-token candidates per layer and position in the logit lens
N_CANDIDATES = 50  # next-token candidates the page can list (filters are applied to all n_vocab logits)

# Where the math of each view lives: (module, function or class, a piece of its code that must be there). The
# page shows each one's file, line and first docstring line (its equation) and the matching line of code,
# all read from the source when the data is gathered, so they cannot drift from what ran.
SOURCES = {
    "tokens": [(tokenizer, "encode", "load_tokenizer().encode("), (_model, "gpt2", "wte[ids] + wpe[positions]")],
    "attention": [(_model, "attention", "softmax(scores + mask)"), (_model, "softmax", "np.exp(")],
    "lens": [(_model, "layer_norm", "g * centered"), (_model, "gpt2", "matmul(x, wte.T)")],
    "next": [(_model, "gpt2", "matmul(x, wte.T)"), (sampling, "RepetitionPenalty", "np.where(scores > 0"),
             (sampling, "Temperature", "scores / float32_within"), (sampling, "TopK", "kth_largest ="),
             (sampling, "TopP", "mass_before < self.p"), (sampling, "softmax64", "np.exp(")],
    "ablation": [(_model, "mha", "merge_heads(heads)")],
}


@dataclass(repr=False)
class Explanation:
    """One forward pass over a prompt, as the page shows it. Arrays are float32 unless said otherwise.

    In Jupyter it displays itself as the page of `picogpt explain` (_repr_html_), in a sandboxed frame.
    """

    prompt: str
    ids: list  # the prompt's token ids
    tokens: list  # each token as a visible label (␣ for a space, \\xNN for part of a character)
    attentions: np.ndarray  # [n_layer, n_head, n_seq, n_seq]: row t = where query t looks (sums to 1)
    lens_ids: np.ndarray  # [n_layer + 1, n_seq, TOP] int: top next tokens after the embedding and each block
    lens_probs: np.ndarray  # [n_layer + 1, n_seq, TOP]: their probabilities (the last row is the model's own)
    next_logits: np.ndarray  # [n_vocab]: the model's logits for the token after the prompt
    model: dict  # name, file, hparams, parameter count, how the weights are stored
    sources: dict  # view -> [{function, file, line, equation, code}]
    ablated: list = field(default_factory=list)  # [(layer, head)] zeroed in ablated_logits
    ablated_logits: np.ndarray | None = None  # [n_vocab]: next_logits with those heads' outputs zeroed
    command: str = ""  # how the page was made

    def labels(self, ids):
        """Visible labels for token ids."""
        return token_labels(ids)

    def __repr__(self):
        off = ", ".join(f"{layer}.{head}" for layer, head in self.ablated)
        heads = f", heads {off} switched off" if off else ""
        return (f"<Explanation of {self.prompt!r}: {len(self.ids)} tokens through {self.model['name']} "
                f"({self.model['n_layer']} layers of {self.model['n_head']} heads){heads}>")

    def _repr_html_(self):
        """The page of `picogpt explain`, for Jupyter: the self-contained page in a sandboxed iframe (its own
        script runs, it cannot reach the notebook, and nothing is fetched)."""
        from .explain_page import inline_frame, render
        return inline_frame(render(self.to_json()))

    def to_json(self):
        """The page's data as JSON-ready values: rounded where only a picture needs them (attention to
        3 decimals, lens probabilities to 4), exact where the page recomputes picogpt's own numbers (the
        next-token logits, as float32's shortest decimal form)."""
        def exact(logits):
            return None if logits is None else [float(np.format_float_positional(x, unique=True, trim="-"))
                                                 for x in logits.astype(np.float32)]
        n_seq = len(self.ids)
        candidate_ids = set(self.lens_ids.ravel().tolist()) | set(self.ids)
        for logits in (self.next_logits, self.ablated_logits):
            if logits is not None:
                candidate_ids |= set(np.argsort(-logits, kind="stable")[:N_CANDIDATES].tolist())
        vocab = dict(zip(sorted(candidate_ids), self.labels(sorted(candidate_ids))))
        return {
            "picogpt": __version__,
            "command": self.command,
            "prompt": self.prompt,
            "model": self.model,
            "ids": [int(i) for i in self.ids],
            "tokens": list(self.tokens),
            # attention[layer][head][query] = weights over keys 0..query (the rest are 0: the causal mask)
            "attention": [[[round_list(self.attentions[layer, head, q, :q + 1], 3) for q in range(n_seq)]
                           for head in range(self.attentions.shape[1])] for layer in range(self.attentions.shape[0])],
            "lens": {"ids": self.lens_ids.tolist(), "probs": round_list(self.lens_probs, 4)},
            "next_logits": exact(self.next_logits),
            "ablated": [list(h) for h in self.ablated],
            "ablated_logits": exact(self.ablated_logits),
            "vocab": {str(i): label for i, label in vocab.items()},
            "sources": self.sources,
        }


def round_list(array, decimals):
    """Nested lists of rounded Python floats (0.0 as 0, for size)."""
    rounded = np.round(np.asarray(array, dtype=np.float64), decimals)
    return [round_list(row, decimals) for row in rounded] if rounded.ndim > 1 else \
        [int(x) if x == int(x) else float(x) for x in rounded]


def top_tokens(logits, k):
    """The k most likely tokens of each row of logits [n_seq, n_vocab] and their probabilities, most likely
    first (ties: the lower id first): ids [n_seq, k], probs [n_seq, k]. k passes of argmax, each masking
    what it found, cost less than sorting or partitioning 50257 logits per row."""
    logits = np.asarray(logits, dtype=np.float32)
    rows = np.arange(len(logits))
    top = np.empty((len(logits), k), dtype=np.int64)
    remaining = logits.copy()
    for j in range(k):
        top[:, j] = remaining.argmax(axis=-1)  # the first of equal maxima: the lowest id
        remaining[rows, top[:, j]] = -np.inf
    largest = logits[rows, top[:, 0]][:, None]
    normaliser = np.exp(logits - largest).sum(axis=-1, keepdims=True)  # softmax's denominator, stable
    return top, np.exp(np.take_along_axis(logits, top, axis=-1) - largest) / normaliser


def parse_heads(text):
    """"1.0,3.2" -> [(1, 0), (3, 2)]: the --ablate argument (layer.head, from 0)."""
    heads = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        layer, dot, head = item.partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise BadArgument(f"--ablate takes LAYER.HEAD pairs such as 1.0,3.2 (numbers from 0), not {item!r}")
        heads.append((int(layer), int(head)))
    if not heads:
        raise BadArgument("--ablate needs at least one LAYER.HEAD pair, such as 1.0")
    return heads


def check_heads(hparams, heads):
    """Refuse a layer or head the model does not have, in one sentence."""
    n_layer, n_head = hparams["n_layer"], hparams["n_head"]
    for layer, head in heads:
        if not (0 <= layer < n_layer and 0 <= head < n_head):
            raise BadArgument(f"head {layer}.{head} does not exist: this model has layers 0-{n_layer - 1} and "
                              f"heads 0-{n_head - 1} in each (--ablate LAYER.HEAD, from 0)")


def zero_heads(heads):
    """A trace edit that zeroes the outputs of the given (layer, head)s: their attention() result, before the
    heads are merged and projected, as Hugging Face's head_mask does (it zeroes their weights, so weights @ v
    is 0)."""
    by_step = {}
    for layer, head in heads:
        by_step.setdefault(f"block {layer} / mha / attention", []).append(head)

    def edit(name, value):
        if name in by_step:
            value = value.copy()
            value[:, by_step[name]] = 0  # [n_batch, n_head, n_seq, head_dim]
        return value
    return edit


def source_refs(view):
    """Where a view's math lives: the function, its file and line, its equation, and the line of code."""
    refs = []
    for module, name, needle in SOURCES[view]:
        function = getattr(module, name)
        function = getattr(function, "__wrapped__", function)  # a function a trace has wrapped
        lines, first = inspect.getsourcelines(function)
        matches = [i for i, line in enumerate(lines) if needle in line]
        if not matches:
            raise RuntimeError(f"{module.__name__}.{name} no longer contains {needle!r}: update SOURCES in {__name__}")
        path = Path(inspect.getsourcefile(function))
        label = name if inspect.isclass(function) else f"{name}()"  # a class is one of sampling's processors
        refs.append({"function": label, "file": f"picogpt/{path.name}", "line": first + matches[0],
                     "equation": inspect.getdoc(function).split("\n")[0], "code": lines[matches[0]].strip()})
    return refs


def model_summary(model, name=None):
    h = model.hparams
    precision = getattr(model, "precision", None)
    return {"name": shown(name or (Path(model.path).parent.name if model.path else "in memory")),
            "file": shown(model.path) if model.path else None,  # (the page is UTF-8; a file name may not be)
            "n_layer": h["n_layer"], "n_head": h["n_head"], "n_embd": h["n_embd"], "n_ctx": h["n_ctx"],
            "n_vocab": h["n_vocab"], "n_params": int(model.n_params),
            "weights": precision.file if precision is not None else "f32"}


def explain(model, prompt, ablate=(), model_name=None, command=None):
    """One forward pass of `model` over `prompt`, gathered for the page: an Explanation.

    ablate: (layer, head) pairs whose outputs are zeroed in a second pass, for the next-token distribution
    with and without them. The prompt may hold up to MAX_TOKENS tokens (and the model's context).
    """
    ids = tokenizer.encode(prompt)
    h = model.hparams
    limit = min(MAX_TOKENS, h["n_ctx"])
    if not ids:
        raise BadArgument("the prompt is empty: give the text to explain")
    if len(ids) > limit:
        raise BadArgument(f"the prompt is {len(ids)} tokens; explain shows at most {limit} (the page holds "
                          f"every head's attention over every pair of tokens), so shorten it")
    heads = sorted(set(map(tuple, ablate)))
    check_heads(h, heads)
    n_layer = h["n_layer"]
    residual_steps = {"embed"} | {f"block {i}" for i in range(n_layer)}
    attention_steps = {f"block {i} / mha / attention / softmax" for i in range(n_layer)}
    with tracing(keep_values=True, steps=(residual_steps | attention_steps).__contains__) as t:
        logits = model(ids, all_logits=True)  # [n_seq, n_vocab]
    values = {row.name: row.value for row in t.rows}
    attentions = np.stack([values[f"block {i} / mha / attention / softmax"][0] for i in range(n_layer)])

    # The logit lens: the residual stream after the embedding and after each block, read out as the last
    # block's is (final layer norm, then the tied unembedding). The last row is the model's own logits.
    residuals = [values["embed"][0]] + [values[f"block {i}"][0] for i in range(n_layer - 1)]
    lens_ids = np.empty((n_layer + 1, len(ids), TOP), dtype=np.int64)
    lens_probs = np.empty((n_layer + 1, len(ids), TOP), dtype=np.float32)
    for row, x in enumerate(residuals + [None]):
        if x is None:
            row_logits = logits
        else:
            x = _model.layer_norm(x, **model.params["ln_f"], eps=h["layer_norm_epsilon"])
            row_logits = _model.matmul(x, model.params["wte"].T)  # [n_seq, n_vocab]
        lens_ids[row], lens_probs[row] = top_tokens(row_logits, TOP)

    ablated_logits = None
    if heads:
        with tracing(steps=lambda name: False, edit=zero_heads(heads)):
            ablated_logits = model(ids)[-1]
    return Explanation(
        prompt=prompt, ids=ids, tokens=token_labels(ids), attentions=attentions.astype(np.float32),
        lens_ids=lens_ids, lens_probs=lens_probs, next_logits=logits[-1].astype(np.float32),
        model=model_summary(model, model_name), sources={view: source_refs(view) for view in SOURCES},
        ablated=heads, ablated_logits=ablated_logits,
        command=command or "")
