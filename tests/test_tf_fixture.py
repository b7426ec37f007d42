"""Self-test of the OpenAI-style TF checkpoint fixture (tests/tf_fixture.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

# Import the fixture first: it sets TF_CPP_MIN_LOG_LEVEL before TF is loaded.
from tf_fixture import (
    CHECKPOINT_FILE_TEXT,
    OPENAI_FILES,
    read_tf_checkpoint,
    write_tf_checkpoint,
)

tf = pytest.importorskip("tensorflow")

HP = dict(n_vocab=64, n_ctx=16, n_embd=32, n_head=4, n_layer=2)


def expected_shapes(hp):
    e = hp["n_embd"]
    out = {"model/wte": [hp["n_vocab"], e], "model/wpe": [hp["n_ctx"], e]}
    for i in range(hp["n_layer"]):
        p = f"model/h{i}"
        out.update(
            {
                f"{p}/ln_1/g": [e],
                f"{p}/ln_1/b": [e],
                f"{p}/attn/c_attn/w": [1, e, 3 * e],
                f"{p}/attn/c_attn/b": [3 * e],
                f"{p}/attn/c_proj/w": [1, e, e],
                f"{p}/attn/c_proj/b": [e],
                f"{p}/ln_2/g": [e],
                f"{p}/ln_2/b": [e],
                f"{p}/mlp/c_fc/w": [1, e, 4 * e],
                f"{p}/mlp/c_fc/b": [4 * e],
                f"{p}/mlp/c_proj/w": [1, 4 * e, e],
                f"{p}/mlp/c_proj/b": [e],
            }
        )
    out.update({"model/ln_f/g": [e], "model/ln_f/b": [e]})
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tf_gpt2")
    weights = write_tf_checkpoint(d, HP, seed=123)
    return d, weights


def test_file_set_is_openai(ckpt):
    d, _ = ckpt
    assert {p.name for p in d.iterdir()} == set(OPENAI_FILES)
    assert len(OPENAI_FILES) == 7


def test_checkpoint_state_file_exact(ckpt):
    d, _ = ckpt
    data = (d / "checkpoint").read_bytes()
    assert data == b'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    assert data == CHECKPOINT_FILE_TEXT.encode()
    assert len(data) == 77
    # TF itself resolves it to the (relative) model.ckpt prefix in d.
    assert tf.train.latest_checkpoint(str(d)) == str(d / "model.ckpt")


def test_variable_names_and_shapes(ckpt):
    d, weights = ckpt
    listed = dict(tf.train.list_variables(str(d / "model.ckpt")))
    exp = expected_shapes(HP)
    assert listed == exp
    assert {k: list(v.shape) for k, v in weights.items()} == exp


def test_values_round_trip(ckpt):
    d, weights = ckpt
    read = read_tf_checkpoint(d)
    assert set(read) == set(weights)
    for name, arr in weights.items():
        assert arr.dtype == np.float32
        assert read[name].dtype == np.float32, name
        np.testing.assert_array_equal(read[name], arr, err_msg=name)


def test_value_statistics(ckpt):
    _, w = ckpt
    # gains near 1, biases nonzero, weights small
    for name, arr in w.items():
        leaf = name.rsplit("/", 1)[1]
        if leaf == "g":
            assert abs(arr.mean() - 1) < 0.1 and 0 < arr.std() < 0.3, name
        else:
            assert np.all(arr != 0) and abs(arr).max() < 0.2, name
    assert w["model/wpe"].std() < w["model/wte"].std()


def test_hparams_round_trip(ckpt):
    d, _ = ckpt
    with open(d / "hparams.json") as f:
        hp = json.load(f)
    assert hp == HP
    assert list(hp) == ["n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"]
    assert all(type(v) is int for v in hp.values())


def test_vocab_files_copied(ckpt):
    from tf_fixture import DATA_DIR

    d, _ = ckpt
    for name in ("encoder.json", "vocab.bpe"):
        assert (d / name).read_bytes() == (DATA_DIR / name).read_bytes()


def test_meta_graph_has_no_embedded_weights(ckpt):
    d, weights = ckpt
    # Values go through placeholders, so the .meta holds no tensor data:
    # it must be much smaller than the weights and not contain their bytes.
    meta = (d / "model.ckpt.meta").read_bytes()
    assert weights["model/wte"].tobytes()[:64] not in meta
    from tensorflow.core.protobuf import meta_graph_pb2

    mg = meta_graph_pb2.MetaGraphDef()
    mg.ParseFromString(meta)
    big_float_consts = [
        n.name
        for n in mg.graph_def.node
        if n.op == "Const"
        and n.attr["value"].tensor.dtype == tf.float32.as_datatype_enum
        and int(np.prod([d.size for d in n.attr["value"].tensor.tensor_shape.dim])) > 1
    ]
    assert big_float_consts == []
    assert len(meta) < 200_000


def test_deterministic(tmp_path):
    small = dict(HP, n_layer=1)
    a = write_tf_checkpoint(tmp_path / "a", small, seed=7)
    b = write_tf_checkpoint(tmp_path / "b", small, seed=7)
    c = write_tf_checkpoint(tmp_path / "c", small, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model/wte"], c["model/wte"])


def test_subprocess_variant(tmp_path):
    from tf_fixture import write_tf_checkpoint_subprocess

    small = dict(HP, n_layer=1)
    w = write_tf_checkpoint_subprocess(tmp_path / "sub", small, seed=5)
    assert {p.name for p in (tmp_path / "sub").iterdir()} == set(OPENAI_FILES)
    read = read_tf_checkpoint(tmp_path / "sub")
    assert set(read) == set(w)
    assert all(np.array_equal(read[k], w[k]) for k in w)
