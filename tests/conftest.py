import os
import sys
from pathlib import Path

# Test helpers (tf_fixture, httpserver, hf_reference) are plain modules beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The demo model is bfloat16. On a CPU with bfloat16 instructions, --backend auto (the default) would multiply it
# natively, which rounds otherwise than the float32 numbers many tests compare with PyTorch's, so the suite
# (and the commands it runs) widens bfloat16 unless a test asks for native itself (test_bfloat16.py, the
# benchmark's test) or unsets this to test the choice.
os.environ.setdefault("PICOGPT_BF16", "widen")

GPT2_124M_SHAPE = dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12)


def assert_model_dat_holds(path, tensors):
    """The model.dat at path holds exactly `tensors` (model.dat names -> arrays), and its checksum is right."""
    from picogpt.modelfile import open_model_file
    model_file = open_model_file(path)
    assert set(model_file.tensors) == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(model_file.tensors[name], array, err_msg=name)
    model_file.verify()
    return model_file


def rewrite_header(path, edit):
    """Edit a model.dat's JSON header in place (same length, checksum untouched): edit(header) changes the
    parsed header and may return a format version to write instead of the file's."""
    import json
    from picogpt.modelfile import PREAMBLE
    raw = bytearray(path.read_bytes())
    _, version, header_len, size, digest = PREAMBLE.unpack(raw[:PREAMBLE.size])
    header = json.loads(raw[PREAMBLE.size:PREAMBLE.size + header_len])
    version = edit(header) or version
    raw[PREAMBLE.size:PREAMBLE.size + header_len] = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    raw[:PREAMBLE.size] = PREAMBLE.pack(b"PICOGPT\0", version, header_len, size, digest)
    path.write_bytes(bytes(raw))


def process_ids(marker):
    """Ids of the running processes whose command line holds `marker` (bytes): Ray titles an actor's process
    after its class, so this finds actors and replicas by name."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker in f.read():
                        pids.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    return pids


@pytest.fixture
def numpy_backend_afterwards():
    """Leave NumPy's backend selected after the test (a module asks for it with pytestmark usefixtures)."""
    yield
    from picogpt import blas
    blas.use("numpy")


@pytest.fixture(scope="session")
def model_124m_shape(tmp_path_factory):
    """A model.dat of GPT-2 124M's exact shape with random weights (fixed seed), and those weights."""
    from hf_reference import random_tensors, write_model_dat
    tensors = random_tensors(GPT2_124M_SHAPE, seed=124)
    path = write_model_dat(tmp_path_factory.mktemp("124M") / "model.dat", GPT2_124M_SHAPE, tensors)
    return path, tensors


@pytest.fixture
def ctrl_c_during_writing(monkeypatch):
    """Make ModelFileWriter.write raise KeyboardInterrupt at its fifth tensor, as a Ctrl-C would."""
    from picogpt.modelfile import ModelFileWriter
    written = []

    def write_then_interrupt(self, name, array):
        written.append(name)
        if len(written) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ModelFileWriter, "write", write_then_interrupt)


def convert_tf_main(argv):
    """What tools/convert_tf_checkpoint.py runs: `picogpt convert-tf`, under the script's name."""
    from picogpt.cli import main
    return main(["convert-tf", *argv], prog="convert_tf_checkpoint")


def convert_hf_main(argv):
    """What tools/convert_hf_checkpoint.py runs: `picogpt convert-hf`, under the script's name."""
    from picogpt.cli import main
    return main(["convert-hf", *argv], prog="convert_hf_checkpoint")
