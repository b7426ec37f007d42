"""`python -m picogpt`: the command line over the Python API."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_reference import random_tensors, write_model_dat
from picogpt import cli
from picogpt.generate import Step, generate
from picogpt.store import default_models_dir, load
from picogpt.tokenizer import EOT, decode, encode

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Alan Turing theorized that computers would one day become very powerful, but even he could not imagine"
# GPT-2's real vocabulary, so any prompt tokenizes into it; a narrow model to stay fast.
HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model_dat(tmp_path_factory.mktemp("m") / "model.dat", HPARAMS, random_tensors(HPARAMS, seed=5))


def expected_text(model_path, prompt, n):
    model = load(model_path)
    return decode(generate(model, encode(prompt) or [EOT], n))


def test_prints_the_greedy_continuation(model_path, capsys):
    assert cli.main([PROMPT, "-n", "12", "--model", str(model_path)]) == 0
    out, err = capsys.readouterr()
    assert out == expected_text(model_path, PROMPT, 12) + "\n" and err == ""


def test_no_cache_prints_the_same(model_path, capsys):
    cli.main([PROMPT, "-n", "12", "--model", str(model_path)])
    cached = capsys.readouterr().out
    cli.main([PROMPT, "-n", "12", "--model", str(model_path), "--no-cache"])
    assert capsys.readouterr().out == cached


def test_verbose_reports_model_tokens_and_timings(model_path, capsys):
    cli.main([PROMPT, "-n", "5", "--model", str(model_path), "-v"])
    err = capsys.readouterr().err
    assert "input tokens (19): 36235 39141 18765" in err and "output tokens (5):" in err
    for word in ["parameters", "load:", "tokenizer:", "prefill:", "decode:", "tokens/s"]:
        assert word in err


def test_model_folder_and_models_dir_lookup(model_path, tmp_path, monkeypatch, capsys):
    (tmp_path / "355M").mkdir()
    os.link(model_path, tmp_path / "355M" / "model.dat")
    expected = expected_text(model_path, "Hello", 3) + "\n"
    assert cli.main(["Hello", "-n", "3", "--model", "355M", "--models-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == expected
    monkeypatch.setenv("PICOGPT_MODELS_DIR", str(tmp_path))
    assert cli.main(["Hello", "-n", "3", "--model", "355M"]) == 0
    assert capsys.readouterr().out == expected
    assert cli.main(["Hello", "-n", "3", "--model", str(tmp_path / "355M")]) == 0  # a folder holding model.dat
    assert capsys.readouterr().out == expected


def test_empty_prompt_starts_from_endoftext(model_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert cli.main(["", "-n", "4", "--model", str(model_path), "-v"]) == 0
    out, err = capsys.readouterr()
    assert f"input tokens (1): {EOT}" in err and out == expected_text(model_path, "", 4) + "\n"


def one_line_error(capsys, status, *needles):
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.startswith("picogpt: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_missing_model_says_how_to_fetch_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no make target, the command itself
    status = cli.main(["Hi", "--model", "124M", "--models-dir", str(tmp_path)])
    one_line_error(capsys, status, f"model 124M is not in {tmp_path}/",
                   f"-m picogpt convert-tf --model-size 124M --models-dir {tmp_path}", "--download")
    monkeypatch.chdir(REPO)  # in the checkout: its make target, which installs TensorFlow too
    status = cli.main(["Hi", "--model", "124M", "--models-dir", str(tmp_path)])
    one_line_error(capsys, status, f"fetch it with: make fetch MODEL=124M MODELS_DIR={tmp_path} (or add --download)")


def test_unknown_model_name_and_missing_path(tmp_path, capsys):
    one_line_error(capsys, cli.main(["Hi", "--model", "125M"]), "unknown model '125M'", "124M, 355M")
    one_line_error(capsys, cli.main(["Hi", "--model", str(tmp_path / "x.dat")]), "does not exist")


def test_prompt_longer_than_the_context(model_path, capsys):
    status = cli.main([PROMPT * 4, "-n", "5", "--model", str(model_path)])
    one_line_error(capsys, status, "exceed the model's context of 64 tokens")


@pytest.mark.parametrize("n", ["-1", "ten", "2.5"])
def test_bad_token_counts_are_usage_errors(model_path, capsys, n):
    with pytest.raises(SystemExit) as e:
        cli.main(["Hi", "-n", n, "--model", str(model_path)])
    assert e.value.code == 2 and "-n/--n-tokens" in capsys.readouterr().err


def test_multibyte_characters_split_across_tokens_print_whole(model_path, capsys, monkeypatch):
    text = "🦄 日本語"
    tokens = encode(text)
    assert len(tokens) > 3  # the characters span several byte-level tokens
    steps = (Step(np.array([token]), None) for token in tokens)  # decode_steps yields a Step of [n_batch] ids
    monkeypatch.setattr(sys.modules["picogpt.generate"], "decode_steps", lambda *a, **k: steps)
    pieces = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: pieces.append(s) or real_write(s))
    cli.main(["x", "-n", str(len(tokens)), "--model", str(model_path)])
    assert capsys.readouterr().out == text + "\n"
    assert "\ufffd" not in "".join(pieces) and len([p for p in pieces if p]) > 1


def test_download_flag_fetches_and_converts_a_missing_model(tmp_path, capsys):
    from tf_fixture import write_tf_checkpoint
    from httpserver import serve_directory
    write_tf_checkpoint(tmp_path / "mirror" / "124M", HPARAMS, seed=9)
    with serve_directory(tmp_path / "mirror") as server:
        status = cli.main(["Hello", "-n", "3", "--models-dir", str(tmp_path / "models"), "--download",
                           "--base-url", server.url])
    assert status == 0
    out = capsys.readouterr().out
    assert out == expected_text(tmp_path / "models" / "124M" / "model.dat", "Hello", 3) + "\n"


def test_python_m_picogpt_runs_as_a_process(model_path):
    done = subprocess.run([sys.executable, "-m", "picogpt", PROMPT, "-n", "6", "--model", str(model_path), "-v"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_text(model_path, PROMPT, 6) + "\n" and "imports:" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "picogpt", "Hi", "--model", "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


REAL_124M = default_models_dir() / "124M" / "model.dat"  # where make fetch puts it


def real_124m_is_float32():
    from picogpt.modelfile import open_model_file
    return REAL_124M.exists() and open_model_file(REAL_124M).weight_dtype == "f32"


@pytest.mark.skipif(not real_124m_is_float32(), reason=f"GPT-2 124M in float32 is not at {REAL_124M} (the golden "
                    f"tokens are float32's); fetch it with make fetch")
@pytest.mark.parametrize("prompt, golden", [
    (PROMPT, [703, 484, 561, 307, 1498, 284, 466, 523, 13, 198, 198, 1, 40, 892, 326, 262, 749, 1593, 1517, 318]),
    ("San Francisco is", [257, 1748, 286, 517, 621, 352, 1510, 661]),
])
def test_golden_tokens_of_the_real_gpt2_124m(prompt, golden):
    """fastGPT's golden tokens: OpenAI's real 124M weights must continue these prompts exactly so."""
    model = load(REAL_124M)
    assert list(generate(model, encode(prompt), len(golden))) == golden


def test_the_readme_python_example_runs(model_path, capsys, monkeypatch):
    """The README's API example, then docs/python-api.md's, which goes on from it, run as written except
    that "124M" is a small random model here."""
    import picogpt
    readme = (REPO / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    real_load = picogpt.load
    monkeypatch.setattr(picogpt, "load", lambda name, **kw: real_load(model_path if name == "124M" else name, **kw))
    namespace = {}
    exec(code, namespace)
    assert capsys.readouterr().out == expected_text(model_path, "San Francisco is", 8)
    assert namespace["logits"].shape == (1, 50257) and namespace["cache"].length == len(namespace["ids"]) + 1

    # docs/python-api.md's example goes on in the same namespace: text streams, batches, scores, outputs.
    page = (REPO / "docs" / "python-api.md").read_text()
    exec(page.split("```python\n", 1)[1].split("```", 1)[0], namespace)
    model, ids, out = namespace["model"], namespace["ids"], namespace["out"]
    assert capsys.readouterr().out == "".join(namespace["stream_text"](model, "Hello", 20, stop=["\n"]))
    assert len(namespace["texts"]) == 2 and len(namespace["samples"]) == 4 and len(namespace["id_lists"]) == 2
    assert namespace["result"].n_tokens == len(ids) and namespace["result"].perplexity > 1
    assert out.logits.shape == (len(ids), 50257) and len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.attentions[0].shape == (4, len(ids), len(ids))


def test_without_model_it_uses_124m_if_fetched_else_the_demo_with_a_notice(model_path, tmp_path, capsys):
    from picogpt.shipped import demo_model_path
    assert cli.main(["Hello", "-n", "3", "--models-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == expected_text(demo_model_path(), "Hello", 3) + "\n"
    assert err.count("\n") == 1 and "demo model" in err and "make fetch MODEL=124M" in err
    assert cli.main(["Hello", "-n", "3", "--model", "demo", "--models-dir", str(tmp_path)]) == 0
    assert capsys.readouterr() == (out, "")  # asked for by name: no notice
    (tmp_path / "124M").mkdir()
    os.link(model_path, tmp_path / "124M" / "model.dat")
    assert cli.main(["Hello", "-n", "3", "--models-dir", str(tmp_path)]) == 0
    assert capsys.readouterr() == (expected_text(model_path, "Hello", 3) + "\n", "")
    os.unlink(tmp_path / "124M" / "model.dat")
    assert cli.main(["Hello", "-n", "3", "--model", "124M", "--models-dir", str(tmp_path)]) == 1
    assert "model 124M is not in" in capsys.readouterr().err  # named explicitly: an error, not the demo
