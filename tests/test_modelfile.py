import json
import os
import struct
import time

import numpy as np
import pytest

from hf_reference import random_tensors, write_model_dat
from picogpt.errors import PicogptError
from picogpt.modelfile import ALIGN, PREAMBLE, ModelFileWriter, open_model_file
from picogpt.tensors import gpt2_tensor_specs

HPARAMS = dict(n_vocab=100, n_ctx=16, n_embd=32, n_head=4, n_layer=2)


@pytest.fixture
def model_dat(tmp_path):
    tensors = random_tensors(HPARAMS, seed=1)
    return write_model_dat(tmp_path / "model.dat", HPARAMS, tensors), tensors


def test_round_trip_maps_every_tensor_without_copying(model_dat):
    path, tensors = model_dat
    mf = open_model_file(path)
    assert mf.hparams == {**HPARAMS, "layer_norm_epsilon": 1e-5}
    assert set(mf.tensors) == set(tensors)
    for name, array in mf.tensors.items():
        np.testing.assert_array_equal(array, tensors[name])
        assert array.dtype == np.float32 and not array.flags.writeable
        assert not array.flags.owndata  # a view into the memory map, not a copy
    wte = mf.tensors["wte"]
    assert wte.flags.f_contiguous and wte.T.flags.c_contiguous  # lm_head multiplies a contiguous [n_embd, n_vocab]
    assert mf.tensors["h0/attn/c_attn/w"].flags.c_contiguous
    mf.verify()


def test_layout_is_aligned_and_self_describing(model_dat):
    path, _ = model_dat
    raw = path.read_bytes()
    magic, version, header_len, file_size, _ = PREAMBLE.unpack(raw[:PREAMBLE.size])
    assert (magic, version, file_size) == (b"PICOGPT\0", 1, len(raw))
    header = json.loads(raw[PREAMBLE.size:PREAMBLE.size + header_len])
    assert [t["name"] for t in header["tensors"]] == list(gpt2_tensor_specs(HPARAMS))
    for t in header["tensors"]:
        assert t["offset"] % ALIGN == 0 and t["dtype"] == "<f4"


def test_only_complete_files_appear(tmp_path):
    tensors = random_tensors(HPARAMS)
    path = tmp_path / "model.dat"
    with pytest.raises(RuntimeError):
        with ModelFileWriter(path, HPARAMS) as out:
            out.write("wte", tensors["wte"])
            raise RuntimeError("interrupted")
    with pytest.raises(KeyboardInterrupt):
        with ModelFileWriter(path, HPARAMS) as out:
            out.write("wte", tensors["wte"])
            raise KeyboardInterrupt
    with pytest.raises(PicogptError, match="lacks"):
        with ModelFileWriter(path, HPARAMS) as out:
            out.write("wte", tensors["wte"])
    assert list(tmp_path.iterdir()) == []  # no model.dat, no temporary left behind


def test_writer_refuses_wrong_shapes_and_non_finite_values(tmp_path):
    tensors = random_tensors(HPARAMS)
    with pytest.raises(PicogptError, match="shape"):
        with ModelFileWriter(tmp_path / "m.dat", HPARAMS) as out:
            out.write("wpe", tensors["wpe"][:-1])
    bad = tensors["wpe"].copy()
    bad[3, 4] = np.nan
    with pytest.raises(PicogptError, match="NaN"):
        with ModelFileWriter(tmp_path / "m.dat", HPARAMS) as out:
            out.write("wpe", bad)
    assert list(tmp_path.iterdir()) == []


def rewrite(path, raw):
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:len(raw) // 2], "truncated"),
    (lambda raw: raw + b"\0" * 64, "truncated or damaged"),
    (lambda raw: b"GGML" + raw[4:], "bad magic"),
    (lambda raw: raw[:8] + struct.pack("<I", 4) + raw[12:], "version 4 is newer"),
    (lambda raw: raw[:8] + struct.pack("<I", 0) + raw[12:], "unknown model file format version 0"),
    (lambda raw: b"", "bad magic"),
])
def test_reader_names_the_problem_and_the_fix(model_dat, damage, message):
    path, _ = model_dat
    rewrite(path, damage(path.read_bytes()))
    with pytest.raises(PicogptError, match=message) as e:
        open_model_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert "picogpt convert-tf --help" in str(e.value) or "upgrade picogpt" in str(e.value)


def edit_header(path, edit):
    raw = bytearray(path.read_bytes())
    _, _, header_len, _, _ = PREAMBLE.unpack(raw[:PREAMBLE.size])
    header = json.loads(raw[PREAMBLE.size:PREAMBLE.size + header_len])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= header_len
    raw[PREAMBLE.size:PREAMBLE.size + header_len] = text.ljust(header_len)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["hparams"].update(n_layer=3), "tensor names do not match"),
    (lambda h: h["hparams"].update(n_embd=30), "not a multiple of n_head|expected"),
    (lambda h: h["hparams"].update(n_head=0), "not a positive whole number"),
    (lambda h: h["tensors"][1].update(offset=h["tensors"][0]["offset"]), "overlaps"),
    (lambda h: h["tensors"][-1].update(offset=h["tensors"][-1]["offset"] + 1024), "outside the file"),
    (lambda h: h["tensors"][2].update(shape=[1, 32]), "expected <f4"),
    (lambda h: h["tensors"][0].update(order="C"), "order"),
    (lambda h: h["tensors"][3].update(dtype="<f8"), "expected <f4"),
    (lambda h: h["tensors"][3].update(nbytes=4), "byte count"),
])
def test_reader_checks_the_table_against_the_file(model_dat, edit, message):
    path, _ = model_dat
    edit_header(path, edit)
    with pytest.raises(PicogptError, match=message):
        open_model_file(path)


def test_verify_catches_a_flipped_byte(model_dat):
    path, _ = model_dat
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    mf = open_model_file(path)  # the structure is intact ...
    with pytest.raises(PicogptError, match="checksum mismatch"):
        mf.verify()  # ... but the data is not


def test_missing_file(tmp_path):
    with pytest.raises(PicogptError, match="does not exist"):
        open_model_file(tmp_path / "nope.dat")


def test_opening_a_124m_shape_file_takes_milliseconds(model_124m_shape):
    """Opening reads the header and maps the rest: no 500 MB read, no copy."""
    path, _ = model_124m_shape
    t = time.perf_counter()
    mf = open_model_file(path)
    elapsed = time.perf_counter() - t
    assert sum(a.size for a in mf.tensors.values()) == 124_439_808
    assert elapsed < 0.5, f"opening took {elapsed:.3f} s"


def test_written_files_get_ordinary_permissions(tmp_path):
    """The temporary file is private while written; the finished model.dat follows the umask like any file."""
    umask = os.umask(0o022)
    try:
        path = write_model_dat(tmp_path / "model.dat", HPARAMS, random_tensors(HPARAMS))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
