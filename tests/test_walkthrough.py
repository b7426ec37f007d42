"""docs/walkthrough.ipynb's text is true of the code: every function it names exists, its token ids, parameter
shapes and step shapes are what the code produces for GPT-2 124M, its commands run, and its code cells show
each step's function from its source and check it against the model's. (That the notebook runs top to
bottom is tests/test_notebook.py's.)

The notebook is the walkthrough's one text: its markdown cells, joined, are what is checked here."""

import importlib
import json
import math
import re
import shlex
from pathlib import Path

import pytest

import picogpt
from conftest import GPT2_124M_SHAPE
from picogpt.model import GPT2
from picogpt.modelfile import ModelFileWriter
from picogpt.store import load
from picogpt.tokenizer import encode
from picogpt.trace import tracing
from test_docs import LINK, anchors, without_code
from tf_fixture import random_weights, to_model_dat_names, variable_specs

DOC = Path(__file__).resolve().parent.parent / "docs" / "walkthrough.ipynb"
CELLS = json.loads(DOC.read_text(encoding="utf-8"))["cells"]
TEXT = "\n\n".join("".join(cell["source"]) for cell in CELLS if cell["cell_type"] == "markdown")
CODE = ["".join(cell["source"]) for cell in CELLS if cell["cell_type"] == "code"]
PROMPT = "Alan Turing theorized that"
# GPT-2 124M's vocabulary, context, layers and heads, but 48 wide: the commands in the walkthrough run
# on it unchanged (--layer 5, all 12 heads) in a fraction of a second.
MINI = dict(GPT2_124M_SHAPE, n_embd=48, layer_norm_epsilon=1e-5)


def referenced_names():
    return sorted(set(re.findall(r"`(picogpt(?:\.[A-Za-z_]\w*)+)`", TEXT)))


def resolve(dotted):
    """The object a dotted name refers to: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[n:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


def tables():
    """Every markdown table in the walkthrough: (header cells, rows of cells, offset in the text)."""
    found = []
    for match in re.finditer(r"(?:^\|.*\|\n)+", TEXT, flags=re.M):
        lines = match.group(0).strip().splitlines()
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
        found.append((cells[0], cells[2:], match.start()))
    return found


def shape(text):
    return tuple(int(n) for n in re.findall(r"\d+", text))


def code_lines():
    """The commands in the walkthrough's plain code blocks."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", TEXT, flags=re.M | re.S)
    return [line for lang, body in blocks if not lang for line in body.splitlines()
            if line.startswith(("python -m picogpt", "picogpt "))]


@pytest.fixture(scope="module")
def mini_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mini") / "model.dat"
    with ModelFileWriter(path, MINI) as out:
        for name, array in to_model_dat_names(random_weights(MINI, seed=5)).items():
            out.write(name, array)
    return path


def test_every_function_it_names_exists():
    names = referenced_names()
    assert len(names) >= 40
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"docs/walkthrough.ipynb names what the package does not have: {missing}"
    for required in ["picogpt.tokenizer.encode", "picogpt.model.layer_norm", "picogpt.model.positions_and_mask",
                     "picogpt.model.attention", "picogpt.model.split_heads", "picogpt.model.mha",
                     "picogpt.model.mlp", "picogpt.model.gelu", "picogpt.model.block", "picogpt.model.gpt2",
                     "picogpt.sampling.choose_next", "picogpt.model.KVCache", "picogpt.model.GPT2.new_cache",
                     "picogpt.generate.decode_steps", "picogpt.trace.trace", "picogpt.attention_plot.plot_attention"]:
        assert required in names


def test_sections_come_in_the_order_of_the_computation():
    headings = re.findall(r"^## (.*)$", TEXT, flags=re.M)
    order = ["Tokenization", "weights", "Embeddings", "transformer block", "Attention", "MLP with GELU",
             "Final layer norm and logits", "next token", "KV cache", "bandwidth floor", "Watch it run",
             "Attention pictures", "logit lens", "head off", "explain page", "Hugging Face", "change and re-run"]
    assert len(headings) == len(order) and all(word in h for word, h in zip(order, headings)), headings
    numbered = [int(h.split(".")[0]) for h in headings if h[0].isdigit()]
    assert numbered == list(range(1, len(headings))), headings  # 1. to 16., then the unnumbered last one
    for word in ["residual", "causal mask", "heads", "greedy", "prefill", "decode"]:
        assert word in TEXT.lower()


# The model's functions, in the order the walkthrough runs them: each is shown from its source and checked
# against the model's own step in the cells of its section, and none is pasted into a cell.
STEP_FUNCTIONS = ["positions_and_mask", "layer_norm", "linear", "split_heads", "attention", "softmax", "mha",
                  "gelu", "mlp", "block", "gpt2"]


def test_every_step_is_shown_from_its_source_run_and_checked_against_the_model():
    shown = [name for cell in CODE for name in re.findall(r"^show\((\w+)\)", cell, flags=re.M)]
    assert [name for name in shown if name in STEP_FUNCTIONS] == STEP_FUNCTIONS
    setup = next(cell for cell in CODE if "def show(" in cell)
    assert "inspect.getsource(function)" in setup and "np.testing.assert_allclose(yours, theirs" in setup
    for name in STEP_FUNCTIONS:
        (cell,) = [cell for cell in CODE if re.search(rf"^show\({name}\)", cell, flags=re.M)]
        calls = re.findall(rf"\b{name}\(", cell.replace(f"show({name})", ""))
        assert calls, f"the cell that shows {name} does not call it"
        assert "check(" in cell, f"the cell that shows {name} checks nothing against the model"
    for cell in CODE:
        pasted = re.findall(r"^\s*(?:def|class) (\w+)", cell, flags=re.M)
        assert not set(pasted) & (set(STEP_FUNCTIONS) | {"merge_heads", "TopK", "TopP", "choose_next"})
    assert not any(cell.get("outputs") or cell.get("execution_count") for cell in CELLS if cell["cell_type"] == "code")


def test_the_notebooks_links_resolve():
    targets = LINK.findall(without_code(TEXT))
    assert targets
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            continue
        path, _, anchor = target.partition("#")
        assert path, f"{target}: a link inside the notebook (its anchors differ between JupyterLab and GitHub)"
        resolved = (DOC.parent / path).resolve()
        assert resolved.exists(), f"{target}: no such file"
        assert not anchor or anchor in anchors(resolved), f"{target}: no heading gives #{anchor}"


def test_the_example_tokens_are_the_tokenizers():
    ids = encode(PROMPT)
    assert f"`{ids}`" in TEXT
    header, rows, _ = next(t for t in tables() if t[0][0] == "token")
    assert [c.strip("`") for c in header[1:]] == [picogpt.load_tokenizer().decode([i]) for i in ids]
    assert [int(c) for c in rows[0][1:]] == ids
    assert "id 50256 (`picogpt.tokenizer.EOT`)" in TEXT and picogpt.tokenizer.EOT == 50256


def test_hyper_parameters_weights_and_parameter_count():
    header, rows, _ = next(t for t in tables() if t[0][0] == "hyper-parameter")
    stated = {r[0].strip("`"): int(r[1]) for r in rows}
    assert stated == {**GPT2_124M_SHAPE, "MLP width": 4 * GPT2_124M_SHAPE["n_embd"]}
    assert header[2] == "demo"
    demo = load("demo").hparams
    assert {r[0].strip("`"): int(r[2]) for r in rows} == {
        **{name: demo[name] for name in GPT2_124M_SHAPE}, "MLP width": 4 * demo["n_embd"]}
    assert "`head_dim` = 768 / 12 = 64" in TEXT

    # The weights table against the tensors of a 124M checkpoint (model.dat names, block 0 for a block's).
    specs = {name.removeprefix("model/"): s[1:] if name.endswith("/w") else s
             for name, s, _ in variable_specs(GPT2_124M_SHAPE)}
    header, rows, _ = next(t for t in tables() if t[0][0] == "weights")
    listed = {}
    for names, shapes, _ in rows:
        names = re.findall(r"`([^`]+)`", names)
        shapes = [shape(s) for s in re.findall(r"\[[\d, ]+\]", shapes)]
        for i, name in enumerate(names):
            listed[name if name in specs else f"h0/{name}"] = shapes[0] if len(shapes) == 1 else shapes[i]
    expected = {name: s for name, s in specs.items() if "/" not in name or name.startswith(("h0/", "ln_f/"))}
    assert listed == expected
    n_params = sum(math.prod(s) for s in specs.values())
    assert f"That is {n_params:,} numbers" in TEXT and n_params == 124_439_808
    cache_bytes = GPT2_124M_SHAPE["n_layer"] * 2 * GPT2_124M_SHAPE["n_ctx"] * GPT2_124M_SHAPE["n_embd"] * 4
    assert f"{cache_bytes / 1e6:.1f} MB" in TEXT and "[1, 12, 1024, 64]" in TEXT


def test_the_shape_tables_are_what_the_tracer_sees_at_124m_widths():
    """Every step table, run through the tracer on a model of 124M's widths (one block: they repeat)."""
    hparams = dict(GPT2_124M_SHAPE, n_layer=1, layer_norm_epsilon=1e-5)
    model = GPT2(hparams, to_model_dat_names(random_weights(hparams, seed=1)))
    ids = encode(PROMPT)
    cache = model.new_cache()
    with tracing() as t:
        prefill = model(ids, cache=cache)
        model([int(prefill[-1].argmax())], cache=cache)
    traced = [{r.name: r for r in t.rows if r.pass_index == i} for i in (0, 1)]

    decode_starts = TEXT.index("**decode**")
    n_checked = 0
    for header, rows, offset in tables():
        if header != ["step", "function", "shape"]:
            continue
        seen = traced[offset > decode_starts]
        for name, function, stated in rows:
            step = name.strip("`")
            assert step in seen, f"the tracer has no step {step!r}"
            assert seen[step].shape == shape(stated), step
            resolve(re.match(r"`([\w.]+)`", function).group(1))
            n_checked += 1
    assert n_checked >= 25
    assert traced[0]["block 0 / mha / attention / softmax"].mean == pytest.approx(0.2)  # "1 / n_kv (0.2 ...)"
    assert model.forward(ids, all_logits=True).shape == (5, 50257)  # "[5, 50257]"
    assert model(ids).shape == (1, 50257)


def run_cli(line, model_path, capsys):
    from picogpt.cli import main

    argv = shlex.split(line)
    argv = argv[3:] if argv[:3] == ["python", "-m", "picogpt"] else argv[1:]
    status = main(argv + ["--model", str(model_path)])
    return status, capsys.readouterr()


def test_the_tracer_command_runs(mini_model_path, capsys):
    commands = code_lines()
    (line,) = [c for c in commands if "--trace" in c]
    status, captured = run_cli(line, mini_model_path, capsys)
    assert status == 0
    assert "block 11 / mha / attention / softmax" in captured.err and "logits" in captured.err
    assert "step" not in captured.out and captured.out.endswith("\n")  # stdout is only the text


def test_the_attention_commands_run(mini_model_path, tmp_path, monkeypatch, capsys):
    import matplotlib.image

    monkeypatch.chdir(tmp_path)
    commands = code_lines()
    lines = [c for c in commands if c.startswith("picogpt attention")]
    assert len(lines) == 2
    for line in lines:
        status, captured = run_cli(line, mini_model_path, capsys)
        assert status == 0, captured.err
        out = tmp_path / shlex.split(line)[shlex.split(line).index("--out") + 1]
        pixels = matplotlib.image.imread(out)
        assert pixels.shape[0] >= 300 and pixels[..., :3].var() > 0
    status, captured = run_cli('picogpt attention "x" --layer 12 --out a.png', mini_model_path, capsys)
    assert status == 1 and "layer 12 does not exist: this model has layers 0-11" in captured.err


def test_the_readme_leads_to_the_walkthrough_with_its_commands():
    readme = (DOC.parent.parent / "README.md").read_text(encoding="utf-8")
    assert "(docs/walkthrough.ipynb)" in readme and "make notebook" in readme
    assert not (DOC.parent / "walkthrough.md").exists(), "the walkthrough's one text is the notebook"
    explain = (DOC.parent / "explain.md").read_text(encoding="utf-8")  # the README's tracer commands moved there
    assert "(walkthrough.ipynb)" in explain
    pages = [readme] + [p.read_text(encoding="utf-8") for p in sorted(DOC.parent.glob("*.md"))]
    commands = code_lines()
    shown = [line.strip() for text in pages
             for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
             for line in block.splitlines() if "--trace" in line or line.startswith("picogpt attention")]
    shown_in_explain = [line for line in shown if line in explain]
    assert shown_in_explain, "docs/explain.md shows no tracer or attention command"
    assert all(line in commands for line in shown), "commands of README.md or docs/ differ from the walkthrough's"
