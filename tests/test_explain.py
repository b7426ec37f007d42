"""picogpt explain without a browser: the data the page is drawn from, against Hugging Face's GPT-2 on the
same weights (attention weights, hidden states read through the logit lens, and heads switched off), the
page's file (self-contained, injection-safe, atomic, small) and the command's refusals.

The page itself, in a real browser, is tests/test_explain_browser.py.
"""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_reference import hf_model, random_tensors
from picogpt import explain_page, outputs
from picogpt.cli import main
from picogpt.explain import MAX_TOKENS, TOP, explain, parse_heads
from picogpt.model import GPT2
from picogpt.store import load
from picogpt.tokenizer import encode

HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=3, layer_norm_epsilon=1e-5)
PROMPT = "Alan Turing theorized that computers would one day become"
INJECTION = '</script><img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
ATOL = 1e-5  # attention weights and logits against PyTorch, float32 on both sides


@pytest.fixture(scope="module")
def small():
    tensors = random_tensors(HPARAMS, seed=7)
    return GPT2(HPARAMS, tensors), hf_model(HPARAMS, tensors)


def hf_run(reference, ids, heads_off=()):
    """Hugging Face's logits, attention weights and hidden states; heads_off (layer, head) switched off as
    transformers 4's head_mask did it (each such head's attention output zeroed before c_proj; transformers 5
    dropped the argument, so a pre-hook on the same model's c_proj does exactly that)."""
    head_dim = HPARAMS["n_embd"] // HPARAMS["n_head"]
    hooks = []
    for layer, head in heads_off:
        def zero(module, args, head=head):
            x = args[0].clone()
            x[..., head * head_dim:(head + 1) * head_dim] = 0
            return (x,)
        hooks.append(reference.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            out = reference(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    return out


def test_attention_weights_are_hugging_faces(small):
    model, reference = small
    seen = explain(model, PROMPT)
    theirs = hf_run(reference, seen.ids)
    assert seen.attentions.shape == (3, 4, len(seen.ids), len(seen.ids))
    np.testing.assert_allclose(seen.attentions, np.stack([a[0].numpy() for a in theirs.attentions]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(seen.attentions.sum(-1), 1, atol=1e-5)
    assert (np.triu(seen.attentions, k=1) == 0).all()  # the causal mask: nothing looks ahead
    np.testing.assert_allclose(seen.next_logits, theirs.logits[0, -1].numpy(), atol=1e-4, rtol=0)


def test_logit_lens_reads_hugging_faces_hidden_states_and_ends_with_the_real_prediction(small):
    model, reference = small
    seen = explain(model, PROMPT)
    theirs = hf_run(reference, seen.ids)
    wte = reference.transformer.wte.weight
    ln_f = reference.transformer.ln_f
    assert seen.lens_ids.shape == seen.lens_probs.shape == (4, len(seen.ids), TOP)
    for row in range(3):  # hidden_states[row] is block row's input: the embedding, then each block's output
        with torch.no_grad():
            probs = torch.softmax(ln_f(theirs.hidden_states[row][0]) @ wte.T, -1).numpy()
        np.testing.assert_array_equal(seen.lens_ids[row], np.argsort(-probs, axis=-1, kind="stable")[:, :TOP])
        np.testing.assert_allclose(seen.lens_probs[row], np.take_along_axis(probs, seen.lens_ids[row], -1), atol=1e-5)
    final = torch.softmax(theirs.logits[0], -1).numpy()  # the last row is the model's own prediction
    np.testing.assert_array_equal(seen.lens_ids[-1], np.argsort(-final, axis=-1, kind="stable")[:, :TOP])
    np.testing.assert_allclose(seen.lens_probs[-1], np.take_along_axis(final, seen.lens_ids[-1], -1), atol=1e-5)


@pytest.mark.parametrize("heads", [[(0, 1)], [(1, 0), (2, 3), (2, 1)]])
def test_ablation_is_hugging_faces_head_mask(small, heads):
    model, reference = small
    seen = explain(model, PROMPT, ablate=heads)
    theirs = hf_run(reference, seen.ids, heads_off=heads)
    np.testing.assert_allclose(seen.ablated_logits, theirs.logits[0, -1].numpy(), atol=1e-4, rtol=0)
    assert not np.allclose(seen.ablated_logits, seen.next_logits, atol=1e-3)  # it did change something
    np.testing.assert_allclose(seen.next_logits, hf_run(reference, seen.ids).logits[0, -1].numpy(), atol=1e-4, rtol=0)
    # and the model itself is untouched afterwards: the trace's edit is gone
    np.testing.assert_array_equal(model(seen.ids, all_logits=True)[-1], seen.next_logits)


def test_sources_name_the_lines_that_ran():
    seen = explain(GPT2(HPARAMS, random_tensors(HPARAMS)), "Hello")
    root = Path(__file__).resolve().parent.parent
    assert set(seen.sources) == {"tokens", "attention", "lens", "next", "ablation"}
    for refs in seen.sources.values():
        for ref in refs:
            line = (root / ref["file"]).read_text(encoding="utf-8").splitlines()[ref["line"] - 1]
            assert line.strip() == ref["code"]
    attention = seen.sources["attention"][0]
    assert attention["function"] == "attention()" and "softmax(q·kᵀ / √head_dim + mask)·v" in attention["equation"]


def test_json_holds_exact_logits_and_rounded_pictures(small):
    model, _ = small
    seen = explain(model, PROMPT, ablate=[(0, 0)])
    data = json.loads(json.dumps(seen.to_json()))
    assert np.array_equal(np.array(data["next_logits"], dtype=np.float32), seen.next_logits)
    assert np.array_equal(np.array(data["ablated_logits"], dtype=np.float32), seen.ablated_logits)
    n = len(seen.ids)
    assert [len(row) for row in data["attention"][2][3]] == list(range(1, n + 1))  # the causal triangle only
    np.testing.assert_allclose(data["attention"][2][3][n - 1], seen.attentions[2, 3, n - 1], atol=5e-4)
    assert data["tokens"][1] == "\u2423Turing" and data["ids"] == encode(PROMPT)
    assert all(str(i) in data["vocab"] for i in np.ravel(data["lens"]["ids"]))


def test_page_is_one_file_that_fetches_nothing_and_keeps_hostile_text_as_data(small, tmp_path):
    model, _ = small
    path = explain_page.write_page(explain(model, INJECTION), tmp_path / "page.html")
    page = path.read_text(encoding="utf-8")
    assert len(re.findall(r"<script\b", page)) == 2  # the data and the page's own script, nothing else
    assert "<img" not in page and "window.pwned=2</script>" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no link to anything
    assert "default-src 'none'" in page
    assert page_data(path)["prompt"] == INJECTION  # the \u escapes read back as the prompt


class FrameParser(HTMLParser):
    """Every start tag of an HTML fragment, with its attributes (entities decoded, as a browser decodes them)."""

    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.mark.parametrize("prompt", [PROMPT, INJECTION + "\" onload=\"x()\" '&quot; </iframe><script>"])
def test_in_jupyter_it_shows_the_page_in_a_sandboxed_frame(small, prompt):
    """_repr_html_ is one <iframe> whose srcdoc is the page itself, exactly: nothing to fetch, and its
    script runs in an origin of its own (sandbox allow-scripts, never allow-same-origin), whatever the prompt."""
    from IPython.core.formatters import DisplayFormatter

    model, _ = small
    seen = explain(model, prompt, ablate=[(1, 2)])
    shown, _ = DisplayFormatter().format(seen)  # what IPython (a notebook cell's last line) shows
    fragment = shown["text/html"]
    assert fragment == seen._repr_html_()
    parser = FrameParser()
    parser.feed(fragment)
    parser.close()
    ((tag, attributes),) = parser.tags
    assert tag == "iframe" and attributes["sandbox"] == "allow-scripts"
    assert fragment.endswith("></iframe>") and fragment.count("<") == 2  # nothing of the page is markup here
    assert attributes["srcdoc"] == explain_page.render(seen.to_json())
    assert "default-src 'none'" in attributes["srcdoc"]
    assert shown["text/plain"].startswith("<Explanation of ") and "heads 1.2 switched off" in shown["text/plain"]
    assert len(shown["text/plain"]) < 200 + len(prompt)


def test_a_prompt_holding_a_slot_name_stays_text(small, tmp_path):
    model, _ = small
    page = explain_page.render(explain(model, "@SCRIPT@ @DATA@ @STYLE@").to_json())
    assert page.count("use strict") == 1


def test_page_of_124m_shaped_weights_and_64_tokens_is_under_5_mb(model_124m_shape, tmp_path):
    model = load(str(model_124m_shape[0]))
    prompt = " ".join(["word"] * 64)
    assert len(encode(prompt)) == 64
    path = explain_page.write_page(explain(model, prompt, ablate=[(11, 11)]), tmp_path / "page.html")
    assert path.stat().st_size < 5_000_000


def test_command_writes_the_page_and_says_where(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "The optional argument", "--model", "demo", "--json", "data.json"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"wrote explain\.html \(\d+\.\d MB, 3 tokens, [\d.]+ s\) and data\.json; open it", err)
    data = json.loads((tmp_path / "data.json").read_text(encoding="utf-8"))
    assert data["prompt"] == "The optional argument" and data["model"]["name"] == "demo"
    assert data["command"] == "picogpt explain 'The optional argument' --model demo --json data.json"
    assert page_data(tmp_path / "explain.html") == data  # the page is drawn from exactly the JSON file's data
    assert main(["explain", "Hi", "--model", "demo", "--out", str(tmp_path)]) == 0  # a folder: explain.html in it
    assert page_data(tmp_path / "explain.html")["prompt"] == "Hi"


def page_data(path):
    """The JSON a page is drawn from."""
    page = Path(path).read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="picogpt-data">(.*?)</script>', page, re.S).group(1))


@pytest.mark.parametrize("argv, code, message", [
    (["--ablate", "1"], 2, "--ablate: takes LAYER.HEAD pairs such as 1.0,3.2 (numbers from 0), not '1'"),
    (["--ablate", "1.x"], 2, "not '1.x'"),
    (["--ablate", "99.0"], 2, "head 99.0 does not exist: this model has layers 0-"),  # a usage error, as the others
    (["--ablate", "0.99"], 2, "head 0.99 does not exist"),
    (["--ablate", "99.99"], 2, "head 99.99 does not exist"),
])
def test_unknown_or_malformed_heads_are_refused_in_one_line(tmp_path, capsys, argv, code, message):
    try:
        status = main(["explain", "Hello", "--model", "demo", "--out", str(tmp_path / "x.html"), *argv])
    except SystemExit as e:  # argparse's refusals
        status = e.code
    assert status == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.html").exists()


def test_long_and_empty_prompts_are_refused(tmp_path, capsys):
    long_prompt = " word" * (MAX_TOKENS + 1)
    assert main(["explain", long_prompt, "--model", "demo", "--out", str(tmp_path / "x.html")]) == 2
    assert f"the prompt is {MAX_TOKENS + 1} tokens; explain shows at most {MAX_TOKENS}" in capsys.readouterr().err
    assert main(["explain", "", "--model", "demo", "--out", str(tmp_path / "x.html")]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_ctrl_c_while_writing_leaves_no_page(tmp_path, capsys, monkeypatch):
    (tmp_path / "explain.html").write_text("the page from before")

    def half_then_ctrl_c(path, data):  # the real atomic writer, interrupted halfway through the page
        with outputs.atomic_output(path) as f:
            f.write(data[:len(data) // 2])
            raise KeyboardInterrupt
    monkeypatch.setattr(explain_page, "write_atomically", half_then_ctrl_c)
    assert main(["explain", "Hello", "--model", "demo", "--out", str(tmp_path / "explain.html")]) == 130
    assert (tmp_path / "explain.html").read_text() == "the page from before"
    assert [p.name for p in tmp_path.iterdir()] == ["explain.html"]  # no partial file beside it


def test_parse_heads():
    assert parse_heads("1.0, 3.2,") == [(1, 0), (3, 2)]
