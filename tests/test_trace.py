"""The step tracer: every block with the right shapes, statistics equal to NumPy's on the real
intermediate values, and picogpt.model left exactly as it was once a trace ends (even by an exception)."""

import io
import threading

import numpy as np
import pytest

import picogpt.model as M
from picogpt.errors import PicogptError
from picogpt.generate import generate
from picogpt.model import GPT2
from picogpt.trace import TRACED, collect, format_trace, print_trace, statistics, trace, tracing
from tf_fixture import random_weights, to_model_dat_names

HPARAMS = dict(n_vocab=300, n_ctx=32, n_embd=48, n_head=6, n_layer=3, layer_norm_epsilon=1e-5)
IDS = [5, 6, 7, 8]
BLOCK_STEPS = ["ln_1", "mha / c_attn", "mha / q", "mha / k", "mha / v", "mha / attention / softmax",
               "mha / attention", "mha / merge_heads", "mha / c_proj", "mha", "x + mha", "ln_2",
               "mlp / c_fc", "mlp / gelu", "mlp / c_proj", "mlp"]


@pytest.fixture(scope="module")
def model():
    return GPT2(HPARAMS, to_model_dat_names(random_weights(HPARAMS, seed=3)))


def model_functions():
    return {name: value for name, value in vars(M).items() if callable(value)}


def stats_of(x):
    x = np.asarray(x, dtype=np.float64)
    return x.mean(), x.std(), np.abs(x).max()


def row(rows, name):
    (found,) = [r for r in rows if r.name == name]
    return found


def test_every_block_and_step_in_order_with_its_shape(model):
    rows = trace(model, IDS)
    expected = ["ids", "embed", "mask"]
    for i in range(3):
        expected += [f"block {i} / {step}" for step in BLOCK_STEPS] + [f"block {i}"]
    expected += ["ln_f", "logits"]
    assert [r.name for r in rows] == expected
    shapes = {r.name: r.shape for r in rows}
    assert shapes["ids"] == (1, 4)
    assert shapes["embed"] == shapes["block 2"] == shapes["block 1 / x + mha"] == (1, 4, 48)
    assert shapes["mask"] == (1, 1, 4, 4)
    assert shapes["block 0 / mha / c_attn"] == (1, 4, 144)
    assert shapes["block 1 / mha / q"] == shapes["block 1 / mha / attention"] == (1, 6, 4, 8)
    assert shapes["block 2 / mha / attention / softmax"] == (1, 6, 4, 4)
    assert shapes["block 0 / mlp / c_fc"] == shapes["block 0 / mlp / gelu"] == (1, 4, 192)
    assert shapes["ln_f"] == (1, 1, 48)  # only the last position is normalised when generating
    assert shapes["logits"] == (1, 1, 300)
    assert "4 new tokens after 0 cached" in row(rows, "ids").note
    assert "6 -inf of 16" in row(rows, "mask").note


def test_statistics_equal_numpy_on_the_intermediate_values(model):
    out = collect(model, IDS, all_logits=True)
    rows = trace(model, IDS, all_logits=True)
    checks = {"embed": out.hidden_states[0], "ln_f": out.hidden_states[-1], "logits": out.logits}
    for i in range(3):
        checks[f"block {i} / mha / attention / softmax"] = out.attentions[i]
        if i < 2:
            checks[f"block {i}"] = out.hidden_states[i + 1]  # block i's output is block i+1's input
    for name, value in checks.items():
        r = row(rows, name)
        assert r.shape[1:] == value.shape, name
        np.testing.assert_allclose((r.mean, r.std, r.max_abs), stats_of(value), rtol=1e-12, atol=1e-12,
                                   err_msg=name)

    # The embedding row, from the weights directly; softmax rows have mean 1 / n_kv.
    p = model.params
    np.testing.assert_allclose((row(rows, "embed").mean, row(rows, "embed").std),
                               stats_of(p["wte"][IDS] + p["wpe"][:4])[:2], rtol=1e-12)
    assert row(rows, "block 1 / mha / attention / softmax").mean == pytest.approx(1 / 4)

    # As generating runs it: ln_f and the logits see only the last position.
    rows = trace(model, IDS)
    np.testing.assert_allclose(row(rows, "ln_f")[2:5], stats_of(out.hidden_states[-1][-1:]), rtol=1e-12)
    np.testing.assert_allclose(row(rows, "logits")[2:5], stats_of(model(IDS)), rtol=1e-12)


def test_kept_values_are_the_outputs_themselves(model):
    out = collect(model, IDS)
    rows = trace(model, IDS, keep_values=True)
    np.testing.assert_array_equal(row(rows, "block 2 / mha / attention / softmax").value[0], out.attentions[2])
    np.testing.assert_array_equal(row(rows, "logits").value[0], out.logits)
    v = row(rows, "block 0 / ln_1").value
    assert v.dtype == np.float32
    np.testing.assert_allclose(row(rows, "block 0 / ln_1")[2:5], stats_of(v), rtol=1e-12)
    assert all(r.value is None for r in trace(model, IDS))


def test_a_decode_step_with_the_cache(model):
    cache = model.new_cache()
    with tracing() as t:
        model(IDS, cache=cache)
        model([9], cache=cache)
    decode = [r for r in t.rows if r.pass_index == 1]
    assert "1 new token after 4 cached" in decode[0].note
    shapes = {r.name: r.shape for r in decode}
    assert shapes["mask"] == (1, 1, 1, 5)
    assert shapes["block 0 / mha / q"] == shapes["block 0 / mha / k"] == (1, 6, 1, 8)
    assert shapes["block 0 / mha / attention / softmax"] == (1, 6, 1, 5)
    assert shapes["logits"] == (1, 1, 300)


def test_functions_are_the_same_objects_after_a_trace(model):
    """Tracing costs nothing when off: outside a trace, picogpt.model is exactly what it was."""
    before = model_functions()
    logits = model(IDS)
    with tracing():
        assert all(getattr(M, name) is not before[name] for name in TRACED)  # wrapped while active
        assert getattr(M.block, "__wrapped__") is before["block"]
        traced_logits = model(IDS)
    assert model_functions() == before and all(model_functions()[n] is f for n, f in before.items())
    np.testing.assert_array_equal(traced_logits, logits)  # tracing does not change a single bit
    trace(model, IDS)
    print_trace(model, IDS, file=io.StringIO())
    assert all(model_functions()[n] is f for n, f in before.items())


def test_an_exception_inside_a_trace_restores_the_functions(model, monkeypatch):
    before = model_functions()
    with pytest.raises(ZeroDivisionError):
        with tracing():
            model(IDS)
            1 / 0
    assert all(model_functions()[n] is f for n, f in before.items())

    def broken_gelu(x):  # a failure deep inside the forward pass, under three traced calls
        raise FloatingPointError("broken")
    monkeypatch.setattr(M, "gelu", broken_gelu)
    with pytest.raises(FloatingPointError):
        trace(model, IDS)
    assert M.gelu is broken_gelu and M.block is before["block"] and M.mlp is before["mlp"]
    monkeypatch.undo()
    with pytest.raises(PicogptError, match="vocabulary"):  # refused by forward before any step
        trace(model, [300])
    assert all(model_functions()[n] is f for n, f in before.items())
    assert [r.name for r in trace(model, IDS)][:3] == ["ids", "embed", "mask"]  # a new trace starts clean


def test_one_trace_at_a_time(model):
    with tracing() as outer:
        with pytest.raises(RuntimeError, match="already running"):
            with tracing():
                pass
        model(IDS)
    assert len(outer.rows) == 3 + 3 * 17 + 2
    assert M.block.__module__ == "picogpt.model" and not hasattr(M.block, "__wrapped__")


def test_other_threads_are_not_traced(model):
    results = []
    with tracing() as t:
        worker = threading.Thread(target=lambda: results.append(model(IDS)))
        worker.start()
        worker.join()
    assert t.rows == [] and results[0].shape == (1, 300)


def test_print_the_first_pass_then_stop_tracing(model):
    """What `--trace` does: wrap generation, print the prefill pass's table, run the rest untraced."""
    before = model_functions()
    out = io.StringIO()
    with tracing(file=out, passes=1) as t:
        tokens = list(generate(model, IDS, 3, stop_at_eot=False))
        assert all(getattr(M, n) is before[n] for n in TRACED)  # already restored after pass 1
    assert tokens == list(generate(model, IDS, 3, stop_at_eot=False))
    assert t.n_passes == 1 and {r.pass_index for r in t.rows} == {0}
    text = out.getvalue()
    assert text.splitlines()[0].split() == ["step", "shape", "mean", "std", "max|x|", "note"]
    assert "block 2 / mha / attention / softmax  [1, 6, 4, 4]" in text
    assert text.count("logits") == 1


def test_format_trace_is_an_aligned_table(model):
    rows = trace(model, IDS)
    lines = format_trace(rows).splitlines()
    assert len(lines) == len(rows) + 1
    shape_column = lines[0].index("shape")
    assert all(line[shape_column - 2:shape_column] == "  " and line[shape_column] == "[" for line in lines[1:])
    assert lines[1].split()[:3] == ["ids", "[1,", "4]"]  # token ids have no statistics
    top = format_trace(rows, depth=1).splitlines()
    assert [line.split()[0] for line in top[1:]] == ["ids", "embed", "mask"] + ["block"] * 3 + ["ln_f", "logits"]
    two = format_trace(rows + trace(model, [1]), depth=1).splitlines()
    assert two.count(top[0]) == 2 and "" in two  # a header and a blank line per pass


def test_statistics_skip_infinities_and_say_so():
    mean, std, max_abs, note = statistics(np.array([[0.0, -np.inf], [2.0, np.nan]], dtype=np.float32))
    assert (mean, std, max_abs) == (1.0, 1.0, 2.0)
    assert note == "1 -inf, 1 NaN of 4 (stats over the rest)"
    assert statistics(np.ones(3))[3] == ""
