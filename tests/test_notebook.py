"""docs/walkthrough.ipynb, the walkthrough a learner runs: executed top to bottom in a real Jupyter kernel
(nbclient and ipykernel, as JupyterLab runs it) on the demo model, in under a minute, where a cell that
raises fails the test, and every check the notebook makes of its steps against the model's is a cell that
would raise. Stored without outputs, so that the repository carries no stale numbers; its Hugging Face cell
skips cleanly without torch; and its HTML export (nbconvert) shows the explain page inline, drawn in
headless Chromium with no console error and nothing fetched.

`make test` installs nbformat, nbclient, nbconvert and ipykernel (the test extra); JupyterLab itself is the
notebook extra's (`make notebook`).
"""

import configparser
import contextlib
import importlib.util
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest

from picogpt.store import load

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "docs" / "walkthrough.ipynb"
PROMPT = "Alan Turing theorized that"
TIME_LIMIT_S = 60  # the budget for the whole notebook on the demo model, kernel start included


def cell(notebook, cell_id):
    (found,) = [c for c in notebook.cells if c.get("id") == cell_id]
    return found


def text_of(code_cell, name="stdout"):
    return "".join(o.text for o in code_cell.outputs if o.output_type == "stream" and o.name == name)


def torch_is_installed():
    return all(importlib.util.find_spec(name) for name in ("torch", "transformers"))  # (without importing them)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook, run top to bottom in a fresh kernel (from a scratch folder), and the seconds it took."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    started = time.perf_counter()
    client = nbclient.NotebookClient(notebook, timeout=TIME_LIMIT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path_factory.mktemp("run"))}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell raises
    return notebook, time.perf_counter() - started


def test_the_notebook_runs_top_to_bottom_in_under_a_minute(executed):
    notebook, seconds = executed
    print(f"docs/walkthrough.ipynb: executed in {seconds:.1f} s")
    assert seconds < TIME_LIMIT_S
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    noise = {c.id: text_of(c, "stderr") for c in code if text_of(c, "stderr")}
    assert not noise, f"cells wrote to stderr (a learner sees it): {noise}"

    # Each step was checked against the model's own values, and those checks said so.
    checks = [line for c in code for line in text_of(c).splitlines() if "= the model's step" in line]
    assert len(checks) >= 25 and any("'logits' [1, 5, 50257]" in line for line in checks)
    assert "[36235, 39141, 18765, 1143, 326]" in text_of(cell(notebook, "tokens"))
    assert "block 7 / mlp " in text_of(cell(notebook, "watch"))
    # The function's source, read from picogpt/model.py by inspect
    assert any("def layer_norm(x, g, b, eps):" in o.data.get("text/plain", "")
               for o in cell(notebook, "layer-norm").outputs if o.output_type == "display_data")
    assert "the decode step's logits are the uncached pass's" in text_of(cell(notebook, "cache"))
    bandwidth = text_of(cell(notebook, "bandwidth"))
    assert "GB/s" in bandwidth and "x the floor" in bandwidth and "GPT-2 124M: 494.6 MB a step" in bandwidth
    assert "TopP(p=0.9)" in text_of(cell(notebook, "sampling"))
    assert "after block 7" in text_of(cell(notebook, "lens"))
    assert "KL" in text_of(cell(notebook, "ablate"))

    # The attention pictures and the explain page, shown by the objects themselves
    for picture in ("picture-one", "picture-all"):
        (result,) = [o for o in cell(notebook, picture).outputs if o.output_type == "execute_result"]
        assert "image/png" in result.data
    (page,) = [o for o in cell(notebook, "page").outputs if o.output_type == "execute_result"]
    assert page.data["text/html"].startswith("<iframe srcdoc=") and 'sandbox="allow-scripts"' in page.data["text/html"]

    hugging_face = text_of(cell(notebook, "hugging-face"))
    if torch_is_installed():
        assert "verdict: within tolerance" in hugging_face
    else:
        assert hugging_face.startswith("skipped:")


def test_the_stored_notebook_carries_no_outputs():
    """So that the repository holds no stale numbers: the test above makes them afresh."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert notebook.metadata.kernelspec.name == "python3"
    assert len({c.id for c in notebook.cells}) == len(notebook.cells)


def test_the_hugging_face_cell_says_it_is_skipped_without_torch(monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = cell(notebook, "hugging-face").source
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as when it is absent
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "hugging-face cell", "exec"), {"model": load("demo"), "PROMPT": PROMPT})
    assert printed.getvalue().startswith("skipped: the comparison with Hugging Face needs torch and transformers "
                                         "(torch is not installed)")
    markdown = notebook.cells[notebook.cells.index(cell(notebook, "hugging-face")) - 1].source
    assert "Hugging Face" in markdown and "skips" in markdown


def test_make_notebook_installs_the_notebook_extra_and_opens_the_walkthrough(tmp_path):
    dry = subprocess.run(["make", "-n", "notebook", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    install = [i for i, line in enumerate(lines) if "pip install --quiet --quiet -e '.[notebook]'" in line]
    start = [i for i, line in enumerate(lines) if "/venv/bin/jupyter lab docs/walkthrough.ipynb" in line]
    assert install and start and install[0] < start[0], dry.stdout
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg", encoding="utf-8")
    extras = setup["options.extras_require"]
    assert {"jupyterlab>=4", "ipykernel>=6", "matplotlib>=3.6"} <= set(extras["notebook"].split())
    assert {"nbformat>=5.7", "nbclient>=0.8", "nbconvert>=7", "ipykernel>=6"} <= set(extras["test"].split())


def test_the_html_export_draws_the_explain_page_inline(executed, tmp_path):
    """The notebook as HTML (nbconvert's export, what `jupyter nbconvert --to html` writes), in Chromium: the
    explain page draws inside its sandboxed frame, with its tokens, no console error and nothing fetched."""
    pytest.importorskip("nbconvert", reason="nbconvert is not installed (pip install -e '.[test]')")
    page_tests = pytest.importorskip("test_explain_browser")
    if not (page_tests.BROWSER and page_tests.DRIVER):
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver packages")
    from nbconvert import HTMLExporter
    from selenium.webdriver.common.by import By

    notebook, _ = executed
    exporter = HTMLExporter()
    html, _ = exporter.from_notebook_node(notebook)
    path = tmp_path / "walkthrough.html"
    path.write_text(html, encoding="utf-8")
    browser = page_tests.start_browser()
    try:
        page_tests.open_page(browser, path)
        # nbconvert's own page asks a CDN for require.js and MathJax, which fail offline; nothing else may.
        theirs = (exporter.require_js_url, exporter.mathjax_url)
        errors = [e for e in page_tests.console_errors(browser) if not e["message"].startswith(theirs)]
        assert errors == []
        (frame,) = browser.find_elements(By.TAG_NAME, "iframe")
        assert frame.get_attribute("sandbox") == "allow-scripts"
        assert len(browser.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png']")) >= 2  # the pictures
        browser.switch_to.frame(frame)
        tokens = [b.find_element(By.CSS_SELECTOR, "span").text
                  for b in browser.find_elements(By.CSS_SELECTOR, "#tokens button")]
        assert tokens == ["Alan", "\u2423Turing", "\u2423theor", "ized", "\u2423that"]
        assert browser.execute_script("return window.picogpt.data.prompt") == PROMPT
        assert browser.execute_script("return document.getElementById('attention-grid').width") > 0
        assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
        assert browser.execute_script("return window.location.origin") == "null"  # its own origin, sandboxed
        assert browser.find_elements(By.CSS_SELECTOR, "#ablation-table tr[data-id]")  # the head switched off
        browser.switch_to.default_content()
        assert page_tests.console_errors(browser) == []
    finally:
        browser.quit()
