"""Check picogpt against PyTorch on your own model, layer by layer: `picogpt parity` (`make parity`,
tools/parity.py), or from Python:

    from picogpt.parity import check, write_report
    result = check(picogpt.load("124M"), n_tokens=20)   # a dict of every number; result["ok"]
    write_report(result)

The same model.dat is loaded into picogpt and into Hugging Face's GPT2LMHeadModel (PyTorch, CPU, float32;
picogpt.reference maps the weights, nothing is downloaded), the same prompt runs through both, and the
report compares, each against a stated tolerance:

- the hidden state after the embeddings, after every block, and after the final layer norm (the first
  one out of tolerance is the layer where a mismatch starts);
- the logits at every prompt position;
- n greedy tokens from each (a differing token is forgiven only as a near tie, see below);
- picogpt with its KV cache against picogpt without it.

Exit status 0 when everything is within tolerance, 1 when something is not (or on an error, one line on
stderr), 2 for a bad argument.

Tolerance: two float32 implementations that add in a different order differ by rounding, which grows
with a tensor's magnitude, so each vector (a hidden state or the logits at one position) is judged by
max|Δ| <= atol + rtol * max|reference|, the reference's largest magnitude in that vector; a row of the
report shows its worst position. The defaults, atol 1e-5 and rtol 1e-4, sit between two measurements:
float32 rounding came to at most 1.7e-6 x max|reference| on models with random weights of 124M's and
355M's shapes, of 1558M's width, and of 48 layers (124M: NumPy's BLAS and OpenBLAS, 1 and 2 threads),
and 0.9e-6 on the trained demo model (data/demo), a margin of about 60; the subtlest bug tried, the
exact erf GELU in place of GPT-2's tanh approximation, exceeds the tolerance 1.7 to 2.3 times from
block 0 on, and a layer norm epsilon of 1e-6 instead of 1e-5 about 20 to 70 times.

Near ties: when the two greedy continuations first differ at a step where the reference's logits for
the two tokens are within the logits tolerance of each other, either choice is float32 rounding, not a
bug: the report says so, passes, and compares no further (the texts go separate ways from there).
"""

import sys
import time

import numpy as np

from . import blas
from .errors import PicogptError, one_line, plural
from .generate import check_fits, generate, prompt_ids
from .modelfile import open_model_file
from .reference import hf_forward, hf_greedy, hf_model, require_torch
from .tokenizer import decode
from .trace import collect

PROMPT = ("Alan Turing theorized that computers would one day become very powerful, "
          "but even he could not imagine")  # the 19-token prompt of the README, the tests and the benchmark
ATOL, RTOL = 1e-5, 1e-4
INT8_ATOL, INT8_RTOL = 1e-3, 0.5  # int8 products: see tolerances()


def tolerances(model):
    """(atol, rtol) for a model as loaded: float32's, or int8's where its products are int8.

    int8 products quantize every activation to 127 levels per row, so picogpt's hidden states move from
    float32's on the same (dequantized) weights by far more than rounding: on the demo model, with the
    default prompt, max|Δ| came to 0.30 x max|reference| in the last hidden state and 0.32 at the worst
    prompt position's logits (their RMS error is about a tenth of that). rtol 0.5 passes those and fails a
    wrong scale or a misread matrix, which give errors of max|reference| and more; the greedy tokens,
    which int8 rounding may change, are then judged with the same generous near-tie rule.
    """
    precision = getattr(model, "precision", None)
    if precision is not None and precision.file == "int8" and precision.native:
        return INT8_ATOL, INT8_RTOL
    return ATOL, RTOL


# --- comparing -------------------------------------------------------------------------------------

def compare(ours, ref, atol, rtol, **labels):
    """One row of the report: ours and ref [n_positions, width] (or [width]) judged position by position.

    A position passes when max|ours - ref| <= atol + rtol * max|ref| over its vector, so the massive
    activations GPT-2 keeps in a few channels of a few positions do not loosen the others. The row keeps
    the numbers of its worst position (the largest max|Δ| / tolerance; the first NaN if any), and the
    mean |Δ| over all.
    """
    ours, ref = np.atleast_2d(np.asarray(ours, np.float64)), np.atleast_2d(np.asarray(ref, np.float64))
    delta = np.abs(ours - ref)
    max_delta, ref_max = delta.max(axis=-1), np.abs(ref).max(axis=-1)
    tol = atol + rtol * ref_max
    ratio = np.where(np.isnan(max_delta), np.inf, max_delta / tol)
    worst = int(np.argmax(ratio))
    return dict(labels, worst_position=worst, max_abs_diff=float(max_delta[worst]),
                mean_abs_diff=float(delta.mean()), max_abs_ref=float(ref_max[worst]), tolerance=float(tol[worst]),
                ok=bool(np.all(max_delta <= tol)))  # NaN is never <= tol


def layer_names(n_layer):
    """What hidden_states[i] is, for the report: the embeddings, each block's output, the final layer norm's."""
    return (["embeddings"] + [f"block {i}" for i in range(n_layer - 1)]
            + [f"block {n_layer - 1} + ln_f" if n_layer else "ln_f"])


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def judge_tokens(want, got, logits_at, atol, rtol):
    """Compare token lists `got` against `want`: a dict with the verdict and, at the first difference,
    whether the reference logits there (logits_at(i): [n_vocab]) make it a near tie."""
    i = first_difference(want, got)
    result = dict(identical=i is None, first_difference=i, n=len(want), ok=i is None, tie=False)
    if i is not None:
        logits = np.asarray(logits_at(i), dtype=np.float64)
        gap = float(logits[want[i]] - logits[got[i]])
        tol = atol + rtol * float(np.max(np.abs(logits)))
        result.update(expected=int(want[i]), got=int(got[i]), reference_gap=gap, tolerance=tol,
                      tie=bool(abs(gap) <= tol), ok=bool(abs(gap) <= tol))
    return result


# --- running ---------------------------------------------------------------------------------------

def check(model, prompt=PROMPT, n_tokens=20, atol=ATOL, rtol=RTOL, reference_model=None):
    """Run `model` and Hugging Face's GPT-2 holding the weights of reference_model (a model.dat path;
    default: the model's own file) on the prompt and compare them: the results as a dict (see
    write_report for its use; "ok" is the verdict). PyTorch runs with its current thread count.
    """
    torch, transformers = require_torch()  # before loading gigabytes that could not be compared
    transformers.logging.set_verbosity_error()
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not value >= 0:
            raise PicogptError(f"--{name} must be a number >= 0, not {value}")
    started = time.perf_counter()
    ref_file = open_model_file(reference_model if reference_model is not None else model.path)
    h = model.hparams
    if {k: ref_file.hparams[k] for k in h} != h:
        raise PicogptError(f"{ref_file.path} and {model.path} are different models (hyper-parameters "
                           f"{ref_file.hparams} and {h}); --reference-model needs the same shape")
    ids = prompt_ids(prompt)
    if max(ids) >= h["n_vocab"]:
        raise PicogptError(f"the prompt has token id {max(ids)}, outside this model's vocabulary of "
                           f"{h['n_vocab']}; use a prompt of tokens below {h['n_vocab']}")
    check_fits(model, len(ids), n_tokens, remedy="use a shorter --prompt or fewer tokens (-n)")
    reference = hf_model(ref_file.hparams, dict(ref_file.float32_tensors()))  # int8 and bfloat16: widened
    loaded = time.perf_counter()

    # Layer by layer over the prompt: one forward pass each, every position, every hidden state.
    ref_logits, ref_hidden = hf_forward(reference, ids)
    out = collect(model, ids, all_logits=True)
    hidden = [compare(ours, ref, atol, rtol, layer=name)
              for name, ours, ref in zip(layer_names(h["n_layer"]), out.hidden_states, ref_hidden)]
    logits = [compare(out.logits[i], ref_logits[i], atol, rtol, position=i, token=ids[i])
              for i in range(len(ids))]

    # Greedy continuations: picogpt's generate (with its cache) against Hugging Face's generate.
    n = n_tokens
    ref_tokens = hf_greedy(reference, ids, n) if n else []
    our_tokens = list(generate(model, ids, n, stop_at_eot=False, use_cache=True))
    greedy = judge_tokens(ref_tokens, our_tokens, lambda i: hf_forward(reference, ids + ref_tokens[:i])[0][-1],
                          atol, rtol)
    greedy.update(reference_tokens=ref_tokens, picogpt_tokens=our_tokens)

    # picogpt's KV cache: prefill the prompt, decode the continuation a token at a time, and compare every
    # position's logits with one pass over the whole text without a cache. Greedy without the cache would
    # have chosen the same tokens if each position's argmax there is the token that follows.
    text = ids + our_tokens
    cache = model.new_cache()
    cached = [model(ids, cache=cache, all_logits=True)] + [model([t], cache=cache) for t in our_tokens]
    cached = np.concatenate(cached)  # [len(text), n_vocab]
    uncached = model(text, all_logits=True)
    cache_logits = compare(cached, uncached, atol, rtol, positions=len(text))
    steps = uncached[len(ids) - 1:len(text) - 1]  # the logits each continuation token was chosen from
    no_cache_greedy = judge_tokens(our_tokens, [int(x) for x in np.argmax(steps, axis=-1)],
                                   lambda i: cached[len(ids) - 1 + i], atol, rtol)

    bad_logits = [r["position"] for r in logits if not r["ok"]]
    failures = ([r["layer"] for r in hidden if not r["ok"]]
                + ([f"the logits (at {len(bad_logits)} of {len(logits)} prompt positions, first {bad_logits[0]})"]
                   if bad_logits else [])
                + (["the greedy continuation"] if not greedy["ok"] else [])
                + ([] if cache_logits["ok"] and no_cache_greedy["ok"] else
                   ["picogpt with its KV cache against without"]))
    return dict(
        model=str(model.path), reference_model=str(ref_file.path), hparams=h, n_params=model.n_params,
        precision=model.precision.note if getattr(model, "precision", None) else "float32 weights",
        picogpt_blas=blas.describe(), torch=torch.__version__, transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(), prompt=prompt, prompt_ids=ids, n_tokens=n,
        atol=atol, rtol=rtol, hidden_states=hidden, logits=logits, greedy=greedy,
        cache=dict(logits=cache_logits, greedy=no_cache_greedy),
        first_divergence=failures[0] if failures else None, failures=failures, ok=not failures,
        seconds=dict(load=loaded - started, compare=time.perf_counter() - loaded))


# --- the report ------------------------------------------------------------------------------------

def token_text(token):
    text = repr(decode([token]))
    return text if len(text) <= 16 else text[:15] + "…"


def row(label, r, width, position=True):
    pos = f"{r['worst_position']:>5}" if position else ""
    return (f"{label:<{width}}{pos}{r['max_abs_diff']:>10.1e}{r['max_abs_ref']:>10.1e}{r['tolerance']:>11.1e}"
            f"{r['mean_abs_diff']:>10.1e}  {'ok' if r['ok'] else 'OUT OF TOLERANCE'}")


def header(label, width, position=True):
    return (f"{label:<{width}}{'pos' if position else '':>{5 if position else 0}}{'max|Δ|':>10}{'max|ref|':>10}"
            f"{'tolerance':>11}{'mean|Δ|':>10}")


def describe_tokens(result, want_name, got_name):
    if result["identical"]:
        return f"identical, {result['n']} of {plural(result['n'], 'token')}: ok"
    i = result["first_difference"]
    what = (f"first differ at token {i}: {want_name} {result['expected']} {token_text(result['expected'])}, "
            f"{got_name} {result['got']} {token_text(result['got'])}; the reference's logits for the two are "
            f"{abs(result['reference_gap']):.1e} apart")
    if result["tie"]:
        return f"{what}, within the tolerance {result['tolerance']:.1e}: a near tie, either is float32 rounding " \
               f"(ok; {plural(result['n'] - i - 1, 'later token')} not compared)"
    return f"{what}, more than the tolerance {result['tolerance']:.1e}: MISMATCH"


def write_report(r, file=None):
    """Print a check's results as the report `picogpt parity` shows (to file, default standard output)."""
    file = file or sys.stdout
    h = r["hparams"]
    p = lambda *lines: print(*lines, sep="\n", file=file)  # noqa: E731
    p("picogpt against PyTorch on the same weights",
      f"model       {r['model']}: n_layer {h['n_layer']}, n_embd {h['n_embd']}, n_head {h['n_head']}, "
      f"n_ctx {h['n_ctx']}, n_vocab {h['n_vocab']} ({r['n_params'] / 1e6:.1f}M parameters)")
    if r["reference_model"] != r["model"]:
        p(f"reference   weights from {r['reference_model']}")
    p(f"picogpt     {r['picogpt_blas']}",
      f"PyTorch     torch {r['torch']}, transformers {r['transformers']}: GPT2LMHeadModel, CPU, float32, "
      f"{r['torch_threads']} thread{'s' if r['torch_threads'] != 1 else ''}",
      f"prompt      {plural(len(r['prompt_ids']), 'token')}: {one_line(repr(r['prompt']))}",
      f"weights     {r.get('precision', 'float32 weights')}",
      f"tolerance   max|Δ| <= {r['atol']:.0e} + {r['rtol']:.0e} x max|reference|, at each position"
      + (f" (int8 products: atol {INT8_ATOL:g}, rtol {INT8_RTOL:g}; float32's: {ATOL:g}, {RTOL:g})"
         if (r["atol"], r["rtol"]) == (INT8_ATOL, INT8_RTOL) else ""), "")

    width = max(16, max(len(x["layer"]) for x in r["hidden_states"]) + 2)
    p(f"hidden states after each layer, at the worst of the {len(r['prompt_ids'])} prompt positions (pos)",
      header("", width),
      *(row(x["layer"], x, width) for x in r["hidden_states"]), "")

    width = 22
    p("logits at each prompt position", header("position, token", width, position=False),
      *(row(f"{x['position']:>3}  {token_text(x['token'])}", x, width, position=False) for x in r["logits"]), "")

    g = r["greedy"]
    p(f"greedy continuation, {plural(r['n_tokens'], 'token')}")
    if r["n_tokens"]:
        p(f"  PyTorch   {one_line(repr(decode(g['reference_tokens'])))}",
          f"  picogpt   {one_line(repr(decode(g['picogpt_tokens'])))}",
          f"  {describe_tokens(g, 'PyTorch', 'picogpt')}")
    p("")

    c = r["cache"]
    p(f"KV cache: picogpt with it against without, logits at the worst of {c['logits']['positions']} positions",
      header("", width), row("logits", c["logits"], width))
    if r["n_tokens"]:
        p(f"  greedy without the cache: {describe_tokens(c['greedy'], 'with the cache', 'without')}")
    p("")

    p(f"took {r['seconds']['load']:.1f} s to load both models, {r['seconds']['compare']:.1f} s to run and "
      f"compare them")
    if r["ok"]:
        p("verdict: within tolerance (exit status 0)")
    else:
        first = r["first_divergence"]
        where = first
        if first.startswith("block "):
            i = first.split()[1]
            weights = f"h{i}/*" + (" and ln_f/*" if first.endswith("ln_f") else "")
            where = f"{first} (its output is the first hidden state out of tolerance; its weights are {weights})"
        elif first == "embeddings":
            where = "the embeddings, wte[ids] + wpe[positions], before any block"
        p(f"verdict: NOT within tolerance (exit status 1); first to diverge: {where}")
        if len(r["failures"]) > 1:
            more = r["failures"][1:]
            if len(more) > 6:
                more = more[:5] + [f"{len(more) - 5} more"]
            p(f"  also out of tolerance: {', '.join(more)}")
