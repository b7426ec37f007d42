"""A step tracer: every step of a forward pass with its output shape and statistics, to read one pass
through the network layer by layer.

    from picogpt.trace import trace, format_trace
    rows = trace(model, ids)             # one forward pass, as generating's first step runs it
    print(format_trace(rows))            # step, shape, mean, std, max|x|, one line per step
    print(format_trace(rows, depth=1))   # only the embeddings, each block's output, ln_f and the logits

    from picogpt.trace import collect
    out = collect(model, ids)            # logits, hidden states and attention weights, as Hugging Face's

How it works: picogpt.model's functions call one another through the module's globals (`block` calls
`mha`, which calls `linear` and `attention`, ...). While a `tracing` context is open it replaces those
globals with wrappers that call the original and note what came out; on leaving (normally or by an
exception) it puts the very same function objects back. The model's code has no hooks, and outside the
context nothing is different: tracing costs nothing when it is off.

Step names are the path of calls that produced the value, named after the checkpoint's parameters where
a function is used twice: "block 3 / mha / c_attn" is the first `linear` of `mha` in the fourth block,
"block 3 / ln_2" the second `layer_norm` of that block. Rows are recorded when a step returns, so a
step's sub-steps come before it. Three rows are values that no traced call returns, read off the
arguments of a call: "embed" (wte[ids] + wpe[positions], computed inline in gpt2: the first block's
input), "mask" (built by gpt2's caller) and "block i / x + mha" (the first residual sum, ln_2's input).

Shapes keep the batch axis that the model uses inside (a single prompt is a batch of one). Statistics are
over every entry of the step's output, in float64; a value holding -inf or NaN (the attention mask) gets
them over its finite entries and a note counting the others.

Tracing patches a module shared by the whole process: the wrappers are in place while any trace is
open, each thread has at most one trace, and a thread without one runs the model untraced.

`collect` is the one way picogpt returns hidden states and attention weights: the model's functions
return one array each, and a trace keeps the values of the steps that are those.
"""

import re
import sys
import threading
from typing import NamedTuple

import numpy as np

from . import model as _model

# The functions of picogpt.model that a trace wraps: everything a forward pass calls, from gpt2 down.
# picogpt/model.py's docstring states the contract: they call one another through the module's globals.
TRACED = ("gpt2", "block", "layer_norm", "mha", "linear", "split_heads", "attention", "softmax",
          "merge_heads", "mlp", "gelu")

# The name of a step, by (caller, function) and the how-many-th call it is in that caller.
ROLES = {
    ("gpt2", "layer_norm"): ["ln_f"],
    ("block", "layer_norm"): ["ln_1", "ln_2"],
    ("mha", "linear"): ["c_attn", "c_proj"],
    ("mha", "split_heads"): ["q", "k", "v"],
    ("mlp", "linear"): ["c_fc", "c_proj"],
}

NOTES = {
    "ids": "token ids",
    "embed": "wte[ids] + wpe[positions]",
    "mask": "causal mask, added to the scores",
    "ln_1": "layer norm before attention",
    "c_attn": "q, k, v side by side",
    "q": "queries, split into heads",
    "k": "keys, split into heads",
    "v": "values, split into heads",
    "softmax": "attention weights, rows sum to 1",
    "attention": "weights @ v",
    "merge_heads": "heads side by side again",
    "mha": "multi-head attention output",
    "x + mha": "residual: block input + attention",
    "ln_2": "layer norm before the MLP",
    "c_fc": "up-projection to 4 x n_embd",
    "mha / c_proj": "output projection",
    "gelu": "GELU",
    "mlp / c_proj": "down-projection to n_embd",
    "mlp": "MLP output",
    "ln_f": "final layer norm",
    "logits": "x @ wte.T",
}


class TraceRow(NamedTuple):
    """One step of a traced forward pass."""

    name: str  # "block 3 / mha / attention": the path of calls, joined by " / "
    shape: tuple  # the output's shape, batch axis included
    mean: float  # over all (finite) entries, computed in float64; nan for token ids
    std: float
    max_abs: float  # max |x|
    note: str = ""  # what the step is; for -inf or NaN entries, how many there are
    pass_index: int = 0  # which traced forward pass (call of picogpt.model.gpt2) it belongs to
    value: np.ndarray | None = None  # the output itself, if the trace was asked to keep values

    @property
    def depth(self):
        """1 for the top-level steps (embed, block i, ln_f, logits), 2 for a block's steps, and so on."""
        return self.name.count(" / ") + 1


def statistics(x):
    """(mean, std, max |x|, note) of an array, over its finite entries, in float64."""
    x = np.asarray(x)
    finite = np.isfinite(x)
    note = ""
    if not finite.all():
        n_neg_inf, n_pos_inf = int(np.count_nonzero(x == -np.inf)), int(np.count_nonzero(x == np.inf))
        n_nan = x.size - int(finite.sum()) - n_neg_inf - n_pos_inf
        counts = [f"{n} {what}" for n, what in ((n_neg_inf, "-inf"), (n_pos_inf, "+inf"), (n_nan, "NaN")) if n]
        note = f"{', '.join(counts)} of {x.size} (stats over the rest)"
        x = x[finite]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan"), note
    return (float(np.mean(x, dtype=np.float64)), float(np.std(x, dtype=np.float64)),
            float(np.max(np.abs(x))), note)


class _Frame:
    """A traced call in progress: its path, how often it has called each function so far, and (for gpt2)
    the mask it was given, recorded once its first block starts."""

    def __init__(self, function, path, start):
        self.function, self.path, self.start = function, path, start
        self.calls = {}
        self.mask = None


class tracing:
    """Context manager: trace every forward pass this thread runs inside it; rows accumulate in `.rows`.

        with tracing() as t:
            model(ids)
        t.rows                            # [TraceRow, ...]

        with tracing(file=sys.stderr, passes=1):   # print the first pass's table, then stop tracing
            for token in generate(model, ids, 20): ...

    file: print each pass's table there as soon as the pass ends (depth: see format_trace).
    passes: stop tracing after this many forward passes, putting the originals back at once, so the
    rest of the block runs at full speed. keep_values: keep each step's output in TraceRow.value.
    steps: record only the steps whose names this function accepts (the others cost no statistics).
    edit: an intervention, edit(name, value) -> value, called with every step's output as the pass runs;
    what it returns replaces that output for the rest of the pass (picogpt.explain zeroes attention heads
    with it). It must keep the shape and dtype.

    One trace at a time per thread; other threads run the model untraced meanwhile (while any trace is
    open, their calls pass through the wrappers, which cost a lookup each).
    """

    def __init__(self, file=None, passes=None, depth=None, keep_values=False, steps=None, edit=None):
        if passes is not None and passes < 1:
            raise ValueError("passes must be at least 1 (or None for every pass)")
        self.file, self.passes, self.depth, self.keep_values = file, passes, depth, keep_values
        self.steps, self.edit = steps, edit
        self.rows = []
        self.n_passes = 0  # forward passes completed
        self._open = False
        self._stack = []
        self._n_seq = 0  # tokens in the pass being traced

    # -- entering and leaving ------------------------------------------------------------------

    def __enter__(self):
        if getattr(_this_thread, "tracer", None) is not None:
            raise RuntimeError("a trace is already running in this thread; picogpt runs one trace at a time")
        _install()
        _this_thread.tracer, self._open = self, True
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False

    def stop(self):
        """Stop recording; the last trace to stop puts picogpt.model's own functions back (done on leaving
        the context; safe to repeat)."""
        if self._open:
            self._open = False
            if getattr(_this_thread, "tracer", None) is self:
                _this_thread.tracer = None
            _uninstall()

    # -- recording ---------------------------------------------------------------------------------

    def _record(self, path, value, note=None, stats=True):
        name = " / ".join(path)
        if self.steps is not None and not self.steps(name):
            return
        value = np.asarray(value)
        mean, std, max_abs, stats_note = statistics(value) if stats else (float("nan"),) * 3 + ("",)
        if note is None:
            note = NOTES.get(" / ".join(path[-2:]), NOTES.get(path[-1], ""))
        note = "; ".join(filter(None, [note, stats_note]))
        self.rows.append(TraceRow(name, tuple(value.shape), mean, std, max_abs, note, self.n_passes,
                                  value if self.keep_values else None))

    def _name(self, function, parent):
        """The step's name within its caller: a role (ln_1, c_attn, q...), "block i", or the function's."""
        if parent is None:
            return function
        n = parent.calls.get(function, 0)
        parent.calls[function] = n + 1
        if (parent.function, function) == ("gpt2", "block"):
            return f"block {n}"
        roles = ROLES.get((parent.function, function), [])
        return roles[n] if n < len(roles) else function if n == 0 else f"{function} {n}"

    def _call(self, function, original, args, kwargs):
        """Run one traced call of picogpt.model's `function`, recording what it returns."""
        parent = self._stack[-1] if self._stack else None
        name = self._name(function, parent)
        path = (parent.path if parent else ()) + (() if function == "gpt2" else (name,))
        frame = _Frame(function, path, len(self.rows))
        if function == "gpt2":
            ids, cache = _argument(args, kwargs, 0, "ids"), kwargs.get("cache")
            n_past = cache.length if cache is not None else 0
            self._n_seq = np.shape(ids)[-1]
            self._record(("ids",), ids, stats=False,
                         note=f"{self._n_seq} new token{'s' * (self._n_seq != 1)} after {n_past} cached")
            frame.mask = _argument(args, kwargs, 2, "mask")
        elif parent is not None and parent.function == "gpt2" and name == "block 0":
            # Three values gpt2 does not compute by a call of its own: the embedding sum (inline, the
            # first block's input) and the mask its caller built.
            self._record(("embed",), _argument(args, kwargs, 0, "x"))
            self._record(("mask",), parent.mask, note="causal mask, added to the scores")
        elif parent is not None and parent.function == "block" and name == "ln_2":
            self._record(parent.path + ("x + mha",), _argument(args, kwargs, 0, "x"))
        self._stack.append(frame)
        try:
            out = original(*args, **kwargs)
        finally:
            self._stack.pop()
        if self.edit is not None and function != "gpt2":
            out = self.edit(" / ".join(path), out)
        if function == "gpt2":
            self._record(("logits",), out)
            self._end_pass(frame.start)
        elif function == "block":
            self._record(path, out, note="block output: x + mlp (residual)")
        elif path == ("ln_f",) and out.shape[-2] < self._n_seq:
            self._record(path, out, note="final layer norm, last position only (all generating needs)")
        else:
            self._record(path, out)
        return out

    def _end_pass(self, start):
        if self.file is not None:
            print(format_trace(self.rows[start:], depth=self.depth), file=self.file, flush=True)
        self.n_passes += 1
        if self.passes is not None and self.n_passes >= self.passes:
            self.stop()


def _argument(args, kwargs, index, name):
    return args[index] if len(args) > index else kwargs[name]


# -- patching picogpt.model while any trace is open ---------------------------------------------------

_this_thread = threading.local()  # .tracer: the trace open in this thread, if any
_lock = threading.Lock()
_originals = {}  # picogpt.model's own functions, while they are replaced by wrappers
_n_open = 0  # traces open, in all threads


def _wrap(function, original):
    def traced(*args, **kwargs):
        tracer = getattr(_this_thread, "tracer", None)
        if tracer is None:
            return original(*args, **kwargs)
        return tracer._call(function, original, args, kwargs)
    traced.__wrapped__ = original
    traced.__name__ = traced.__qualname__ = original.__name__
    traced.__doc__ = original.__doc__
    return traced


def _install():
    global _n_open
    with _lock:
        if _n_open == 0:
            _originals.update({name: getattr(_model, name) for name in TRACED})
            for name, function in _originals.items():
                setattr(_model, name, _wrap(name, function))
        _n_open += 1


def _uninstall():
    global _n_open
    with _lock:
        _n_open -= 1
        if _n_open == 0:
            for name, function in _originals.items():
                setattr(_model, name, function)
            _originals.clear()


# -- using a trace ----------------------------------------------------------------------------------

def trace(model, ids, keep_values=False, **forward_options):
    """Trace one forward pass of `model` over token ids: a list of TraceRow, in the order computed.

    forward_options go to model.forward (cache, n_pad, all_logits). By default only the last position
    reaches ln_f and the logits, as when generating.
    """
    with tracing(keep_values=keep_values) as t:
        model.forward(ids, **forward_options)
    return t.rows


class Collected(NamedTuple):
    """What `collect` returns: a forward pass's logits and, as Hugging Face's GPT-2 returns them, the
    hidden states and attention weights. Arrays have the batch axis only if the ids had one."""

    logits: np.ndarray  # [n_seq, n_vocab] with all_logits, else [1, n_vocab]
    hidden_states: list  # n_layer + 1 x [n_seq, n_embd]: each block's input, then ln_f's output
    attentions: list  # n_layer x [n_head, n_seq, n_kv]: each block's attention weights (softmax output)


_COLLECTED = re.compile(r"embed|block \d+|block \d+ / mha / attention / softmax")


def collect(model, ids, n_pad=None, all_logits=False, cache=None, positions=None):
    """Run one forward pass of `model` over ids (as model.forward does, with the same arguments) and
    return a Collected: its logits, every hidden state and every attention weight, recorded by a trace
    of the pass (the model's functions return neither).
    """
    with tracing(keep_values=True, steps=_COLLECTED.fullmatch) as t:
        logits = model.forward(ids, cache=cache, n_pad=n_pad, all_logits=all_logits, positions=positions)
    values = {row.name: row.value for row in t.rows}
    n_layer, h = model.hparams["n_layer"], model.hparams
    # The last hidden state is ln_f over every position; generating normalises the last one only.
    last = _model.layer_norm(values[f"block {n_layer - 1}"], **model.params["ln_f"], eps=h["layer_norm_epsilon"])
    hidden = [values["embed"]] + [values[f"block {i}"] for i in range(n_layer - 1)] + [last]
    attentions = [values[f"block {i} / mha / attention / softmax"] for i in range(n_layer)]
    if np.ndim(ids) == 1:  # the model added a batch axis inside: drop it as forward does
        hidden, attentions = [x[0] for x in hidden], [a[0] for a in attentions]
    return Collected(logits, hidden, attentions)


def _number(x):
    return "" if x != x else f"{x:.4g}"  # nan (token ids) prints as nothing


def format_trace(rows, depth=None):
    """A table of trace rows, one line per step, a blank line between forward passes.

    depth: show only the steps at most this deep (1: embed, each block's output, ln_f, logits; 2: also
    each block's layer norms, attention and MLP; None: every step).
    """
    rows = [r for r in rows if depth is None or r.depth <= depth]
    name_width = max([len("step")] + [len(r.name) for r in rows])
    shapes = ["[" + ", ".join(map(str, r.shape)) + "]" for r in rows]
    shape_width = max([len("shape")] + [len(s) for s in shapes])
    header = f"{'step':<{name_width}}  {'shape':<{shape_width}}  {'mean':>10}  {'std':>10}  {'max|x|':>10}  note"
    lines = [header]
    for i, (row, shape) in enumerate(zip(rows, shapes)):
        if i and (row.pass_index != rows[i - 1].pass_index or row.name == "ids"):  # a new forward pass
            lines += ["", header]
        lines.append(f"{row.name:<{name_width}}  {shape:<{shape_width}}  {_number(row.mean):>10}  "
                     f"{_number(row.std):>10}  {_number(row.max_abs):>10}  {row.note}".rstrip())
    return "\n".join(lines)


def print_trace(model, ids, file=None, depth=None, **forward_options):
    """Trace one forward pass over ids and print the table to `file` (default: standard error)."""
    rows = trace(model, ids, **forward_options)
    print(format_trace(rows, depth=depth), file=sys.stderr if file is None else file, flush=True)
    return rows
