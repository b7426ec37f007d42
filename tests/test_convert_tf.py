"""The converter end to end: a TF checkpoint shaped exactly like OpenAI's, served over HTTP on 127.0.0.1,
downloaded, converted to model.dat, and run by the engine against Hugging Face on the same weights."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tf_fixture import to_model_dat_names, write_tf_checkpoint  # before anything imports TensorFlow: keeps its logging quiet
from conftest import assert_model_dat_holds, convert_tf_main
from httpserver import Fault, serve_directory
from picogpt import convert_tf
from picogpt.download import CHECKPOINT_FILES
from picogpt.store import load

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(n_vocab=500, n_ctx=64, n_embd=64, n_head=4, n_layer=2)


def assert_model_dat_equals(path, tf_variables):
    """The model.dat holds exactly the checkpoint's variables, under model.dat names."""
    return assert_model_dat_holds(path, to_model_dat_names(tf_variables))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A local mirror of OpenAI's bucket holding a small checkpoint under /124M/."""
    root = tmp_path_factory.mktemp("mirror")
    tf_variables = write_tf_checkpoint(root / "124M", SMALL, seed=7)
    return root, tf_variables


def test_download_and_convert_from_a_local_mirror(mirror, tmp_path, capsys):
    root, tf_variables = mirror
    with serve_directory(root) as server:
        status = convert_tf_main(["--model-size", "124M", "--models-dir", str(tmp_path / "models"),
                               "--base-url", server.url, "--no-progress"])
    assert status == 0
    out_dir = tmp_path / "models" / "124M"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(CHECKPOINT_FILES + ("model.dat",))
    for name in CHECKPOINT_FILES:
        assert (out_dir / name).read_bytes() == (root / "124M" / name).read_bytes()
    assert_model_dat_equals(out_dir / "model.dat", tf_variables)
    assert "wrote" in capsys.readouterr().err


def test_converted_model_matches_hugging_face_on_the_tf_weights(mirror, tmp_path):
    from test_model import PROMPT, check_parity
    from hf_reference import hf_model
    root, tf_variables = mirror
    convert_tf.convert_checkpoint(root / "124M", tmp_path / "model.dat")
    model = load(tmp_path / "model.dat")
    check_parity(model, hf_model(model.hparams, to_model_dat_names(tf_variables)), [t % 500 for t in PROMPT])


def test_a_cut_download_resumes_to_identical_bytes(mirror, tmp_path):
    root, tf_variables = mirror
    data = "/124M/model.ckpt.data-00000-of-00001"
    with serve_directory(root) as server:
        server.faults[data] = Fault(cut_after=(root / data[1:]).stat().st_size // 2, times=1)
        assert convert_tf_main(["--models-dir", str(tmp_path), "--base-url", server.url, "--no-progress"]) == 0
        ranges = [r for p, r in server.requests if p == data]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert (tmp_path / "124M" / data.split("/")[-1]).read_bytes() == (root / data[1:]).read_bytes()
    assert_model_dat_equals(tmp_path / "124M" / "model.dat", tf_variables)


@pytest.mark.parametrize("fault, message", [
    (Fault(status=404), "no such file on the server"),
    (Fault(cut_after=1000), "attempts"),                 # the body always ends early
    (Fault(html=True), "HTML page"),
])
def test_download_faults_are_one_line_and_leave_no_model(mirror, tmp_path, capsys, fault, message):
    root, _ = mirror
    with serve_directory(root) as server:
        server.faults["/124M/model.ckpt.data-00000-of-00001"] = fault
        status = convert_tf_main(["--models-dir", str(tmp_path), "--base-url", server.url, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and message in err and err.count("\n") == 0 and err.startswith("convert_tf_checkpoint: error:")
    assert not (tmp_path / "124M" / "model.dat").exists()
    assert not (tmp_path / "124M" / "model.ckpt.data-00000-of-00001").exists()


def test_connection_refused(tmp_path, capsys):
    import socket
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status = convert_tf_main(["--models-dir", str(tmp_path), "--base-url", f"http://127.0.0.1:{port}", "--no-progress"])
    assert status == 1 and "connection refused" in capsys.readouterr().err
    assert not (tmp_path / "124M" / "model.dat").exists()


def test_unknown_size_is_refused_with_the_list(tmp_path, capsys):
    assert convert_tf_main(["--model-size", "125M", "--models-dir", str(tmp_path)]) == 1
    assert "124M, 355M, 774M, 1558M" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n_embd, n_head", [(768, 12), (1024, 16), (1280, 20), (1600, 25)])
def test_every_size_family_round_trips(tmp_path, n_embd, n_head):
    hparams = dict(n_vocab=1000, n_ctx=128, n_embd=n_embd, n_head=n_head, n_layer=1)
    tf_variables = write_tf_checkpoint(tmp_path / "ckpt", hparams, seed=n_embd)
    assert convert_tf_main(["--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "model.dat")]) == 0
    model_file = assert_model_dat_equals(tmp_path / "model.dat", tf_variables)
    assert model_file.hparams == {**hparams, "layer_norm_epsilon": 1e-5}


def test_full_124m_shape_converts_exactly(tmp_path):
    hparams = dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12)
    tf_variables = write_tf_checkpoint(tmp_path / "ckpt", hparams, seed=124)
    convert_tf.convert_checkpoint(tmp_path / "ckpt", tmp_path / "model.dat")
    assert (tmp_path / "model.dat").stat().st_size > 124_439_808 * 4
    assert_model_dat_equals(tmp_path / "model.dat", tf_variables)


def test_interrupted_conversion_leaves_no_model(mirror, tmp_path, ctrl_c_during_writing):
    root, _ = mirror
    with pytest.raises(KeyboardInterrupt):
        convert_tf.convert_checkpoint(root / "124M", tmp_path / "model.dat")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_that_does_not_match_its_hparams(mirror, tmp_path, capsys):
    root, _ = mirror
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "124M", ckpt)
    (ckpt / "hparams.json").write_text('{"n_vocab": 500, "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 1}')
    assert convert_tf_main(["--checkpoint-dir", str(ckpt)]) == 1
    assert "does not account for" in capsys.readouterr().err
    (ckpt / "hparams.json").write_text('{"n_vocab": 501, "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2}')
    assert convert_tf_main(["--checkpoint-dir", str(ckpt)]) == 1
    assert "model/wte is [500, 64], expected [501, 64]" in capsys.readouterr().err
    (ckpt / "model.ckpt.data-00000-of-00001").write_bytes(b"\0" * 100)
    (ckpt / "hparams.json").write_text((root / "124M" / "hparams.json").read_text())
    assert convert_tf_main(["--checkpoint-dir", str(ckpt)]) == 1
    assert "download it again" in capsys.readouterr().err
    assert not (ckpt / "model.dat").exists()


def test_the_script_runs_as_a_command(mirror, tmp_path):
    root, _ = mirror
    t = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_tf_checkpoint.py"), "--checkpoint-dir",
                           str(root / "124M"), "--out", str(tmp_path / "m.dat")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'm.dat'}" in done.stderr and time.perf_counter() - t < 120
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "convert_tf_checkpoint.py"), "--model-size", "2B"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_the_engine_never_imports_tensorflow():
    code = "import sys, picogpt, picogpt.cli, picogpt.store; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_tensorflow_nothing_is_downloaded(mirror, tmp_path, capsys, monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real_find_spec(name, *a))
    root, _ = mirror
    with serve_directory(root) as server:
        status = convert_tf_main(["--models-dir", str(tmp_path), "--base-url", server.url, "--no-progress"])
        assert server.requests == []
    assert status == 1 and "-m pip install 'tensorflow-cpu>=2.15'" in capsys.readouterr().err


def test_download_and_convert_to_int8_reports_the_error(mirror, tmp_path, capsys):
    """--dtype int8: the same download, the matrices quantized (a quarter of their bytes), the error said."""
    import numpy as np
    from picogpt.modelfile import open_model_file
    root, tf_variables = mirror
    with serve_directory(root) as server:
        status = convert_tf_main(["--model-size", "124M", "--models-dir", str(tmp_path / "models"),
                                  "--base-url", server.url, "--no-progress", "--dtype", "int8"])
    assert status == 0
    err = capsys.readouterr().err
    assert "wrote" in err and "int8 weights: " in err and "% error (median over 9 matrices" in err
    opened = open_model_file(tmp_path / "models" / "124M" / "model.dat")
    assert opened.weight_dtype == "int8"
    for name, array in opened.float32_tensors():
        expected = to_model_dat_names(tf_variables)[name]
        np.testing.assert_allclose(array, expected, atol=np.abs(expected).max() / 127 / 2 * 1.001)
