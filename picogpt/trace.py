"""A step tracer: every step of a forward pass with its output shape and statistics, to read one pass
through the network layer by layer.

    from picogpt.trace import trace, format_trace
    rows = trace(model, ids)             # one forward pass, as generating's first step runs it
    print(format_trace(rows))            # step, shape, mean, std, max|x|, one line per step
    print(format_trace(rows, depth=1))   # only the embeddings, each block's output, ln_f and the logits

How it works: picogpt.model's functions call one another through the module's globals (`block` calls
`mha`, which calls `linear` and `attention`, ...). While a `tracing` context is open it replaces those
globals with wrappers that call the original and note what came out; on leaving (normally or by an
exception) it puts the very same function objects back. The model's code has no hooks, and outside the
context nothing is different: tracing costs nothing when it is off.

Step names are the path of calls that produced the value, named after the checkpoint's parameters where
a function is used twice: "block 3 / mha / c_attn" is the first `linear` of `mha` in the fourth block,
"block 3 / ln_2" the second `layer_norm` of that block. Rows are recorded when a step returns, so a
step's sub-steps come before it. Three rows are values the code computes inline rather than by calling
a function, read off the arguments of the next call: "embed" (wte[ids] + wpe[positions], the first
block's input), "block i / x + mha" (the first residual sum, ln_2's input) and "logits".

Shapes keep the batch axis that the model uses inside (a single prompt is a batch of one). Statistics are
over every entry of the step's output, in float64; a value holding -inf or NaN (the attention mask) gets
them over its finite entries and a note counting the others.

Tracing patches a module shared by the whole process: one trace at a time, and only the thread that
opened it is traced (other threads run the model untraced meanwhile).
"""

import sys
import threading
from typing import NamedTuple

import numpy as np

from . import model as _model

# The functions of picogpt.model that a trace wraps: everything a forward pass calls, from gpt2 down.
TRACED = ("gpt2", "attention_mask", "block", "layer_norm", "mha", "linear", "split_heads", "attention",
          "softmax", "merge_heads", "mlp", "gelu")

# The name of a step, by (caller, function) and the how-many-th call it is in that caller.
ROLES = {
    ("gpt2", "attention_mask"): ["mask"],
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
    """A traced call in progress: its path and how often it has called each function so far."""

    def __init__(self, function, path, start):
        self.function, self.path, self.start = function, path, start
        self.calls = {}


class tracing:
    """Context manager: trace every forward pass run inside it; rows accumulate in `.rows`.

        with tracing() as t:
            model(ids)
        t.rows                            # [TraceRow, ...]

        with tracing(file=sys.stderr, passes=1):   # print the first pass's table, then stop tracing
            for token in generate(model, ids, 20): ...

    file: print each pass's table there as soon as the pass ends (depth: see format_trace).
    passes: stop tracing after this many forward passes, putting the originals back at once, so the
    rest of the block runs at full speed. keep_values: keep each step's output in TraceRow.value.
    """

    _active = None  # the tracing context in force, if any (one at a time: it patches a shared module)
    _lock = threading.Lock()

    def __init__(self, file=None, passes=None, depth=None, keep_values=False):
        if passes is not None and passes < 1:
            raise ValueError("passes must be at least 1 (or None for every pass)")
        self.file, self.passes, self.depth, self.keep_values = file, passes, depth, keep_values
        self.rows = []
        self.n_passes = 0  # forward passes completed
        self._originals = None
        self._stack = []
        self._thread = None
        self._n_seq = 0  # tokens in the pass being traced

    # -- entering and leaving ------------------------------------------------------------------

    def __enter__(self):
        with tracing._lock:
            if tracing._active is not None:
                raise RuntimeError("a trace is already running; picogpt runs one trace at a time")
            tracing._active = self
        self._thread = threading.get_ident()
        self._originals = {name: getattr(_model, name) for name in TRACED if hasattr(_model, name)}
        for name, function in self._originals.items():
            setattr(_model, name, self._wrap(name, function))
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False

    def stop(self):
        """Put picogpt.model's own functions back (done on leaving the context; safe to repeat)."""
        if self._originals is not None:
            for name, function in self._originals.items():
                setattr(_model, name, function)
            self._originals = None
            with tracing._lock:
                if tracing._active is self:
                    tracing._active = None

    # -- recording ---------------------------------------------------------------------------------

    def _record(self, path, value, note=None, at=None, stats=True):
        value = np.asarray(value)
        mean, std, max_abs, stats_note = statistics(value) if stats else (float("nan"),) * 3 + ("",)
        if note is None:
            note = NOTES.get(" / ".join(path[-2:]), NOTES.get(path[-1], ""))
        note = "; ".join(filter(None, [note, stats_note]))
        row = TraceRow(" / ".join(path), tuple(value.shape), mean, std, max_abs, note, self.n_passes,
                       value if self.keep_values else None)
        if at is None:
            self.rows.append(row)
        else:
            self.rows.insert(at, row)

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

    def _wrap(self, function, original):
        def traced(*args, **kwargs):
            if self._originals is None or threading.get_ident() != self._thread:
                return original(*args, **kwargs)
            parent = self._stack[-1] if self._stack else None
            start = len(self.rows)
            name = self._name(function, parent)
            path = (parent.path if parent else ()) + (() if function == "gpt2" else (name,))
            if function == "gpt2":
                ids, cache = args[0] if args else kwargs["ids"], kwargs.get("cache")
                n_past = cache[0].length if cache is not None else 0
                self._n_seq = np.shape(ids)[-1]
                self._record(("ids",), ids, stats=False,
                             note=f"{self._n_seq} new token{'s' * (self._n_seq != 1)} after {n_past} cached")
            elif parent is not None and parent.function == "gpt2" and name == "block 0":
                # The first block's input is the embedding sum, computed inline in gpt2: show it before
                # the mask, which gpt2 computes after it.
                self._record(("embed",), args[0] if args else kwargs["x"], at=parent.start + 1)
            elif parent is not None and parent.function == "block" and name == "ln_2":
                self._record(parent.path + ("x + mha",), args[0] if args else kwargs["x"])
            frame = _Frame(function, path, start)
            self._stack.append(frame)
            try:
                out = original(*args, **kwargs)
            finally:
                self._stack.pop()
            if function == "gpt2":
                self._record(("logits",), out.logits)
                self._end_pass(frame.start)
            elif function == "block":
                self._record(path, out[0], note="block output: x + mlp (residual)")
            elif path == ("ln_f",) and out.shape[-2] < self._n_seq:
                self._record(path, out, note="final layer norm, last position only (all generating needs)")
            else:  # attention, mha return (output, weights): the weights are the softmax row
                self._record(path, out[0] if isinstance(out, tuple) else out)
            return out
        traced.__wrapped__ = original
        traced.__name__ = traced.__qualname__ = original.__name__
        traced.__doc__ = original.__doc__
        return traced

    def _end_pass(self, start):
        if self.file is not None:
            print(format_trace(self.rows[start:], depth=self.depth), file=self.file, flush=True)
        self.n_passes += 1
        if self.passes is not None and self.n_passes >= self.passes:
            self.stop()


def trace(model, ids, keep_values=False, **forward_options):
    """Trace one forward pass of `model` over token ids: a list of TraceRow, in the order computed.

    forward_options go to model.forward (cache, all_logits, output_hidden_states, ...). By default only
    the last position reaches ln_f and the logits, as when generating.
    """
    with tracing(keep_values=keep_values) as t:
        model.forward(ids, **forward_options)
    return t.rows


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
