"""Bad input and faults: every failure is one line naming the problem and the fix, with a non-zero exit
and no traceback, and nothing half-written is left looking valid. The "When things go wrong" table of
docs/faults.md lists these cases; each row names the test here that checks it."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import convert_tf_main
from hf_reference import random_tensors, write_model_dat
from httpserver import Fault, serve_directory
from picogpt import cli
from picogpt.errors import PicogptError
from picogpt.modelfile import PREAMBLE, open_model_file

REPO = Path(__file__).resolve().parent.parent
HPARAMS = dict(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return write_model_dat(tmp_path_factory.mktemp("good") / "model.dat", HPARAMS, random_tensors(HPARAMS, seed=2))


def damaged_copy(good_model, tmp_path, damage):
    path = tmp_path / "model.dat"
    path.write_bytes(damage(good_model.read_bytes()))
    return path


def header_edit(edit):
    def damage(raw):
        raw = bytearray(raw)
        _, _, header_len, _, _ = PREAMBLE.unpack(raw[:PREAMBLE.size])
        header = json.loads(raw[PREAMBLE.size:PREAMBLE.size + header_len])
        edit(header)
        raw[PREAMBLE.size:PREAMBLE.size + header_len] = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
        return bytes(raw)
    return damage


def error_line(capsys, status, expected_status=1):
    """The one line a failing command printed on stderr (and that it printed nothing else)."""
    out, err = capsys.readouterr()
    assert status == expected_status, err
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    return err


MODEL_FILE_CASES = {
    "truncated": (lambda raw: raw[:-100], "truncated"),
    "wrong magic": (lambda raw: b"NOTAMODEL" + raw[9:], "bad magic"),
    "newer format version": (lambda raw: raw[:8] + (7).to_bytes(4, "little") + raw[12:], "newer than this picogpt"),
    "hparams contradict the tensor table": (header_edit(lambda h: h["hparams"].update(n_layer=2)),
                                            "tensor names do not match"),
    "empty file": (lambda raw: b"", "bad magic"),
}


@pytest.mark.parametrize("case", MODEL_FILE_CASES)
def test_damaged_model_files(good_model, tmp_path, capsys, case):
    damage, message = MODEL_FILE_CASES[case]
    path = damaged_copy(good_model, tmp_path, damage)
    err = error_line(capsys, cli.main(["Hello", "--model", str(path)]))
    assert message in err and str(path) in err and ("picogpt convert-tf --help" in err or "upgrade" in err)


@pytest.mark.parametrize("argv, message", [
    (["Hi", "--model", "125M"], "unknown model '125M'"),
    (["Hi", "--model", "124M", "--models-dir", "/nonexistent-models"],
     "the models folder /nonexistent-models (given by --models-dir) does not exist"),
    (["Hi", "--model", "/nonexistent/model.dat"], "does not exist"),
])
def test_unknown_or_missing_models(capsys, argv, message):
    assert message in error_line(capsys, cli.main(argv))


@pytest.mark.parametrize("argv, message", [
    (["Hi", "-n", "-3"], "argument -n/--n-tokens: expected a whole number >= 0, got '-3'"),
    (["Hi", "-n", "many"], "expected a whole number >= 0, got 'many'"),
    (["Hi", "--no-such-flag"], "unrecognized arguments"),
    (["Hi", "--backend", "blis"], "invalid choice: 'blis'"),
])
def test_bad_arguments_are_one_line_with_status_2(good_model, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--model", str(good_model)])
    assert message in error_line(capsys, e.value.code, expected_status=2)


@pytest.mark.skipif(sys.platform == "darwin", reason="Accelerate exists on macOS")
def test_unavailable_backends(good_model, capsys):
    err = error_line(capsys, cli.main(["Hi", "--backend", "accelerate", "--model", str(good_model)]))
    assert "needs macOS" in err and "openblas or numpy" in err
    err = error_line(capsys, cli.main(["Hi", "--blas-lib", "/nonexistent/libblas.so", "--model", str(good_model)]))
    assert "no BLAS library at /nonexistent/libblas.so" in err


def test_onednn_missing(good_model, capsys, monkeypatch):
    """--backend onednn without oneDNN's wheel: one line with the command that installs it."""
    from picogpt import blas
    monkeypatch.setattr(blas, "onednn_library", lambda: None)
    err = error_line(capsys, cli.main(["Hi", "--backend", "onednn", "--model", str(good_model)]))
    assert "no oneDNN library found; install oneDNN's wheel (x86-64 only) with: " in err and "onednn" in err
    blas.use("numpy")


def test_prompt_plus_tokens_beyond_the_context(good_model, capsys):
    err = error_line(capsys, cli.main(["word " * 30, "-n", "5", "--model", str(good_model)]))
    assert "exceed the model's context of 32 tokens" in err


def test_prompt_files(good_model, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    err = error_line(capsys, cli.main(["-f", str(tmp_path / "latin1.txt"), "--model", str(good_model)]))
    assert "not UTF-8 text (byte 0xe9 at offset 3)" in err
    err = error_line(capsys, cli.main(["-f", str(tmp_path / "missing.txt"), "--model", str(good_model)]))
    assert "cannot read the prompt file" in err
    (tmp_path / "ok.txt").write_text("café ☕", encoding="utf-8")
    assert cli.main(["-f", str(tmp_path / "ok.txt"), "-n", "2", "--model", str(good_model)]) == 0


def test_non_utf8_standard_input(good_model):
    done = subprocess.run([sys.executable, "-m", "picogpt", "--model", str(good_model)], input=b"\xff\xfe bad",
                          capture_output=True)
    assert done.returncode == 1 and b"standard input is not UTF-8" in done.stderr
    assert done.stderr.count(b"\n") == 1


def test_output_path_that_cannot_be_written(tmp_path, capsys):
    from tf_fixture import write_tf_checkpoint
    write_tf_checkpoint(tmp_path / "ckpt", dict(HPARAMS, n_vocab=100), seed=1)
    (tmp_path / "a-file").write_text("not a folder")
    status = convert_tf_main(["--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a-file" / "m.dat")])
    assert "cannot write in" in error_line(capsys, status)


def test_models_dir_on_a_full_disk(tmp_path, capsys, monkeypatch):
    """A full disk, simulated: the space reservation fails the way a full file system fails it."""
    from tf_fixture import write_tf_checkpoint
    write_tf_checkpoint(tmp_path / "models" / "124M", dict(HPARAMS, n_vocab=100), seed=1)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    status = convert_tf_main(["--checkpoint-dir", str(tmp_path / "models" / "124M")])
    err = error_line(capsys, status)
    assert "No space left on device" in err and "MB needed" in err
    assert not [p for p in (tmp_path / "models" / "124M").iterdir() if "model.dat" in p.name]


def test_download_onto_a_full_disk(tmp_path, capsys, monkeypatch):
    from tf_fixture import write_tf_checkpoint
    write_tf_checkpoint(tmp_path / "mirror" / "124M", dict(HPARAMS, n_vocab=100), seed=1)
    real_open = open

    def open_full(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if str(file).endswith(".partial") and ("a" in mode or "w" in mode):
            def write(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            handle.write = write
        return handle
    monkeypatch.setattr("builtins.open", open_full)
    with serve_directory(tmp_path / "mirror") as server:
        status = convert_tf_main(["--models-dir", str(tmp_path / "models"), "--base-url", server.url, "--no-progress"])
    err = error_line(capsys, status)
    assert "No space left on device" in err or "no space left on device" in err
    assert not (tmp_path / "models" / "124M" / "model.dat").exists()


def default_ctrl_c():
    """In a test's child process: Ctrl-C does what it does in a shell. A child inherits an ignored SIGINT,
    and after the Ray tests' in-process cluster the test process's SIGINT can be ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_download_leaves_no_model(tmp_path):
    from tf_fixture import write_tf_checkpoint
    write_tf_checkpoint(tmp_path / "mirror" / "124M", dict(HPARAMS, n_vocab=100), seed=1)
    with serve_directory(tmp_path / "mirror") as server:
        server.faults["/124M/model.ckpt.data-00000-of-00001"] = Fault(stall=30)
        child = subprocess.Popen([sys.executable, str(REPO / "tools" / "convert_tf_checkpoint.py"), "--models-dir",
                                  str(tmp_path / "models"), "--base-url", server.url, "--no-progress"],
                                 stderr=subprocess.PIPE, text=True, preexec_fn=default_ctrl_c)
        deadline = time.monotonic() + 60
        while "/124M/model.ckpt.data-00000-of-00001" not in server.paths() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.strip() == "convert_tf_checkpoint: interrupted"
    left = sorted(p.name for p in (tmp_path / "models" / "124M").iterdir())
    assert "model.dat" not in left and "model.ckpt.data-00000-of-00001" not in left


def test_verify_command(good_model, tmp_path, capsys):
    assert cli.main(["verify", str(good_model)]) == 0
    assert "OK (" in capsys.readouterr().out
    flipped = damaged_copy(good_model, tmp_path, lambda raw: raw[:-9] + bytes([raw[-9] ^ 1]) + raw[-8:])
    assert "checksum mismatch" in error_line(capsys, cli.main(["verify", str(flipped)]))


def with_nan_weight(good_model, tmp_path):
    """A copy whose weights hold a NaN but whose checksum is right (as other software might write it)."""
    import hashlib
    raw = bytearray(good_model.read_bytes())
    wpe = open_model_file(good_model).tensors["ln_f/g"]
    offset = wpe.__array_interface__["data"][0] - np.asarray(wpe.base).__array_interface__["data"][0]
    raw[offset:offset + 4] = np.float32(np.nan).tobytes()
    raw[24:56] = hashlib.sha256(raw[PREAMBLE.size:]).digest()
    path = tmp_path / "nan.dat"
    path.write_bytes(bytes(raw))
    return path


def test_nan_weights_are_reported_not_decoded(good_model, tmp_path, capsys):
    path = with_nan_weight(good_model, tmp_path)
    assert "ln_f/g contains NaN" in error_line(capsys, cli.main(["verify", str(path)]))
    for options in ([], ["--num-beams", "2"], ["--temperature", "1"]):  # every decoding path checks each step
        err = error_line(capsys, cli.main(["Hello", "-n", "3", "--model", str(path), *options]))
        assert "NaN or infinite logits" in err and "picogpt verify" in err
    from picogpt.hf import GPT2LMHeadModel
    dropin = GPT2LMHeadModel.from_pretrained(path)
    for options in (dict(), dict(num_beams=2), dict(do_sample=True, seed=1)):
        with pytest.raises(PicogptError, match="NaN or infinite logits"):
            dropin.generate([[15496]], max_new_tokens=3, **options)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reader_never_reads_out_of_bounds_on_mutated_headers(good_model, tmp_path, data):
    """Random byte changes in the preamble and header either give a PicogptError or a file whose every
    tensor lies inside it; never another exception, never a read past the end."""
    raw = bytearray(good_model.read_bytes())
    _, _, header_len, _, _ = PREAMBLE.unpack(raw[:PREAMBLE.size])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, PREAMBLE.size + header_len - 1))
        raw[position] = data.draw(st.integers(0, 255))
    path = tmp_path / "mutated.dat"
    path.write_bytes(bytes(raw))
    try:
        model_file = open_model_file(path)
    except PicogptError as e:
        assert "\n" not in str(e)
        return
    size = path.stat().st_size
    for array in model_file.tensors.values():
        start = array.__array_interface__["data"][0] - np.asarray(array.base).__array_interface__["data"][0]
        assert 0 <= start and start + array.nbytes <= size


@settings(max_examples=200, deadline=None)
@given(argv=st.lists(st.one_of(st.sampled_from(["-n", "--model", "-v", "--no-cache", "--download", "-f", "verify",
                                                "generate", "--models-dir", "--debug", "--", "-"]),
                               st.text(max_size=12)), max_size=6))
def test_argument_parser_fails_only_with_usage_errors(argv):
    """Whatever the arguments, parsing ends in a namespace or a one-line usage error with status 2."""
    import contextlib
    import io
    from picogpt.commands.generate import generate_parser
    from picogpt.commands.models import verify_parser
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            if argv[:1] == ["verify"]:
                verify_parser("picogpt verify").parse_args(argv[1:])
            else:
                generate_parser().parse_args(argv[1:] if argv[:1] == ["generate"] else argv)
        except SystemExit as e:
            assert e.code in (0, 2)  # 0 for --help
            if e.code == 2:
                assert stderr.getvalue().count("\n") == 1


# ---------------------------------------------------------------------------------------------------
# Devices and pipes as outputs: written through where that makes sense, refused where not, never replaced.
# The nodes are this test's own, made in tmp_path (root may make them): never the machine's /dev.

@pytest.fixture
def nodes(tmp_path):
    """Our own character devices with /dev/null's and /dev/full's numbers, and a named pipe."""
    if not hasattr(os, "mknod") or os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    made = {"null": tmp_path / "null", "full": tmp_path / "full", "pipe": tmp_path / "pipe"}
    os.mknod(made["null"], 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(made["full"], 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    os.mkfifo(made["pipe"])
    yield made
    assert stat.S_ISCHR(os.stat(made["null"]).st_mode) and stat.S_ISCHR(os.stat(made["full"]).st_mode)
    assert stat.S_ISFIFO(os.stat(made["pipe"]).st_mode)  # still the nodes they were: nothing replaced them


def read_pipe(path):
    """A reader for a named pipe (a writer blocks until one opens it): a thread, and the bytes it got."""
    got = []
    reader = threading.Thread(target=lambda: got.append(Path(path).read_bytes()), daemon=True)
    reader.start()
    return reader, got


@pytest.mark.parametrize("node", ["null", "full", "pipe"])
def test_a_model_file_is_never_written_to_a_device_or_a_pipe(good_model, nodes, capsys, node):
    err = error_line(capsys, cli.main(["convert-dtype", str(good_model), "--to", "bf16", "--out", str(nodes[node])]))
    assert "not a file" in err and "needs a regular file" in err and "remove" not in err
    from picogpt.modelfile import ModelFileWriter  # the writer itself refuses, for a library caller
    with pytest.raises(PicogptError, match="needs a regular file"):
        with ModelFileWriter(nodes[node], HPARAMS):
            pass
    assert list(nodes[node].parent.glob(".*partial")) == []


def test_pages_and_json_are_written_through_devices_and_pipes(nodes, capsys):
    from picogpt.outputs import write_atomically
    assert cli.main(["explain", "Hi there", "--model", "demo", "--out", str(nodes["null"])]) == 0
    assert "wrote" in capsys.readouterr().err
    err = error_line(capsys, cli.main(["explain", "Hi there", "--model", "demo", "--out", str(nodes["full"])]))
    assert "No space left on device" in err and "remove" not in err
    reader, got = read_pipe(nodes["pipe"])
    assert cli.main(["explain", "Hi there", "--model", "demo", "--out", str(nodes["pipe"])]) == 0
    reader.join(timeout=30)
    assert got and got[0].startswith(b"<!DOCTYPE html>") and got[0].rstrip().endswith(b"</html>")
    reader, got = read_pipe(nodes["pipe"])
    write_atomically(nodes["pipe"], b'{"a": 1}\n')  # what parity --json and bench --json write with
    reader.join(timeout=30)
    assert got == [b'{"a": 1}\n']
    with pytest.raises(PicogptError, match="No space left on device"):
        write_atomically(nodes["full"], b"x")
    assert list(nodes["null"].parent.glob(".*partial")) == []


def test_no_rename_lands_on_a_device(nodes, tmp_path):
    """replace_onto is the rename of every atomic writer (pages, JSON, pictures, model files, downloads)."""
    from picogpt.outputs import replace_onto
    tmp = tmp_path / "done.partial"
    for node in nodes.values():
        tmp.write_bytes(b"complete")
        with pytest.raises(PicogptError, match="was left as it is"):
            replace_onto(tmp, node)
    target = tmp_path / "file"
    replace_onto(tmp, target)
    assert target.read_bytes() == b"complete"


def test_explain_refuses_one_file_for_the_page_and_its_json(tmp_path, capsys):
    page = tmp_path / "x.html"
    err = error_line(capsys, cli.main(["explain", "Hi", "--model", "demo", "--out", str(page), "--json",
                                       str(tmp_path / "." / "x.html")]), expected_status=2)
    assert "--json and --out both name" in err and not page.exists()


def test_a_read_only_output_file_is_named_as_such(tmp_path, capsys, monkeypatch):
    """Root writes any file, so the read-only mark is what os.access reports for a user."""
    page = tmp_path / "x.html"
    page.write_text("mine")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == page else real_access(p, mode))
    err = error_line(capsys, cli.main(["explain", "Hi", "--model", "demo", "--out", str(page)]))
    assert "the file is read-only" in err and "folder" not in err and page.read_text() == "mine"


# ---------------------------------------------------------------------------------------------------
# Text that is not valid Unicode: refused as a prompt in one line, shown escaped as a name

def picogpt_bytes(*argv, env=None):
    """Run `python -m picogpt` with arguments given as bytes (a shell passes any bytes): (status, out, err)."""
    done = subprocess.run([sys.executable, "-m", "picogpt", *argv], capture_output=True, timeout=300,
                          env=dict(os.environ, **(env or {})))
    return done.returncode, done.stdout, done.stderr.decode("utf-8", "replace")


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path):
    page = tmp_path / "x.html"
    for argv in ([b"Hello \xff there", b"-n", b"2"], [b"explain", b"Hello \xff there", b"--out", bytes(page)]):
        status, out, err = picogpt_bytes(*argv, b"--model", b"demo")
        assert status == 1 and out == b"" and err.count("\n") == 1 and "Traceback" not in err, err
        assert "not valid Unicode: it holds byte 0xff (not UTF-8) at character 6; give UTF-8 text" in err
    assert not page.exists()
    from picogpt.tokenizer import encode
    with pytest.raises(PicogptError, match=r"U\+D800 \(half of a UTF-16 surrogate pair\) at character 1"):
        encode("a\ud800")  # as JSON's "\ud800" decodes
    # a file whose name is not UTF-8, holding UTF-8 text, is read as any other
    named = Path(os.fsdecode(bytes(tmp_path) + b"/t\xfe.txt"))
    named.write_text("Hello there", encoding="utf-8")
    status, out, err = picogpt_bytes(b"score", os.fsencode(named), b"--model", b"demo")
    assert status == 0 and b"perplexity" in out, err


def test_names_that_are_not_utf8_are_shown_escaped_and_pages_stay_utf8(tmp_path):
    folder = bytes(tmp_path)
    model, page, data = folder + b"/m\xfe.dat", folder + b"/p\xfd.html", folder + b"/p\xfd.json"
    Path(os.fsdecode(model)).write_bytes((REPO / "data" / "demo" / "model.dat").read_bytes())
    status, out, err = picogpt_bytes(b"explain", b"Hi", b"--model", model, b"--out", page, b"--json", data)
    assert status == 0, err
    written = json.loads(Path(os.fsdecode(data)).read_bytes().decode("utf-8"))  # valid UTF-8 JSON
    assert written["model"]["file"].endswith("/m\\xfe.dat") and "'" + os.fsdecode(folder) in written["command"]
    assert "p\\xfd.html" in written["command"]
    Path(os.fsdecode(page)).read_bytes().decode("utf-8")  # the page too
    # stdout in strict UTF-8 (a UTF-8 locale): the name printed escaped, not a traceback
    status, out, err = picogpt_bytes(b"verify", model, env={"PYTHONIOENCODING": "utf-8:strict"})
    assert status == 0 and out.decode("utf-8").startswith(f"{os.fsdecode(folder)}/m\\xfe.dat: OK"), err
    status, out, err = picogpt_bytes(b"verify", folder + b"/gone\xff.dat")
    assert status == 1 and "gone\\xff.dat does not exist" in err and err.count("\n") == 1
