"""What a new user meets: numbers given on the command line, scoring strides at the context's edge,
output to closed pipes and full disks, interrupted start-ups, requests too large for memory, prompts
from files and pipes, stop strings, batch headers, hints that work as printed.

Each test covers a class of input, not one value: the same kinds of mistake are tried with other values.
"""

import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_reference import hf_model, random_tensors, write_model_dat
from picogpt import cli
from picogpt.commands import arguments
from picogpt.commands import serve as serve_command
from picogpt.errors import BadArgument
from picogpt.scoring import score
from picogpt.store import load
from picogpt.tokenizer import EOT, encode

REPO = Path(__file__).resolve().parent.parent
HPARAMS = dict(n_vocab=50257, n_ctx=16, n_embd=16, n_head=2, n_layer=2)
TEXT = ("Return a new list containing all items from the iterable in ascending order. A custom key "
        "function can be supplied to customize the sort order, and the reverse flag can be set.")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model_dat(tmp_path_factory.mktemp("m") / "model.dat", HPARAMS, random_tensors(HPARAMS, seed=18))


def picogpt(*argv, input=None, env=None, timeout=120):
    """Run `python -m picogpt ARGV` as a user would: (status, stdout, stderr) as text."""
    done = subprocess.run([sys.executable, "-m", "picogpt", *map(str, argv)], input=input, capture_output=True,
                          text=True, env=env, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def usage_error(capsys, argv):
    """The one line of a command line refused as a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------
# Numbers: one rule per kind, exit 2, the same wording

# kind: (values it accepts, values it refuses)
KINDS = {
    arguments.non_negative_int: (["0", "7", "+3"], ["-1", "1.5", "x", "", "1e3"]),
    arguments.positive_int: (["1", "40"], ["0", "-3", "2.0", "many"]),
    arguments.positive_float: (["0.5", "1e-9", "3"], ["0", "-1", "nan", "inf", "x"]),
    arguments.non_negative_float: (["0", "2.5"], ["-0.1", "nan", "inf", "-inf"]),
    arguments.probability: (["1", "0.5", "1e-3"], ["0", "1.01", "nan", "-0.5"]),
    arguments.finite_float: (["-1", "0", "2.5"], ["nan", "inf", "x"]),
    serve_command.port_number: (["0", "8000", "65535"], ["-1", "65536", "80.5", "http"]),
}
# a command line each subcommand parses (it is never run: a bad number stops the parser first)
BASE_ARGV = {"generate": ["generate", "Hi"], "score": ["score", "t.txt"],
             "attention": ["attention", "Hi", "--layer", "0"],
             "verify": ["verify", "demo"], "convert-tf": ["convert-tf"], "convert-hf": ["convert-hf", "dir"],
             "parity": ["parity"], "bench": ["bench"], "explain": ["explain", "Hi"],
             "score-corpus": ["score-corpus", "d.jsonl", "--out", "o.jsonl"],
             "complete-corpus": ["complete-corpus", "d.jsonl", "--out", "o.jsonl"],
             "serve": ["serve"], "serve-bench": ["serve-bench"]}


def numeric_options():
    """(subcommand, option, kind) for every option of every subcommand that takes a number."""
    for name in cli.SUBCOMMANDS:
        make_parser, _ = cli.subcommand(name)
        for action in make_parser(f"picogpt {name}")._actions:
            assert action.type not in (int, float), f"picogpt {name} {action.option_strings}: use a kind of number"
            if action.type in KINDS:
                yield name, action.option_strings[-1], action.type


def test_every_number_option_has_a_kind():
    found = {(name, option) for name, option, _ in numeric_options()}
    assert {("generate", "--top-k"), ("generate", "--repetition-penalty"), ("score", "--stride"),
            ("generate", "--threads"), ("parity", "--atol"), ("bench", "--repeats"),
            ("generate", "--no-repeat-ngram-size"), ("complete-corpus", "--min-new-tokens")} <= found


@pytest.mark.parametrize("name, option, kind", list(numeric_options()))
def test_bad_numbers_are_usage_errors_in_one_wording(capsys, name, option, kind):
    accepted, refused = KINDS[kind]
    for text in accepted:
        assert kind(text) is not None
    for text in refused:
        err = usage_error(capsys, BASE_ARGV[name] + [f"{option}={text}"])
        assert option in err and f"expected {kind.__name__}, got {text!r}" in err, err


def test_number_kinds_refuse_without_argparse():
    for kind, (_, refused) in KINDS.items():
        for text in refused:
            with pytest.raises(argparse.ArgumentTypeError, match=f"^expected {kind.__name__}, got"):
                kind(text)


# ---------------------------------------------------------------------------------------------------
# Scoring strides at the context's edge, against Hugging Face's sliding-window recipe

def hf_sliding_window_log_probs(reference, ids, n_ctx, stride):
    """Per-token log-probabilities by the recipe of Hugging Face's guide "Perplexity of fixed-length
    models": {index in ids: log p(ids[index] | the window before it)} for the tokens it scores."""
    scored, prev_end = {}, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + n_ctx, len(ids))
        target_len = end - prev_end  # the window's last target_len tokens are its targets (labels != -100)
        window = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            log_probs = torch.log_softmax(reference(window).logits[0].double(), dim=-1)
        for j in range(max(1, end - begin - target_len), end - begin):  # labels shift: position j-1 predicts j
            scored[begin + j] = log_probs[j - 1, ids[begin + j]].item()
        prev_end = end
        if end == len(ids):
            break
    return scored


@pytest.fixture(scope="module")
def score_models(model_path):
    from picogpt.modelfile import open_model_file
    return load(model_path), hf_model(HPARAMS, open_model_file(model_path).tensors)


@pytest.mark.parametrize("stride", [1, 2, HPARAMS["n_ctx"] // 2, HPARAMS["n_ctx"] - 1])
def test_score_strides_within_the_context_match_hugging_faces_recipe(score_models, stride):
    model, reference = score_models
    ids = [EOT] + encode(TEXT)
    assert len(ids) > 2 * HPARAMS["n_ctx"]
    result = score(model, ids, stride=stride)
    expected = hf_sliding_window_log_probs(reference, ids, HPARAMS["n_ctx"], stride)
    assert sorted(expected) == list(range(1, len(ids)))  # every token but the first, once
    np.testing.assert_allclose(result.token_log_probs, [expected[i] for i in range(1, len(ids))], atol=2e-5)
    assert result.n_tokens == len(ids) - 1


@pytest.mark.parametrize("stride", [HPARAMS["n_ctx"], HPARAMS["n_ctx"] + 1, 10 * HPARAMS["n_ctx"]])
def test_score_strides_of_the_context_or_more_are_refused(score_models, model_path, tmp_path, capsys, stride):
    model, reference = score_models
    ids = [EOT] + encode(TEXT)
    # Hugging Face's recipe leaves tokens unscored there: windows that do not overlap start without context.
    assert len(hf_sliding_window_log_probs(reference, ids, HPARAMS["n_ctx"], stride)) < len(ids) - 1
    with pytest.raises(BadArgument, match=f"from 1 to {HPARAMS['n_ctx'] - 1}"):
        score(model, ids, stride=stride)
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    status = cli.main(["score", str(tmp_path / "t.txt"), "--stride", str(stride), "--model", str(model_path)])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and err.count("\n") == 1
    assert "the stride must be a whole number from 1 to 15 (less than the model's context of 16 tokens" in err


# ---------------------------------------------------------------------------------------------------
# Output to a closed pipe or a full disk; Ctrl-C while starting; memory

OUTPUT_COMMANDS = {  # a command of each kind of output: streamed text, a batch, a report, one line
    "stream": ["Hello", "-n", "12"],
    "batch": ["Hello", "-n", "4", "--num-samples", "2", "--temperature", "1", "--seed", "1"],
    "score": ["score", "-"],
    "verify": ["verify"],
}


def output_command(name, model_path):
    argv = OUTPUT_COMMANDS[name] + ([str(model_path)] if name == "verify" else ["--model", str(model_path)])
    return [sys.executable, "-m", "picogpt", *argv]


@pytest.mark.parametrize("name", OUTPUT_COMMANDS)
def test_output_to_a_closed_pipe_stops_quietly(model_path, name):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte, as with `| head -0`, or `| head -1` later
    try:
        done = subprocess.run(output_command(name, model_path), stdout=write_end, stderr=subprocess.PIPE,
                              input=TEXT.encode(), timeout=120)
    finally:
        os.close(write_end)
    assert done.stderr == b"" and done.returncode == 141  # 128 + SIGPIPE, as a shell reports such a tool


def test_output_cut_by_head_mid_stream(model_path):
    shell = f"{' '.join(map(str, output_command('stream', model_path)))} --ignore-eot -n 15 | head -c 1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, timeout=120)
    assert done.stderr == b"" and len(done.stdout) == 1 and done.returncode in (0, 141)


def own_device(tmp_path, name, minor):
    """A character device of our own in tmp_path with the numbers of /dev/null (minor 3) or /dev/full (7): a
    test never writes to the machine's own devices."""
    if not hasattr(os, "mknod") or os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    path = tmp_path / name
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    return path


@pytest.mark.parametrize("name", OUTPUT_COMMANDS)
def test_output_to_a_full_disk_is_one_line(model_path, tmp_path, name):
    with open(own_device(tmp_path, "full", 7), "wb") as full:
        done = subprocess.run(output_command(name, model_path), stdout=full, stderr=subprocess.PIPE,
                              input=TEXT.encode(), timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith("picogpt") and "cannot write the output: No space left on device" in err, err


INTERRUPT_IMPORT = """
import builtins, runpy, sys
real_import, (module, _, how) = builtins.__import__, sys.argv[1].partition(":")
def interrupted_import(name, *args, **kwargs):
    if name == module:
        if how != "as ImportError":
            raise KeyboardInterrupt  # what Ctrl-C does while that module is being imported
        try:  # an extension module interrupted inside its C initialisation reports it so (NumPy does)
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("PyCapsule_Import could not import module datetime")
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupted_import
script, sys.argv = sys.argv[2], ["picogpt", "Hello"]
if script == "-m":
    runpy.run_module("picogpt", run_name="__main__")
else:
    runpy.run_path(script, run_name="__main__")  # the console script pip installed
"""


CONSOLE_SCRIPT = Path(sys.executable).parent / "picogpt"


@pytest.mark.parametrize("module", ["numpy", "numpy:as ImportError", "tiktoken", "picogpt.cli"])
@pytest.mark.parametrize("how", ["-m", "console script"])
def test_ctrl_c_while_importing_is_one_line(module, how):
    if how == "console script" and not CONSOLE_SCRIPT.exists():
        pytest.skip(f"no console script at {CONSOLE_SCRIPT} (picogpt is not installed in this environment)")
    script = "-m" if how == "-m" else str(CONSOLE_SCRIPT)
    done = subprocess.run([sys.executable, "-c", INTERRUPT_IMPORT, module, script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 130 and done.stderr == "picogpt: interrupted\n", done.stderr


def test_ctrl_c_at_any_moment_of_start_up_leaves_no_traceback(model_path):
    """Real SIGINTs while NumPy is being imported (inside its C initialisation too) and later."""
    interrupted = 0
    for delay in (0, 0.01, 0.03, 0.1, 0.3, 0.8):
        process = subprocess.Popen([sys.executable, "-X", "importtime", *output_command("stream", model_path)[1:]],
                                   stdout=tempfile.TemporaryFile(), stderr=subprocess.PIPE, text=True)
        lines = []
        while not any("numpy" in line for line in lines):  # -X importtime: a line as each module is imported
            lines.append(process.stderr.readline())
            assert lines[-1], "".join(lines)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert "Traceback" not in err and process.returncode in (0, 130, -signal.SIGINT), (delay, err)
        interrupted += process.returncode != 0
    assert interrupted >= 3  # the signals did arrive while it was starting, not after it had finished


def test_requests_too_large_for_memory_are_refused_before_any_work(model_path, tmp_path):
    # 10 million samples of 500 tokens: terabytes of KV cache on any machine
    for argv in (["Hello", "--num-samples", "10000000", "-n", "500", "--temperature", "1"],
                 ["Hello", "--num-samples", "100000000", "-n", "1"]):
        started = time.perf_counter()
        status, out, err = picogpt(*argv, "--model", model_path, "--ignore-eot")
        assert status == 1 and out == "" and err.count("\n") == 1, err
        assert "need about" in err and "GB of memory" in err and "is available; ask for fewer samples" in err
        assert time.perf_counter() - started < 30  # refused up front, not after filling the memory
    many = tmp_path / "prompts.txt"
    many.write_text("Hello there\n" * 2_000_000)
    status, _, err = picogpt("--prompts-file", many, "-n", "9", "--model", model_path)
    assert status == 1 and "2000000 rows of up to" in err and "GB of memory" in err
    # Beam search is a batch of beams: the same check, naming the option to lower (it once grew to 24 GB)
    started = time.perf_counter()
    status, out, err = picogpt("Return a new list", "--num-beams", "100000", "-n", "2", "--model", model_path)
    assert status == 1 and out == "" and err.count("\n") == 1, err
    assert "100000 rows of up to" in err and "is available; use fewer beams" in err
    assert time.perf_counter() - started < 30


def test_the_drop_in_checks_memory_before_any_work(model_path):
    from picogpt.errors import PicogptError
    from picogpt.hf import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(model_path)
    ids = np.full((100_000, 3), 11)
    for options in (dict(), dict(do_sample=True, num_return_sequences=10), dict(num_beams=50)):
        with pytest.raises(PicogptError, match="GB of memory"):
            model.generate(ids, max_new_tokens=2, **options)


def test_memory_estimate_grows_with_every_dimension():
    from picogpt.memory import memory_needed
    base = sum(memory_needed(HPARAMS, 4, 8, 16).values())
    for changed in (dict(n_batch=8), dict(n_prompt=12), dict(n_positions=32)):
        args = dict(dict(n_batch=4, n_prompt=8, n_positions=16), **changed)
        assert sum(memory_needed(HPARAMS, **args).values()) > base
    no_cache = memory_needed(HPARAMS, 4, 8, 16, use_cache=False)
    assert no_cache["the KV cache"] == 0 and no_cache["activations"] > memory_needed(HPARAMS, 4, 8, 16)["activations"]


RSS_PROBE = """
import sys
from picogpt import load
from picogpt.generate import complete
from picogpt.memory import memory_needed
from picogpt.tokenizer import encode

def peak_rss():  # VmHWM: this process's peak since exec (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

model, prompt, n_batch, n_tokens = load("demo"), "The optional argument", int(sys.argv[1]), 5
complete(model, prompt, 2)  # imports, the tokenizer, the weights touched: not the batch's
before = peak_rss()
complete(model, prompt, n_tokens, num_samples=n_batch, temperature=1.0, top_p=0.9, seed=1)
n_prompt = len(encode(prompt))
print(peak_rss() - before, sum(memory_needed(model.hparams, n_batch, n_prompt, n_prompt + n_tokens).values()))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from Linux's /proc")
def test_memory_estimate_covers_what_a_sampled_batch_really_takes():
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, "100"], capture_output=True, text=True, timeout=300)
    grown, estimate = map(int, done.stdout.split())
    assert grown > 50e6  # the batch really took memory (100 rows x 50257 logits, float64 copies)
    assert grown <= estimate <= 3 * grown  # covers it, without refusing far more than it must


def test_memory_check_against_what_is_available(model_path, monkeypatch):
    from picogpt import generate, memory
    model = load(model_path)
    n_prompt = len(encode("Hi there"))
    needed = sum(memory.memory_needed(model.hparams, 3, n_prompt, n_prompt + 5).values())
    monkeypatch.setattr(memory, "available_memory", lambda: needed - 1)
    with pytest.raises(generate.PicogptError, match=f"3 rows of up to {n_prompt + 5} tokens need about"):
        generate.complete(model, "Hi there", 5, num_samples=3)
    with pytest.raises(generate.PicogptError, match="3 rows"):  # the token-level API checks the same
        generate.generate_batch(model, [encode("Hi there")] * 3, 5)
    monkeypatch.setattr(memory, "available_memory", lambda: needed)
    assert len(generate.complete(model, "Hi there", 5, num_samples=3)) == 3


# ---------------------------------------------------------------------------------------------------
# From the demo model to GPT-2: hints that work as printed, models found where they were fetched

TF_HPARAMS = dict(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=2)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A local copy of OpenAI's download site holding a small "124M" checkpoint in OpenAI's exact layout."""
    from httpserver import serve_directory
    from tf_fixture import write_tf_checkpoint
    root = tmp_path_factory.mktemp("mirror")
    write_tf_checkpoint(root / "124M", TF_HPARAMS, seed=18)
    with serve_directory(root) as server:
        yield server.url


def user_env(tmp_path, **extra):
    """The environment of a user whose per-user data folder is under tmp_path (nothing of the real one)."""
    env = {k: v for k, v in os.environ.items()  # nor of `make test` around the tests (a make inside would say so)
           if k not in ("PICOGPT_MODELS_DIR", "PICOGPT_BASE_URL", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return dict(env, XDG_DATA_HOME=str(tmp_path / "data-home"), **extra)


def hint(err, marker):
    """The command a message gives after `marker` ("fetch 124M with: "), without a trailing remark."""
    line = next(line for line in err.splitlines() if marker in line)
    return line.split(marker, 1)[1].split(" (or ")[0].strip()


def test_fetch_hint_works_as_printed_and_the_model_is_found_from_anywhere(tmp_path, mirror):
    env = user_env(tmp_path, PICOGPT_BASE_URL=mirror)
    somewhere, elsewhere = tmp_path / "somewhere", tmp_path / "elsewhere"
    somewhere.mkdir(), elsewhere.mkdir()
    run = dict(capture_output=True, text=True, env=env, timeout=300)
    first = subprocess.run([sys.executable, "-m", "picogpt", "Hello", "-n", "3"], cwd=somewhere, **run)
    assert first.returncode == 0 and "this is the small demo model" in first.stderr
    command = hint(first.stderr, "fetch 124M with: ")
    assert "convert-tf --model-size 124M" in command and "tools/" not in command and "picogpt[" not in command
    fetched = subprocess.run(["bash", "-c", command], cwd=somewhere, **run)  # exactly as printed
    assert fetched.returncode == 0, fetched.stderr
    model_dat = tmp_path / "data-home" / "picogpt" / "models" / "124M" / "model.dat"
    assert model_dat.is_file()
    after = subprocess.run([sys.executable, "-m", "picogpt", "Hello", "-n", "3"], cwd=elsewhere, **run)
    assert after.returncode == 0 and after.stderr == ""  # 124M, found from another folder: no notice
    from picogpt.generate import complete
    assert after.stdout == complete(load(model_dat), "Hello", 3) + "\n"


def test_install_hints_name_this_projects_packages(monkeypatch):
    from picogpt import hints
    for extra, package in (("convert", "tensorflow-cpu"), ("plot", "matplotlib"), ("parity", "torch"),
                           ("hf", "safetensors")):
        command = hints.install_command(extra)
        assert "-m pip install" in command and package in command and "picogpt[" not in command, command
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "tensorflow" else object())
    monkeypatch.chdir("/")
    command = hints.fetch_command("124M")
    assert command.startswith(hints.python_command()) and "pip install 'tensorflow-cpu" in command
    assert command.endswith("-m picogpt convert-tf --model-size 124M")


def test_every_printed_hint_names_no_other_projects_install():
    """No message in the package tells a user to `pip install 'picogpt[...]'` (another project has that name)
    or to run a tools/ script with a bare python."""
    for path in (REPO / "picogpt").glob("*.py"):
        text = path.read_text()
        assert "pip install 'picogpt[" not in text and 'pip install "picogpt[' not in text, path
        assert "python tools/" not in text, path


def test_make_fetch_then_make_run_uses_gpt2(tmp_path, mirror):
    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or not (venv / "bin" / "python").exists():
        pytest.skip("the tests do not run in a virtual environment for make's VENV")
    models = tmp_path / "my models"
    models.mkdir()
    make = ["make", "-s", "-C", str(REPO), f"VENV={venv}", "-o", f"{venv}/.installed-convert",
            "-o", f"{venv}/.installed", "-o", f"{venv}/bin/python"]  # this environment, as it is: no installs
    run = dict(capture_output=True, text=True, env=user_env(tmp_path), timeout=300)
    fetched = subprocess.run(make + ["fetch", "MODEL=124M", f"MODELS_DIR={models}", f"BASE_URL={mirror}"], **run)
    assert fetched.returncode == 0, fetched.stderr
    assert (models / "124M" / "model.dat").is_file()
    ran = subprocess.run(make + ["run", f"MODELS_DIR={models}", "N=4", "PROMPT=costs $HOME `echo x` it's"], **run)
    from picogpt.generate import complete
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    assert ran.stdout == complete(load(models / "124M" / "model.dat"), "costs $HOME `echo x` it's", 4) + "\n"


def test_named_models_folder_that_does_not_exist_is_an_error(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "modles"
    (tmp_path / "t.txt").write_text(TEXT)
    for argv in (["Hi"], ["Hi", "--model", "124M"], ["score", str(tmp_path / "t.txt")], ["verify", "124M"]):
        assert cli.main(argv + ["--models-dir", str(missing)]) == 1
        out, err = capsys.readouterr()
        assert f"the models folder {missing} (given by --models-dir) does not exist" in err and out == "", err
    monkeypatch.setenv("PICOGPT_MODELS_DIR", str(missing))
    assert cli.main(["Hi"]) == 1
    assert "(named by $PICOGPT_MODELS_DIR) does not exist" in capsys.readouterr().err
    monkeypatch.delenv("PICOGPT_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "fresh-user"))  # the default folder may not exist yet
    assert cli.main(["Hi", "-n", "2"]) == 0
    assert "is not in " + str(tmp_path / "fresh-user" / "picogpt" / "models") in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Files left behind by a killed run

KILLED_WRITER = """
import os, signal, sys
from picogpt.modelfile import ModelFileWriter
sys.path.insert(0, {tests!r})
from hf_reference import random_tensors
hparams = {hparams!r}
with ModelFileWriter(sys.argv[1], hparams) as out:
    for i, (name, array) in enumerate(random_tensors(hparams, seed=1).items()):
        out.write(name, array)
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # killed outright mid-write: no handler runs
"""


def killed_conversion(path):
    code = KILLED_WRITER.format(tests=str(REPO / "tests"), hparams=HPARAMS)
    before = path.read_bytes() if path.exists() else None
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    left = [p for p in path.parent.iterdir() if p.name.endswith(".partial") and p.name.startswith(f".{path.name}.")]
    assert len(left) == 1 and left[0].name.startswith(f".{path.name}.")
    assert (path.read_bytes() if path.exists() else None) == before  # the old file, if any, is untouched
    return left[0]


def test_partial_files_of_killed_writers_are_removed_by_the_next_writer_and_by_verify(tmp_path, capsys):
    path = tmp_path / "model.dat"
    killed_conversion(path)
    write_model_dat(path, HPARAMS, random_tensors(HPARAMS, seed=2))  # the next conversion of the same file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.dat"]

    stale = killed_conversion(tmp_path / "other.dat")
    write_model_dat(tmp_path / "other.dat.bak", HPARAMS, random_tensors(HPARAMS, seed=2))
    assert stale.exists()  # a writer of another file leaves it alone
    assert cli.main(["verify", str(tmp_path / "model.dat")]) == 0
    assert stale.exists()
    killed = killed_conversion(path)
    assert cli.main(["verify", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"removed {killed}, left by a conversion that was killed" in err and not killed.exists()


def test_partial_files_of_live_writers_other_machines_and_unknown_origin_are_kept(tmp_path):
    from picogpt import outputs
    path = tmp_path / "model.dat"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [tmp_path / f".model.dat.{outputs._host()}.{sleeper.pid}.abc123.partial",  # a live writer
                tmp_path / f".model.dat.{outputs._host()}x.999999999.abc123.partial",  # another machine's
                tmp_path / ".model.dat.k2j4h5g6.partial",  # an older picogpt's: whose, unknown
                tmp_path / "model.ckpt.data-00000-of-00001.partial"]  # a download to resume
        gone = tmp_path / f".model.dat.{outputs._host()}.999999999.abc123.partial"  # no such process
        for p in keep + [gone]:
            p.write_bytes(b"x")
        assert outputs.remove_stale_partials(path) == [gone]
        assert all(p.exists() for p in keep) and not gone.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------------------
# Output paths checked before the work; hints that point the right way

def test_unwritable_outputs_are_refused_before_the_work(model_path, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    for target, problem in ((tmp_path / "no-such-folder" / "r.json", "does not exist"),
                            (tmp_path / "a-file" / "r.json", "is not a folder")):
        assert cli.main(["parity", "--model", str(model_path), "--prompt", "Hi", "-n", "2", "--json", str(target)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and f"cannot write {target}: the folder" in err and problem in err
        assert cli.main(["bench", "--quick", "--json", str(target)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and f"cannot write {target}" in err
    assert cli.main(["parity", "--model", str(model_path), "--prompt", "Hi", "-n", "2", "--json", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "parity.json").read_text())["ok"] is True  # a folder: the file goes in it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root may write anywhere")
def test_read_only_folder_is_refused_before_the_work(model_path, tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert cli.main(["parity", "--model", str(model_path), "--json", str(tmp_path / "ro" / "r.json")]) == 1
    assert "Permission denied" in capsys.readouterr().err


def test_attention_out_may_be_a_folder(tmp_path, capsys):
    assert cli.main(["attention", "Hello world", "--layer", "0", "--model", "demo", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "attn.png").stat().st_size > 1000
    assert f"wrote {tmp_path / 'attn.png'}" in capsys.readouterr().err


def test_model_paths_that_are_not_files(tmp_path, capsys):
    null = own_device(tmp_path, "null", 3)
    assert cli.main(["Hi", "--model", str(null)]) == 1
    err = capsys.readouterr().err
    assert f"{null} is not a regular file" in err and "does not exist" not in err


def test_a_damaged_demo_model_says_how_to_restore_it(tmp_path, capsys, monkeypatch):
    from picogpt import shipped
    data = tmp_path / "data"
    (data / "demo").mkdir(parents=True)
    (data / "demo" / "model.dat").write_bytes(shipped.demo_model_path().read_bytes()[:-10])
    monkeypatch.setattr(shipped, "data_dirs", lambda: [data])
    assert cli.main(["Hi", "--model", "demo"]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and "convert" not in err
    assert f"restore it with: git -C {REPO} checkout -- data/demo/model.dat" in err
    # the command would work as printed: git knows the checkout and the file (not run: it would discard a
    # developer's uncommitted demo model)
    done = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", "HEAD:data/demo/model.dat"], capture_output=True)
    assert done.returncode == 0


def test_advice_names_only_flags_the_command_has(model_path, capsys):
    assert cli.main(["parity", "--model", str(model_path), "-n", "5"]) == 1  # the 19-token prompt, a 16-token context
    err = capsys.readouterr().err
    assert "use a shorter --prompt or fewer tokens (-n)" in err and "--sliding-window" not in err
    assert cli.main(["Hello " * 20, "--model", str(model_path), "-n", "5"]) == 1
    assert "--sliding-window" in capsys.readouterr().err  # generate has it


# ---------------------------------------------------------------------------------------------------
# Surprises: sampling flags, prompts from pipes and files, stop strings, headers, --version, grammar

def test_sampling_flags_without_a_temperature_sample(model_path, capsys):
    for flags in (["--top-k", "40"], ["--top-p", "0.9"], ["--seed", "5"]):
        assert cli.main(["Hello", "-n", "12", "--model", str(model_path), "--ignore-eot", "-v", *flags]) == 0
        out, err = capsys.readouterr()
        assert "sampling: temperature 1," in err
        seed = int(err.split("the same text again: --seed ")[1].split(")")[0])
        top_k = int(flags[1]) if flags[0] == "--top-k" else None
        top_p = float(flags[1]) if flags[0] == "--top-p" else None
        from picogpt.generate import complete
        again = complete(load(model_path), "Hello", 12, stop_at_eot=False, temperature=1.0, top_k=top_k,
                         top_p=top_p, seed=seed)
        assert out == again + "\n"  # the seed -v showed gives the same text
    assert cli.main(["Hello", "-n", "6", "--model", str(model_path), "--num-samples", "3", "--ignore-eot"]) == 0
    samples = [block.split("\n", 1)[1] for block in capsys.readouterr().out.split("=== ")[1:]]
    assert len(samples) == 3 and len(set(samples)) > 1  # three samples, not one greedy text three times


@pytest.mark.parametrize("flags", [["--top-k", "40"], ["--seed", "1"], ["--num-samples", "2"], ["--top-p", "0.5"]])
def test_sampling_flags_with_temperature_zero_are_refused(model_path, capsys, flags):
    assert cli.main(["Hello", "--model", str(model_path), "--temperature", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flags[0]} only matters when sampling, and --temperature 0 is greedy" in err


def test_greedy_by_default_and_says_so(model_path, capsys):
    assert cli.main(["Hello", "-n", "3", "--model", str(model_path), "-v"]) == 0
    assert "sampling: none (greedy)" in capsys.readouterr().err


def test_a_prompt_from_a_pipe_or_a_file_continues_the_same_text_as_the_argument(model_path, tmp_path):
    argument = picogpt("The optional argument", "-n", "6", "--model", model_path)
    assert argument[0] == 0
    for piped in ("The optional argument\n", "The optional argument\r\n"):
        assert picogpt("-n", "6", "--model", model_path, input=piped) == argument
    (tmp_path / "p.txt").write_bytes("\ufeffThe optional argument\n".encode("utf-8"))  # as Notepad saves it
    assert picogpt("-f", tmp_path / "p.txt", "-n", "6", "--model", model_path) == argument
    status, _, err = picogpt("-f", tmp_path / "p.txt", "-n", "1", "--model", model_path, "-v")
    assert f"input tokens ({len(encode('The optional argument'))})" in err
    two = picogpt("-n", "6", "--model", model_path, "-v", input="The optional argument\n\n")[2]
    assert f"input tokens ({len(encode('The optional argument' + chr(10)))})" in two  # one line break kept


def test_a_byte_order_mark_is_not_scored(model_path, tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeff".encode() + TEXT.encode())
    (tmp_path / "plain.txt").write_bytes(TEXT.encode())
    assert picogpt("score", tmp_path / "bom.txt", "--model", model_path) == \
        picogpt("score", tmp_path / "plain.txt", "--model", model_path)


@pytest.mark.parametrize("given, meant", [("\\n", "\n"), ("\\n\\n", "\n\n"), ("\\t", "\t"), (".", "."),
                                          ("\\\\n", "\\n"), ("\\u2615", "\u2615"), ("caf\u00e9", "caf\u00e9")])
def test_stop_strings_read_escapes(given, meant):
    assert arguments.stop_text(given) == meant


def test_stop_newline_stops_at_a_line_break(capsys):
    assert cli.main(["Test if the address", "-n", "30", "--model", "demo"]) == 0
    full = capsys.readouterr().out[:-1]
    assert "\n" in full  # the demo model writes several lines here
    assert cli.main(["Test if the address", "-n", "30", "--model", "demo", "--stop", "\\n"]) == 0
    assert capsys.readouterr().out == full[:full.index("\n")] + "\n"


@pytest.mark.parametrize("bad", ["", "\\", "\\\n"])  # empty, a lone backslash, a backslash and a line break
def test_empty_or_broken_stop_strings_are_usage_errors(capsys, bad):
    err = usage_error(capsys, ["Hi", "--stop", bad])
    assert "argument --stop" in err


def test_batch_headers_name_the_prompt_and_its_line(model_path, tmp_path, capsys):
    long_prompt = "A very long prompt that goes on and on about nothing at all"
    (tmp_path / "p.txt").write_text(f"Hello there\n\n   \n{long_prompt}\n")
    assert cli.main(["--prompts-file", str(tmp_path / "p.txt"), "-n", "3", "--model", str(model_path),
                     "--num-samples", "2", "--seed", "1"]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("=== ")]
    assert headers == ["=== prompt 1/2 (line 1): 'Hello there', sample 1/2 ===",
                       "=== prompt 1/2 (line 1): 'Hello there', sample 2/2 ===",
                       f"=== prompt 2/2 (line 4): {long_prompt[:37]!r}..., sample 1/2 ===".replace("'...", "...'"),
                       f"=== prompt 2/2 (line 4): {long_prompt[:37]!r}..., sample 2/2 ===".replace("'...", "...'")]


def test_version_and_the_prompt_that_is_a_command_name(capsys):
    import picogpt
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith(f"picogpt {picogpt.__version__} (")
    assert cli.main(["generate", "score", "-n", "2", "--model", "demo"]) == 0
    generated = capsys.readouterr().out
    assert cli.main(["-n", "2", "--model", "demo", "--", "score"]) == 0
    assert capsys.readouterr().out == generated
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "picogpt generate PROMPT" in capsys.readouterr().out


def test_counts_in_messages_are_grammatical(model_path, capsys):
    assert cli.main(["Hello", "-n", "2", "--model", str(model_path), "-v", "--ignore-eot"]) == 0
    err = capsys.readouterr().err
    assert "for 1 step of 1 sequence," in err
    assert cli.main(["Hello", "-n", "1", "--model", str(model_path), "-v", "--ignore-eot"]) == 0
    assert "s, 1 new token\n" in capsys.readouterr().err
    assert cli.main(["", "-n", "16", "--model", str(model_path)]) == 1
    assert "the prompt (1 token) plus 16 new tokens exceed" in capsys.readouterr().err
    from picogpt.errors import plural
    assert [plural(n, "token") for n in (0, 1, 2)] == ["0 tokens", "1 token", "2 tokens"]


def test_running_out_of_memory_is_one_line(model_path, capsys, monkeypatch):
    from picogpt import generate

    def exhausted(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(generate, "choose_next", exhausted)  # memory that runs out in spite of the estimate
    assert cli.main(["Hello", "-n", "3", "--model", str(model_path)]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("picogpt: error: out of memory; ask for less at once")


def test_the_readmes_error_table_names_tests_that_exist():
    import ast
    page = (REPO / "docs" / "faults.md").read_text()  # the README's "When things go wrong" table, moved there
    table = page.split("# When things go wrong", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| bad input")]
    assert len(rows) > 30
    defined = {}
    for path in (REPO / "tests").glob("test_*.py"):
        defined[path.name] = {node.name for node in ast.walk(ast.parse(path.read_text()))
                              if isinstance(node, ast.FunctionDef)}
    for row in rows:
        cell = row.rstrip(" |").rsplit("|", 1)[1]
        current = None
        for ref in [r.strip("` ") for r in cell.split(",")]:
            name = ref.split(" ")[0].strip("`")
            if "::" not in name:
                continue
            file, test = name.split("::")
            current = file or current
            assert test in defined[current], f"docs/faults.md names {current}::{test}, which does not exist"


def test_a_fresh_clones_make_run_prints_only_the_notice_and_the_text(tmp_path):
    """The README's first command on a fresh clone (its committed state): a new venv, picogpt installed
    into it, the demo model's text on stdout and the one-line notice on stderr; nothing else."""
    import shutil
    if shutil.which("git") is None or shutil.which("make") is None or not (REPO / ".git").exists():
        pytest.skip("needs git, make and a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    done = subprocess.run(["make", "run"], cwd=clone, capture_output=True, text=True, env=user_env(tmp_path),
                          timeout=900)
    from picogpt.generate import complete
    from picogpt.shipped import demo_model_path
    assert done.returncode == 0, done.stderr
    assert done.stdout == complete(load(demo_model_path()), "The optional argument", 20) + "\n"  # make run's PROMPT
    models = tmp_path / "data-home" / "picogpt" / "models"
    assert done.stderr == (f"picogpt: GPT-2 124M is not in {models}/, so this is the small demo model trained on "
                           f"Python's documentation; fetch 124M with: make fetch MODEL=124M\n")


MISSING_MODULE = """
import builtins, runpy, sys
real_import = builtins.__import__
def without_tiktoken(name, *args, **kwargs):
    if name == "tiktoken":
        raise ModuleNotFoundError("No module named 'tiktoken'", name="tiktoken")  # a Python without it
    return real_import(name, *args, **kwargs)
builtins.__import__ = without_tiktoken
sys.argv = ["picogpt", "Hello"]
runpy.run_module("picogpt", run_name="__main__")
"""


def test_a_python_without_picogpts_requirements_gets_one_line():
    done = subprocess.run([sys.executable, "-c", MISSING_MODULE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"picogpt: error: tiktoken is not installed for {sys.executable}")


def test_the_required_modules_are_setup_cfgs():
    from picogpt.__main__ import REQUIRED_MODULES
    text = (REPO / "setup.cfg").read_text()
    block = text.split("install_requires =", 1)[1].split("\n\n", 1)[0]
    names = {line.strip().split(">")[0].split("=")[0].split("<")[0] for line in block.splitlines() if line.strip()}
    assert names == REQUIRED_MODULES


def test_sigterm_while_converting_leaves_no_partial_file(tmp_path):
    """A plain `kill` (SIGTERM) is handled like Ctrl-C: the half-written model.dat is deleted."""
    from tf_fixture import write_tf_checkpoint
    write_tf_checkpoint(tmp_path / "ckpt", TF_HPARAMS, seed=1)
    slow_writer = (  # the conversion, with every tensor written slowly so that the signal finds it writing
        "import sys, time; from picogpt import modelfile; write = modelfile.ModelFileWriter.write\n"
        "modelfile.ModelFileWriter.write = lambda self, *a: (print('writing', flush=True), time.sleep(0.2), "
        "write(self, *a))\n"
        "from picogpt.__main__ import main; sys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", slow_writer, "convert-tf", "--checkpoint-dir",
                                str(tmp_path / "ckpt")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    process.terminate()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and err.strip().endswith("picogpt convert-tf: terminated"), err
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if "model.dat" in p.name) == []


def test_converter_out_checked_before_converting(tmp_path, capsys):
    from conftest import convert_tf_main
    from tf_fixture import write_tf_checkpoint
    write_tf_checkpoint(tmp_path / "ckpt", TF_HPARAMS, seed=1)
    (tmp_path / "out").mkdir()
    assert convert_tf_main(["--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.dat").is_file()  # a folder: model.dat in it
    assert convert_tf_main(["--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "new" / "m.dat")]) == 0
    assert (tmp_path / "new" / "m.dat").is_file()  # a new folder is made, as for the models folder


def test_outputs_through_links_and_devices(model_path, tmp_path, capsys):
    real = tmp_path / "real.json"
    real.write_text("old")
    (tmp_path / "link.json").symlink_to(real)
    assert cli.main(["parity", "--model", str(model_path), "--prompt", "Hi", "-n", "1",
                     "--json", str(tmp_path / "link.json")]) == 0
    assert (tmp_path / "link.json").is_symlink() and json.loads(real.read_text())["ok"] is True
    null = own_device(tmp_path, "null", 3)
    capsys.readouterr()
    assert cli.main(["parity", "--model", str(model_path), "--prompt", "Hi", "-n", "1", "--json", str(null)]) == 0
    assert null.is_char_device()  # written into, not replaced


def test_stdin_closed(model_path):
    done = subprocess.run(f"{sys.executable} -m picogpt -n 2 --model {model_path} <&-", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr  # no stdin: the empty prompt
    done = subprocess.run(f"{sys.executable} -m picogpt score - --model {model_path} <&-", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "picogpt score: error: standard input is closed; give the text as a file"


def test_verify_of_a_size_not_fetched_names_its_fetch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["verify", "355M", "--models-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "model 355M is not in" in err and f"convert-tf --model-size 355M --models-dir {tmp_path}" in err


def test_make_run_passes_a_prompt_that_looks_like_an_option(tmp_path):
    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a virtual environment for make's VENV")
    make = ["make", "-s", "--no-print-directory", "-C", str(REPO), f"VENV={venv}", "-o", f"{venv}/.installed",
            "-o", f"{venv}/bin/python", "run", "MODEL=demo", "N=3"]
    from picogpt.generate import complete
    from picogpt.shipped import demo_model_path
    # an option's look, a line break (a shell syntax error once), quotes, $ and backquotes: all text
    for prompt in ("-v", "Return a\nnew list", "it's \"$HOME\" `id`\n\n"):
        done = subprocess.run(make + [f"PROMPT={prompt}"], capture_output=True, text=True, env=user_env(tmp_path),
                              timeout=120)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert done.stdout == complete(load(demo_model_path()), prompt, 3) + "\n"
    missing = subprocess.run(make[:-2] + ["MODEL=124M", f"MODELS_DIR={tmp_path}"], capture_output=True, text=True,
                             env=user_env(tmp_path), timeout=120)  # make cannot pass --download: not suggested
    assert missing.returncode != 0 and "make fetch MODEL=124M" in missing.stderr
    assert "--download" not in missing.stderr


def test_ctrl_c_while_the_arguments_are_read_is_one_line(monkeypatch, capsys):
    def interrupted_parse(self, *args, **kwargs):
        raise KeyboardInterrupt
    from picogpt.__main__ import main
    monkeypatch.setattr(arguments.ArgumentParser, "parse_args", interrupted_parse)
    assert main(["Hello"]) == 130
    assert capsys.readouterr().err == "picogpt: interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # --debug shows it, as everywhere
        main(["Hello", "--debug"])


def test_the_drop_ins_forward_checks_memory_before_any_work(model_path):
    """forward's logits are [batch, seq, n_vocab] float32: 100,000 rows of 12 tokens are some 240 GB."""
    from picogpt.errors import PicogptError
    from picogpt.hf import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(model_path)
    started = time.perf_counter()
    with pytest.raises(PicogptError, match="GB of memory .* give fewer rows or a shorter input at once"):
        model(np.full((100_000, 12), 11))
    assert time.perf_counter() - started < 10
    assert model(np.full((2, 5), 11)).logits.shape == (2, 5, HPARAMS["n_vocab"])  # a small one runs
