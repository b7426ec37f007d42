"""score-corpus and complete-corpus on a Ray cluster (--ray): one local cluster of 2 CPUs shared by these
tests (ray.init(num_cpus=2), which the commands join), against the in-process path.

The Ray path writes the same file as the in-process path, byte for byte; an actor killed mid-run (its
process sent SIGKILL) is replaced, its chunk run again, and the file is still complete and duplicate-free.
Needs Ray (the ray extra: pip install -e '.[ray]'; make test installs it); without it these tests skip.
"""

import json
import os
import random
import signal
import sys
import threading
import time

import pytest

from hf_reference import random_tensors, write_model_dat
from picogpt.cli import main

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2, layer_norm_epsilon=1e-5)
WORDS = "the function returns a new list of values from the optional argument and raises an error".split()


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model_dat(tmp_path_factory.mktemp("model") / "model.dat", HPARAMS, random_tensors(HPARAMS, seed=4))


def corpus(path, n_docs, seed=0):
    rng = random.Random(seed)
    lines = [json.dumps({"id": f"doc-{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))})
             for i in range(n_docs)]
    lines[5] = "{broken"
    lines[9] = json.dumps({"id": "long", "text": " ".join(rng.choice(WORDS) for _ in range(150))})  # > context
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("task", ["score-corpus", "complete-corpus"])
def test_ray_writes_the_in_process_file_byte_for_byte(cluster, model_path, tmp_path, task):
    inputs = corpus(tmp_path / "docs.jsonl", 300)
    argv = [task, str(inputs), "--model", str(model_path)]
    if task == "complete-corpus":
        argv += ["-n", "8", "--temperature", "0.9", "--seed", "3"]
    here, there = tmp_path / "here.jsonl", tmp_path / "there.jsonl"
    # The same BLAS thread count in both: OpenBLAS may round a product differently at another (AMD Zen 3)
    assert main(argv + ["--out", str(here), "--threads", "1"]) == 0
    assert main(argv + ["--out", str(there), "--ray", "auto", "--workers", "2", "--threads-per-worker", "1"]) == 0
    assert there.read_bytes() == here.read_bytes()
    records = [json.loads(line) for line in there.read_text().splitlines()]
    assert len(records) == 300 and records[5]["error"].startswith("malformed JSON")


def chunk_worker_pids():
    """Process ids of the running ChunkWorker actors (Ray titles an actor's process after its class)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"ChunkWorker" in f.read():
                        pids.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the actors' processes in /proc (Linux)")
def test_a_killed_actor_is_replaced_and_the_file_is_complete(cluster, model_path, tmp_path):
    inputs = corpus(tmp_path / "docs.jsonl", 1500, seed=1)
    argv = ["score-corpus", str(inputs), "--model", str(model_path)]
    here, there = tmp_path / "here.jsonl", tmp_path / "there.jsonl"
    assert main(argv + ["--out", str(here), "--threads", "1"]) == 0  # as the actors (1 thread each by default)
    status = {}
    job = threading.Thread(target=lambda: status.update(code=main(argv + ["--out", str(there), "--ray", "auto"])))
    job.start()
    killed = None
    try:
        deadline = time.monotonic() + 120
        while job.is_alive() and killed is None and time.monotonic() < deadline:
            written = there.stat().st_size if there.exists() else 0
            pids = chunk_worker_pids()
            if written > 0 and pids:  # mid-run: some chunks written, actors at work
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
    finally:
        job.join(timeout=300)
    assert killed is not None, "the run ended before an actor could be killed; make the corpus larger"
    assert status.get("code") == 0
    assert there.read_bytes() == here.read_bytes()  # every document once, in order, as in one process
    ids = [json.loads(line)["id"] for line in there.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 1500


def test_without_ray_the_option_says_how_to_install_it(model_path, tmp_path, capsys, monkeypatch):
    inputs = corpus(tmp_path / "docs.jsonl", 12)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    assert main(["score-corpus", str(inputs), "--out", str(tmp_path / "o.jsonl"), "--model", str(model_path),
                 "--ray", "auto"]) == 1
    err = capsys.readouterr().err
    assert "--ray needs Ray, which is not installed: " in err and "pip install" in err and "ray" in err
