"""bfloat16 weights: the rounding, model.dat version 2, the converters' --dtype and convert-dtype, the
loader's choice (multiplied natively by MKL, or widened to float32 once), and the numbers against
Hugging Face's float32 GPT-2 on the same rounded weights.

Tolerance of the native path: every product rounds its float32 input to bfloat16 (a relative error of
at most 2^-9, about 2e-3, per element), and the rounding compounds through the layers. Measured against
PyTorch float32 on the same rounded weights (random weights at GPT-2's scale, a 19-token prompt): the
largest |difference| of a position's logits was 4.3e-3 to 5.5e-3 of that position's largest |logit|, for
the widths and head counts of all four GPT-2 sizes (2 layers) and for 12 layers at 124M's. RTOL = 2e-2
leaves a margin of about 4. The widened path is float32 throughout: exactly the float32 model of the
rounded weights.
"""

import json

import numpy as np
import pytest
import torch

from conftest import convert_hf_main, convert_tf_main, rewrite_header
from hf_reference import random_tensors
from picogpt import blas, cli, precision, store
from picogpt.bfloat16 import BFloat16Matrix, isfinite, round_to_bfloat16, widen
from picogpt.errors import PicogptError
from picogpt.modelfile import PREAMBLE, ModelFileWriter, convert_dtype, open_model_file
from picogpt.reference import hf_forward, hf_model
from picogpt.tensors import is_matrix

RTOL = 2e-2
pytestmark = pytest.mark.usefixtures("numpy_backend_afterwards")  # (conftest)
HPARAMS = dict(n_vocab=50257, n_ctx=32, n_embd=64, n_head=4, n_layer=2)
IDS = list(range(1000, 1019))
HAS_MKL = blas.mkl_library() is not None
needs_mkl = pytest.mark.skipif(not HAS_MKL, reason="Intel's oneMKL wheel is not installed (pip install mkl; "
                               "x86-64 only)")


def write(path, hparams, tensors, weight_dtype):
    with ModelFileWriter(path, hparams, weight_dtype) as out:
        for name, array in tensors.items():
            out.write(name, array)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random weights as float32, as bfloat16, and as float32 of the bfloat16-rounded values."""
    folder = tmp_path_factory.mktemp("bf16")
    tensors = random_tensors(HPARAMS, seed=23)
    rounded = {name: widen(round_to_bfloat16(t)) if is_matrix(name) else t for name, t in tensors.items()}
    return dict(f32=write(folder / "f32.dat", HPARAMS, tensors, "f32"),
                bf16=write(folder / "bf16.dat", HPARAMS, tensors, "bf16"),
                rounded=write(folder / "rounded.dat", HPARAMS, rounded, "f32"))


# ---------------------------------------------------------------------------------------------------
# The rounding and the file

def test_rounding_is_to_nearest_even_as_pytorch_does_it():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(200_000).astype(np.float32) * np.float32(10) ** rng.integers(
        -30, 30, 200_000).astype(np.float32), np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.39e38, 3.4e38,
                                                       1e-40, 0.0, -0.0], np.float32)])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(round_to_bfloat16(values), expected)
    as_torch = torch.from_numpy(expected.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(widen(expected), as_torch)
    assert list(isfinite(round_to_bfloat16(np.array([1, 3.4e38, np.inf], np.float32))) ) == [True, False, False]


def test_bf16_files_are_version_2_half_the_size_and_float32_files_stay_version_1(files):
    def version(path):
        return PREAMBLE.unpack(path.read_bytes()[:PREAMBLE.size])[1]
    assert version(files["f32"]) == 1 and version(files["bf16"]) == 2
    assert files["bf16"].stat().st_size < 0.55 * files["f32"].stat().st_size
    opened = open_model_file(files["bf16"])
    opened.verify()
    assert opened.weight_dtype == "bf16"
    for name, tensor in opened.tensors.items():
        assert tensor.dtype == (np.uint16 if is_matrix(name) else np.float32), name
    assert opened.tensors["wte"].flags.f_contiguous  # the layout the output projection reads, as in float32
    reference = open_model_file(files["rounded"]).tensors
    for name, tensor in opened.tensors.items():
        np.testing.assert_array_equal(widen(tensor) if tensor.dtype == np.uint16 else tensor, reference[name])


@pytest.mark.parametrize("edit, message", [
    (lambda h: 1, "format version 1 cannot hold bf16 matrices"),
    (lambda h: [e.update(dtype="bf16") for e in h["tensors"] if e["name"] == "h0/ln_1/b"] and None, "expected <f4"),
    (lambda h: [e.update(dtype="f16") for e in h["tensors"] if e["name"] == "wte"] and None, "expected <f4 or bf16"),
])
def test_the_reader_refuses_bf16_where_it_cannot_be(files, tmp_path, edit, message):
    path = tmp_path / "model.dat"
    path.write_bytes(files["bf16"].read_bytes())
    rewrite_header(path, edit)
    with pytest.raises(PicogptError, match=message):
        open_model_file(path)


def test_verify_finds_nan_in_bf16_weights(files, tmp_path):
    import hashlib
    path = tmp_path / "model.dat"
    raw = bytearray(files["bf16"].read_bytes())
    offset = next(e for e in json.loads(raw[PREAMBLE.size:PREAMBLE.size + PREAMBLE.unpack(
        raw[:PREAMBLE.size])[2]])["tensors"] if e["name"] == "h1/mlp/c_fc/w")["offset"]
    raw[offset:offset + 2] = np.array([0x7FC0], np.uint16).tobytes()  # a bfloat16 NaN
    magic, version, header_len, size, _ = PREAMBLE.unpack(raw[:PREAMBLE.size])
    raw[:PREAMBLE.size] = PREAMBLE.pack(magic, version, header_len, size, hashlib.sha256(raw[PREAMBLE.size:]).digest())
    path.write_bytes(bytes(raw))
    with pytest.raises(PicogptError, match="h1/mlp/c_fc/w contains NaN or infinite values"):
        open_model_file(path).verify()


# ---------------------------------------------------------------------------------------------------
# Converting

def test_convert_dtype_both_ways(files, tmp_path, capsys):
    assert cli.main(["convert-dtype", str(files["f32"]), "--to", "bf16", "--out", str(tmp_path / "b.dat")]) == 0
    assert (tmp_path / "b.dat").read_bytes() == files["bf16"].read_bytes()
    assert cli.main(["convert-dtype", str(tmp_path / "b.dat"), "--to", "f32"]) == 0  # default: beside it
    assert (tmp_path / "model-f32.dat").read_bytes() == files["rounded"].read_bytes()
    assert "wrote" in capsys.readouterr().err
    convert_dtype(files["bf16"], tmp_path / "again.dat", "bf16")  # bf16 -> bf16 changes nothing
    assert (tmp_path / "again.dat").read_bytes() == files["bf16"].read_bytes()


def test_converters_write_bf16_with_dtype(tmp_path):
    from tf_fixture import write_tf_checkpoint
    small = dict(HPARAMS, n_vocab=50257)
    write_tf_checkpoint(tmp_path / "ckpt", small, seed=5)
    assert convert_tf_main(["--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "f32.dat")]) == 0
    assert convert_tf_main(["--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "bf16.dat"),
                            "--dtype", "bf16"]) == 0
    convert_dtype(tmp_path / "f32.dat", tmp_path / "expected.dat", "bf16")
    assert (tmp_path / "bf16.dat").read_bytes() == (tmp_path / "expected.dat").read_bytes()


def test_convert_hf_writes_bf16_with_dtype(tmp_path):
    from safetensors.numpy import save_file
    from picogpt.tensors import model_dat_to_hf_name
    from picogpt.reference import hf_config
    tensors = random_tensors(HPARAMS, seed=6)
    folder = tmp_path / "hf"
    folder.mkdir()
    hf_config(HPARAMS).save_pretrained(folder)
    save_file({model_dat_to_hf_name(n): np.ascontiguousarray(t) for n, t in tensors.items()},
              str(folder / "model.safetensors"))
    assert convert_hf_main([str(folder), "--dtype", "bf16"]) == 0
    write(tmp_path / "expected.dat", HPARAMS, tensors, "bf16")
    assert (folder / "model.dat").read_bytes() == (tmp_path / "expected.dat").read_bytes()


# ---------------------------------------------------------------------------------------------------
# Loading: native or widened, and the numbers

def test_widened_bf16_is_exactly_the_float32_model_of_the_rounded_weights(files, capsys):
    model = store.load(files["bf16"])  # NumPy's backend has no bfloat16 product: widened at load
    assert model.precision.widened and "numpy backend has no bfloat16 product" in model.precision.note
    assert all(not isinstance(t, BFloat16Matrix) for t in model.params["blocks"][0]["attn"]["c_attn"].values())
    np.testing.assert_array_equal(model(IDS, all_logits=True), store.load(files["rounded"])(IDS, all_logits=True))
    capsys.readouterr()
    assert cli.main(["Hello", "-n", "5", "--model", str(files["bf16"])]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "bfloat16 weights widened to float32 at load (" in err and "MB of memory)" in err
    assert cli.main(["Hello", "-n", "5", "--model", str(files["rounded"])]) == 0
    assert capsys.readouterr().out == out


@pytest.mark.parametrize("vendor, flags, native, why", [
    ("GenuineIntel", {"avx512f", "avx512_bf16"}, True, "avx512_bf16"),
    ("GenuineIntel", {"avx512f", "amx_bf16", "amx_tile"}, True, "amx_bf16"),
    ("GenuineIntel", {"avx512f", "avx2"}, False, "no bfloat16 instructions"),
    ("AuthenticAMD", {"avx512f", "avx512_bf16"}, False, "Intel CPUs only"),
    (None, set(), False, "does not say"),
])
@needs_mkl
def test_the_choice_follows_the_cpu(monkeypatch, vendor, flags, native, why):
    monkeypatch.delenv(precision.BF16_ENV, raising=False)
    monkeypatch.setattr(blas, "cpu_features", lambda: (vendor, flags))
    blas.use("mkl")
    assert precision.bf16_support()[0] is native and why in precision.bf16_support()[1]
    blas.use("numpy")
    assert precision.bf16_support() == (False, "the numpy backend has no bfloat16 product (--backend mkl and onednn "
                                               "have)")


@needs_mkl
@pytest.mark.parametrize("n_embd, n_head", [(768, 12), (1024, 16), (1280, 20), (1600, 25)])
def test_native_bf16_logits_against_hugging_face_float32(tmp_path, monkeypatch, n_embd, n_head):
    monkeypatch.setenv(precision.BF16_ENV, "native")  # MKL computes bfloat16 on any x86 CPU, if slowly
    hparams = dict(n_vocab=50257, n_ctx=32, n_embd=n_embd, n_head=n_head, n_layer=2)
    path = write(tmp_path / "model.dat", hparams, random_tensors(hparams, seed=n_head), "bf16")
    blas.use("mkl")
    model = store.load(path)
    assert model.precision.native and isinstance(model.params["wte"], BFloat16Matrix)
    ours = model(IDS, all_logits=True)
    reference, _ = hf_forward(hf_model(hparams, open_model_file(path).tensors), IDS)
    error = np.abs(ours - reference).max(axis=-1) / np.abs(reference).max(axis=-1)
    assert error.max() < RTOL, error.max()
    assert error.max() > 1e-4  # bfloat16 really ran: float32 would agree to about 1e-6


@needs_mkl
def test_native_bf16_demo_model_keeps_the_greedy_tokens(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(precision.BF16_ENV, "native")
    assert cli.main(["convert-dtype", "demo", "--to", "bf16", "--out", str(tmp_path / "demo.dat")]) == 0
    capsys.readouterr()
    assert cli.main(["The optional argument", "--model", "demo", "--ignore-eot"]) == 0
    float32 = capsys.readouterr().out
    assert cli.main(["The optional argument", "--model", str(tmp_path / "demo.dat"), "--backend", "mkl",
                     "--ignore-eot", "-v"]) == 0
    out, err = capsys.readouterr()
    assert "weights: bfloat16 weights, multiplied as bfloat16" in err and out == float32


def test_a_bf16_model_moved_to_a_backend_without_bf16_products_stays_right(files):
    blas.use("numpy")
    stored = open_model_file(files["bf16"]).tensors
    tensors = {n: BFloat16Matrix.of(t) if t.dtype == np.uint16 else t for n, t in stored.items()}
    from picogpt.model import GPT2
    model = GPT2(open_model_file(files["bf16"]).hparams, tensors)
    np.testing.assert_allclose(model(IDS, all_logits=True), store.load(files["rounded"])(IDS, all_logits=True),
                               rtol=0, atol=1e-5)


def test_without_mkl_the_backend_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(blas, "mkl_library", lambda: None)
    assert cli.main(["Hi", "--backend", "mkl", "--model", "demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MKL library found; install Intel's oneMKL wheel" in err
    assert "-m pip install 'mkl>=2024'" in err and "picogpt[" not in err


def test_the_1558m_bf16_file_is_about_3_1_gb():
    from picogpt.modelfile import _layout
    hparams = dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48, layer_norm_epsilon=1e-5)
    _, _, f32_size = _layout(hparams)
    _, _, bf16_size = _layout(hparams, "bf16")
    assert 3.05e9 < bf16_size < 3.2e9 and bf16_size < 0.51 * f32_size


def test_bit_patterns_never_reach_the_model_as_numbers(files):
    from picogpt.model import GPT2
    opened = open_model_file(files["bf16"])
    with pytest.raises(TypeError, match="bfloat16 bit patterns"):
        GPT2(opened.hparams, opened.tensors)
    m = BFloat16Matrix.of(opened.tensors["h0/mlp/c_fc/w"])
    w = widen(opened.tensors["h0/mlp/c_fc/w"])
    x = np.ones((1, m.shape[0]), np.float32)
    np.testing.assert_allclose(x @ m, x @ w, rtol=1e-5)  # NumPy arithmetic sees values
    assert m[[0, 1]].dtype == np.float32 and type(m.T) is BFloat16Matrix and type(m[1:3]) is BFloat16Matrix


def test_widening_lets_go_of_the_file_and_the_library_says_so(files, capsys):
    model = store.load(files["bf16"])
    assert "bfloat16 weights widened to float32 at load" in capsys.readouterr().err
    assert all(not np.may_share_memory(t, np.memmap(files["bf16"], mode="r"))
               for block in model.params["blocks"] for part in block.values() for t in part.values())
    store.load(files["bf16"], quiet=True)
    assert capsys.readouterr().err == ""


def test_a_bfloat16_choice_that_means_nothing_is_one_line_and_an_impossible_one_is_said(monkeypatch, capsys):
    monkeypatch.setenv(precision.BF16_ENV, "garbage")  # was ignored: picogpt's own choice, silently
    assert cli.main(["Hi", "-n", "1", "--model", "demo"]) == 1
    err = capsys.readouterr().err
    assert "$PICOGPT_BF16='garbage' means nothing: give native or widen" in err and err.count("\n") == 1
    monkeypatch.setenv(precision.BF16_ENV, "native")  # asked for, impossible with NumPy's products: said, even
    assert cli.main(["Hi", "-n", "1", "--model", "demo"]) == 0  # for the demo model, whose widening is not news
    assert ("native bfloat16 products were asked for ($PICOGPT_BF16=native), but the numpy backend has no "
            "bfloat16 product") in capsys.readouterr().err
