"""The package's layout: imports run one way (no circle, function-level imports included), every module
is importable under its own name and hidden by no other name, and every program is a subcommand."""

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

import picogpt
from picogpt import cli

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "picogpt"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
COMMANDS = sorted(f"commands.{p.stem}" for p in (PACKAGE / "commands").glob("*.py") if p.stem != "__init__")


def imported_modules(path):
    """The package's modules that a file imports, anywhere in it (functions included): "model" for
    picogpt/model.py, "commands.arguments" for picogpt/commands/arguments.py."""
    found = set()
    inside = path.parent.relative_to(PACKAGE).parts  # () for the package, ("commands",) below it
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] == "picogpt":
                parts = node.module.split(".")[1:]
            elif node.level >= 1:
                base = list(inside[:len(inside) - (node.level - 1)])
                parts = base + (node.module.split(".") if node.module else [])
            else:
                continue
            if parts and parts[0] == "commands" and len(parts) == 1:  # from .commands import x / from . import x
                found.update(f"commands.{alias.name}" for alias in node.names)
            elif parts:
                found.add(".".join(parts[:2]) if parts[0] == "commands" else parts[0])
            else:  # from . import a, b
                found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("picogpt.") and alias.name.count(".") >= 1)
    return found


def import_graph():
    graph = {name: imported_modules(PACKAGE / f"{name}.py") - {name} for name in MODULES}
    graph.update({name: imported_modules(PACKAGE / f"{name.replace('.', '/')}.py") - {name} for name in COMMANDS})
    # __init__ imports its public names' homes on first use (picogpt.__getattr__), and __main__ runs cli;
    # cli imports each subcommand's module (importlib) when it runs.
    graph["__init__"] = set(picogpt._HOMES.values())
    graph["__main__"] = imported_modules(PACKAGE / "__main__.py")
    graph["cli"] |= {f"commands.{module}" for module, _ in cli.SUBCOMMANDS.values()}
    return graph


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["store"] >= {"convert_tf", "download", "model"}  # the graph is really read
    assert graph["commands.generate"] >= {"commands.arguments", "generate", "beam"}
    known = set(MODULES) | set(COMMANDS)
    for name, imported in graph.items():  # every import names a module that exists (a function-level one too)
        assert imported <= known, f"{name} imports {sorted(imported - known)}, which does not exist"
    assert graph["download"] & {"store", "convert_tf"} == set()
    assert find_cycle(graph) is None, f"modules import each other in a circle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself works


def test_the_command_line_sits_on_top():
    """Nothing in the package imports the command line: it is the top floor, over the Python API."""
    graph = import_graph()
    for name in set(MODULES) - {"cli"}:
        assert not graph[name] & ({"cli"} | set(COMMANDS)), f"picogpt/{name}.py imports the command line"
    for name in COMMANDS:
        assert "cli" not in graph[name], f"picogpt/{name.replace('.', '/')}.py imports picogpt.cli"


RUN_GENERATE = """
import runpy, sys
sys.argv = ["picogpt", "Hello", "-n", "2", "--model", "demo"]
try:
    runpy.run_module("picogpt", run_name="__main__")
except SystemExit as done:
    assert not done.code, done.code
print(" ".join(sorted(sys.modules)), file=sys.stderr)
"""


def test_continuing_a_prompt_imports_only_what_it_uses():
    """`picogpt "Hello" -n 2` loads neither the converters, the benchmark, the parity check, the
    PyTorch reference, corpus jobs, Ray, the explain page nor TensorFlow or PyTorch."""
    done = subprocess.run([sys.executable, "-c", RUN_GENERATE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stderr.split())
    assert "picogpt.commands.generate" in loaded and "picogpt.generate" in loaded  # the list is really read
    unwanted = {f"picogpt.{m}" for m in ("bench", "bench_corpus", "parity", "reference", "corpus", "corpus_ray",
                                          "explain", "explain_page", "attention_plot", "convert_tf", "convert_hf",
                                          "hf", "commands.compare", "commands.corpus", "commands.explain",
                                          "commands.models", "serve", "serve_ray", "scheduler", "bench_serve",
                                          "commands.serve")}
    unwanted |= {"tensorflow", "torch", "transformers", "ray", "matplotlib", "safetensors", "requests"} | NOTEBOOK_TOOLS
    unwanted |= SERVER_LIBRARIES
    assert not loaded & unwanted, f"imported for nothing: {sorted(loaded & unwanted)}"


# The notebook's tools (the test and notebook extras): the walkthrough notebook and its tests use them; the
# package shows itself in Jupyter through _repr_html_ and _repr_png_, which need no import of Jupyter's.
NOTEBOOK_TOOLS = {"IPython", "ipykernel", "ipywidgets", "jupyter_client", "jupyter_core", "jupyter_server",
                  "jupyterlab", "nbclient", "nbconvert", "nbformat", "notebook"}


# The server's libraries (the serve extra): only picogpt.serve and picogpt.serve_ray import them (and Ray only the
# latter), so that nothing but `picogpt serve` pays for them.
SERVER_LIBRARIES = {"fastapi", "uvicorn", "starlette", "sse_starlette"}


def test_only_the_server_imports_the_server_libraries():
    allowed = {"serve.py": SERVER_LIBRARIES, "serve_ray.py": SERVER_LIBRARIES | {"ray"}, "corpus_ray.py": {"ray"}}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            tops = {name.split(".")[0] for name in names} & (SERVER_LIBRARIES | {"ray"})
            assert tops <= allowed.get(path.name, set()), f"{path.relative_to(REPO)} imports {sorted(tops)}"


def test_no_module_or_subcommand_imports_the_notebooks_tools():
    """Not the core, not any subcommand, not even inside a function: read from every file's imports."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= len(MODULES) + len(COMMANDS)
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            tops = {name.split(".")[0] for name in names}
            assert not tops & NOTEBOOK_TOOLS, f"{path.relative_to(REPO)} imports {sorted(tops & NOTEBOOK_TOOLS)}"


def test_the_model_needs_only_the_math_below_it():
    """model.py is the math: it imports the BLAS switch and the exception type, not the file format."""
    assert import_graph()["model"] == {"blas", "errors"}


def test_every_module_imports_under_its_own_name_and_no_name_hides_one():
    for name in COMMANDS:
        assert importlib.import_module(f"picogpt.{name}").__name__ == f"picogpt.{name}"
    for name in MODULES:
        module = importlib.import_module(f"picogpt.{name}")
        assert isinstance(module, types.ModuleType) and module.__name__ == f"picogpt.{name}"
        assert getattr(picogpt, name) is module, f"picogpt.{name} is not the module picogpt/{name}.py"
    assert not set(picogpt.__all__) & set(MODULES)
    assert {name for name in picogpt.__all__ if callable(getattr(picogpt, name))} == set(picogpt.__all__)


def test_the_model_function_takes_the_math_and_returns_one_array():
    import inspect

    from picogpt import model
    assert list(inspect.signature(model.gpt2).parameters) == [
        "ids", "positions", "mask", "wte", "wpe", "blocks", "ln_f", "n_head", "eps", "cache", "last_only"]
    assert list(inspect.signature(model.block).parameters) == ["x", "layer", "n_head", "eps", "mask", "kv_cache"]


def test_every_program_is_a_subcommand_listed_in_the_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    listing = capsys.readouterr().out.split("commands (picogpt COMMAND --help for each):\n", 1)[1]
    listed = [line.split()[0] for line in listing.splitlines() if line.startswith("  ")]
    assert listed == list(cli.SUBCOMMANDS)
    assert {"generate", "score", "attention", "verify", "convert-tf", "convert-hf", "parity", "bench"} <= set(listed)


@pytest.mark.parametrize("subcommand", ["convert-tf", "convert-hf", "parity", "bench"])
def test_python_m_picogpt_subcommand_help(subcommand):
    done = subprocess.run([sys.executable, "-m", "picogpt", subcommand, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: picogpt {subcommand} "), done.stderr


@pytest.mark.parametrize("script, flag", [("convert_tf_checkpoint.py", "--model-size"),
                                          ("convert_hf_checkpoint.py", "--out"), ("parity.py", "--reference-model")])
def test_the_tools_scripts_keep_their_flags(script, flag):
    done = subprocess.run([sys.executable, str(REPO / "tools" / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {script[:-3]} ") and flag in done.stdout


def test_a_prompt_that_is_a_command_name_is_generated_with_generate(capsys):
    assert cli.main(["generate", "score", "-n", "2", "--model", "demo"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and err == ""
