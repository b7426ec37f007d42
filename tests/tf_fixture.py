"""Test helper: write a TensorFlow GPT-2 checkpoint laid out exactly like
OpenAI's released ones (gpt-2 repo, ``models/{124M,355M,774M,1558M}/``).

The checkpoint is written in TF1 graph mode with ``tf.compat.v1.train.Saver``
so that variable names are the plain ``model/h0/attn/c_attn/w`` style names
(``tf.train.Checkpoint`` would produce object-graph names instead).  Weight
values are fed through placeholders, never embedded as graph constants, so the
``.meta`` file stays small and the 2 GB protobuf limit is never hit.

TensorFlow is imported lazily, inside the functions, so importing this module
is cheap and test modules that do not need TF do not pay for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "gpt2"

CKPT_PREFIX = "model.ckpt"
CHECKPOINT_FILE_TEXT = (
    'model_checkpoint_path: "model.ckpt"\n'
    'all_model_checkpoint_paths: "model.ckpt"\n'
)
OPENAI_FILES = frozenset(
    {
        "checkpoint",
        "encoder.json",
        "hparams.json",
        "model.ckpt.data-00000-of-00001",
        "model.ckpt.index",
        "model.ckpt.meta",
        "vocab.bpe",
    }
)
HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


def variable_specs(hparams: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """``[(name, shape, kind)]`` of every variable in OpenAI's checkpoint, in
    a fixed order.  ``kind`` is one of ``wte``, ``wpe``, ``w``, ``b``, ``g``.
    """
    n_vocab, n_ctx, e = int(hparams["n_vocab"]), int(hparams["n_ctx"]), int(hparams["n_embd"])
    specs: list[tuple[str, tuple[int, ...], str]] = [
        ("model/wte", (n_vocab, e), "wte"),
        ("model/wpe", (n_ctx, e), "wpe"),
    ]
    for i in range(int(hparams["n_layer"])):
        p = f"model/h{i}"
        specs += [
            (f"{p}/ln_1/g", (e,), "g"),
            (f"{p}/ln_1/b", (e,), "b"),
            (f"{p}/attn/c_attn/w", (1, e, 3 * e), "w"),
            (f"{p}/attn/c_attn/b", (3 * e,), "b"),
            (f"{p}/attn/c_proj/w", (1, e, e), "w"),
            (f"{p}/attn/c_proj/b", (e,), "b"),
            (f"{p}/ln_2/g", (e,), "g"),
            (f"{p}/ln_2/b", (e,), "b"),
            (f"{p}/mlp/c_fc/w", (1, e, 4 * e), "w"),
            (f"{p}/mlp/c_fc/b", (4 * e,), "b"),
            (f"{p}/mlp/c_proj/w", (1, 4 * e, e), "w"),
            (f"{p}/mlp/c_proj/b", (e,), "b"),
        ]
    specs += [("model/ln_f/g", (e,), "g"), ("model/ln_f/b", (e,), "b")]
    return specs


def random_weights(hparams: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every variable (drawn in spec order)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape, kind in variable_specs(hparams):
        x = rng.standard_normal(shape, dtype=np.float32)
        if kind == "g":
            x *= np.float32(0.1)
            x += np.float32(1.0)
        elif kind == "wpe":
            x *= np.float32(0.01)
        else:  # wte, w, b
            x *= np.float32(0.02)
        out[name] = x
    return out


def to_model_dat_names(variables: dict) -> dict[str, np.ndarray]:
    """TF variables -> model.dat's tensors: drop "model/" and the conv1d kernels' leading 1."""
    return {name.removeprefix("model/"): array[0] if name.endswith("/w") else array
            for name, array in variables.items()}


def _normalise_hparams(hparams: dict) -> dict[str, int]:
    missing = [k for k in HPARAM_KEYS if k not in hparams]
    if missing:
        raise KeyError(f"hparams missing {missing}")
    hp = {k: int(hparams[k]) for k in HPARAM_KEYS}
    if hp["n_embd"] % hp["n_head"]:
        raise ValueError("n_embd must be divisible by n_head")
    return hp


def write_tf_checkpoint(directory, hparams: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Write an OpenAI-style GPT-2 TF checkpoint with random float32 weights
    into ``directory``; return ``{variable name: array}`` exactly as written.

    The directory ends up holding exactly OpenAI's seven files: ``checkpoint``,
    ``encoder.json``, ``hparams.json``, ``model.ckpt.data-00000-of-00001``,
    ``model.ckpt.index``, ``model.ckpt.meta`` and ``vocab.bpe``.
    """
    import tensorflow as tf  # lazy: heavy import

    hp = _normalise_hparams(hparams)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = random_weights(hp, seed)

    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        feed: dict = {}
        var_list = []
        for name, arr in weights.items():
            scope, _, leaf = name.rpartition("/")
            # Placeholder named outside the "model/" scope so the only
            # "model/..." ops are the variables themselves (+ their helpers).
            ph = tf1.placeholder(tf.float32, shape=arr.shape, name="init_" + name.replace("/", "_"))
            with tf1.variable_scope(scope, reuse=False):
                # Ref variables (VariableV2), as in OpenAI's TF1-era graph.
                var = tf1.get_variable(leaf, initializer=ph, use_resource=False, trainable=True)
            assert var.op.name == name, (var.op.name, name)
            feed[ph] = arr
            var_list.append(var)
        init = tf1.variables_initializer(var_list)
        saver = tf1.train.Saver(var_list=var_list, sharded=False, max_to_keep=1, save_relative_paths=True)
        config = tf1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=2)
        with tf1.Session(graph=graph, config=config) as sess:
            sess.run(init, feed_dict=feed)
            del feed
            saver.save(sess, str(directory / CKPT_PREFIX), write_meta_graph=True, write_state=False)

    # Exactly OpenAI's 77-byte `checkpoint` state file (relative paths).
    (directory / "checkpoint").write_bytes(CHECKPOINT_FILE_TEXT.encode("ascii"))
    with open(directory / "hparams.json", "w") as f:
        json.dump(hp, f, indent=2)
    for fname in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(DATA_DIR / fname, directory / fname)

    # Remove anything else Saver may have left behind (e.g. temp files).
    for p in directory.iterdir():
        if p.name not in OPENAI_FILES:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    present = {p.name for p in directory.iterdir()}
    if present != OPENAI_FILES:
        raise RuntimeError(f"unexpected checkpoint file set: {sorted(present)}")
    return weights


def read_tf_checkpoint(directory) -> dict[str, np.ndarray]:
    """Read every variable of the checkpoint in ``directory`` (sorted by name)."""
    import tensorflow as tf  # lazy: heavy import

    prefix = str(Path(directory) / CKPT_PREFIX)
    return {
        name: np.asarray(tf.train.load_variable(prefix, name))
        for name, _shape in tf.train.list_variables(prefix)
    }


def write_tf_checkpoint_subprocess(directory, hparams: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Same as :func:`write_tf_checkpoint`, but does the TF graph work in a fresh
    ``python`` subprocess so this process never imports TensorFlow.

    Not required in practice: writing in-process and then using PyTorch in the
    same process (either import order) was checked and works.  This is for
    callers that want to keep TF (threads, ~0.5 GB RSS) out of the process.

    The returned arrays are regenerated locally with the same seed (the RNG is
    pure NumPy, so they are bit-identical to what the subprocess wrote);
    the subprocess verifies that the checkpoint read back equals them.
    """
    hp = _normalise_hparams(hparams)
    directory = Path(directory).resolve()
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import numpy as np\n"
        "import tf_fixture as f\n"
        "d, hp, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])\n"
        "w = f.write_tf_checkpoint(d, hp, seed)\n"
        "r = f.read_tf_checkpoint(d)\n"
        "assert set(r) == set(w), 'variable names differ'\n"
        "assert all(np.array_equal(r[k], w[k]) for k in w), 'values differ'\n"
    )
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(directory), json.dumps(hp), str(int(seed))],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"TF checkpoint subprocess failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return random_weights(hp, seed)


__all__ = [
    "CHECKPOINT_FILE_TEXT",
    "OPENAI_FILES",
    "read_tf_checkpoint",
    "random_weights",
    "variable_specs",
    "write_tf_checkpoint",
    "write_tf_checkpoint_subprocess",
]

if __name__ == "__main__":  # pragma: no cover - manual use
    import time

    hp = json.loads(sys.argv[2]) if len(sys.argv) > 2 else dict(
        n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12
    )
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    t = time.perf_counter()
    write_tf_checkpoint(out, hp)
    print(f"wrote {out} in {time.perf_counter() - t:.2f}s")
