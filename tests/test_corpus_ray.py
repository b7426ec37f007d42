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
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import process_ids
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
    return process_ids(b"ChunkWorker")


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


def picogpt(args, cwd, env=None, timeout=180):
    """`python -m picogpt ARGS` in another process (one that joins or starts a cluster itself)."""
    return subprocess.run([sys.executable, "-m", "picogpt", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def a_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_joining_an_address_where_no_cluster_is_fails_in_one_line_and_leaves_nothing(model_path, tmp_path,
                                                                                     monkeypatch):
    from picogpt import corpus_ray
    inputs = corpus(tmp_path / "docs.jsonl", 12)
    argv = ["score-corpus", str(inputs), "--out", str(tmp_path / "o.jsonl"), "--model", str(model_path)]
    port = a_free_port()
    started = time.monotonic()
    done = picogpt(argv + ["--ray", f"127.0.0.1:{port}"], tmp_path)
    assert done.returncode == 1 and time.monotonic() - started < 60
    assert done.stderr.count("\n") == 1 and f"error: nothing listens at 127.0.0.1:{port}" in done.stderr
    assert "ray start --head" in done.stderr and done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no output, no .run.json

    with socket.socket() as silent:  # a listener that never answers as Ray does (on every address of this
        silent.bind(("", 0))           # machine: Ray turns 127.0.0.1 into the machine's own address)
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        process = subprocess.Popen([sys.executable, "-m", "picogpt", *argv, "--ray", address], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(5)  # picogpt is waiting for an answer: a plain kill ends it at once
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
        assert process.returncode == 143 and err.endswith("terminated\n") and out == ""
        monkeypatch.setattr(corpus_ray, "PROBE_SECONDS", 2)  # and without the kill, the wait has an end
        with pytest.raises(corpus_ray.PicogptError, match=f"{address} accepts connections but does not answer as a "
                                                          f"Ray cluster \\(nothing in 2 s\\); check the port"):
            corpus_ray.probe(address, corpus_ray.find_cluster(address))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_this_machines_cluster_joined_by_address_with_its_token_and_without(cluster, model_path, tmp_path,
                                                                            monkeypatch):
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("this Ray's local clusters do not use token authentication")
    gcs = ray.get_runtime_context().gcs_address
    corpus(tmp_path / "docs.jsonl", 150)
    here = tmp_path / "here.jsonl"
    monkeypatch.chdir(tmp_path)
    assert main(["score-corpus", "docs.jsonl", "--out", str(here), "--model", str(model_path), "--threads", "1"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # as a new shell has it
    (tmp_path / "home").mkdir()
    argv = ["score-corpus", "docs.jsonl", "--out", "there.jsonl", "--model", str(model_path), "--ray", gcs]
    done = picogpt(argv, tmp_path, dict(env, HOME=str(tmp_path / "home")))  # a user without the cluster's token
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"the Ray cluster at {gcs} requires Ray's token authentication and picogpt sent no token" in done.stderr
    assert not (tmp_path / "there.jsonl").exists() and not (tmp_path / "there.jsonl.run.json").exists()
    # This machine's token (~/.ray/auth_token, which made the cluster) is used for this machine's cluster,
    # as --ray auto uses it; the relative input is read from this folder, not the one Ray started in.
    done = picogpt(argv, tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # nothing of Ray's on stdout
    assert done.stderr.splitlines()[-1].startswith("picogpt score-corpus: scored 150") and not ray_errors(done.stderr)
    assert (tmp_path / "there.jsonl").read_bytes() == here.read_bytes()


def test_a_request_beyond_the_clusters_cpus_is_refused_or_said(cluster, model_path, tmp_path, capsys, monkeypatch):
    from picogpt import corpus as corpus_module
    inputs = corpus(tmp_path / "docs.jsonl", 200)
    argv = ["score-corpus", str(inputs), "--model", str(model_path), "--ray", "auto"]
    assert main(argv + ["--out", str(tmp_path / "a.jsonl"), "--threads-per-worker", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--threads-per-worker 3 reserves 3 CPUs for each actor, but the largest node of "
                                     "the Ray cluster has 2; give --threads-per-worker 2 or less") in err
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "a.jsonl.run.json").exists()
    statuses = []
    real_status = corpus_module.Progress.status
    monkeypatch.setattr(corpus_module.Progress, "status", lambda self, text: (statuses.append(text),
                                                                              real_status(self, text)))
    assert main(argv + ["--out", str(tmp_path / "b.jsonl"), "--workers", "4"]) == 0
    err = capsys.readouterr().err
    assert "the Ray cluster has CPUs for 2 actors of 1 thread at once, not 4: running 2" in err
    assert statuses[:2] == ["joining the Ray cluster", "starting 2 Ray actors"]  # start-up, shown as such
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 200


def ray_descendants(pid):
    """{pid: start time} of the Ray processes descended from a process (read from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            parents[int(entry)] = (int(fields[1]), fields[19])
        except (OSError, ValueError, IndexError):
            pass
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (its_parent, start) in parents.items():
            if its_parent == parent and child not in found:
                found[child] = start
                frontier.append(child)
    return {p: s for p, s in found.items() if b"ray" in open_or_empty(f"/proc/{p}/cmdline")}


def open_or_empty(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def still_running(processes):
    alive = []
    for pid, start in processes.items():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[19] == start:
                    alive.append(pid)
        except (OSError, IndexError):
            pass
    return alive


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the cluster's processes in /proc (Linux)")
def test_a_local_cluster_is_quiet_and_stops_with_its_driver_even_one_killed(model_path, tmp_path):
    inputs = corpus(tmp_path / "docs.jsonl", 3000, seed=2)
    argv = [sys.executable, "-m", "picogpt", "score-corpus", str(inputs), "--model", str(model_path), "--ray", "local"]
    process = subprocess.Popen(argv + ["--out", str(tmp_path / "o.jsonl")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    out = tmp_path / "o.jsonl"
    deadline, cluster_processes = time.monotonic() + 120, {}
    while time.monotonic() < deadline and process.poll() is None and not (out.exists() and out.stat().st_size):
        cluster_processes.update(ray_descendants(process.pid))
        time.sleep(0.2)
    cluster_processes.update(ray_descendants(process.pid))
    assert process.poll() is None and len(cluster_processes) >= 4, "the run ended before it could be killed"
    process.kill()  # SIGKILL: no atexit, no ray.shutdown
    stdout, stderr = process.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while still_running(cluster_processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not still_running(cluster_processes), [open_or_empty(f"/proc/{p}/cmdline") for p in
                                                  still_running(cluster_processes)]
    assert stdout == b"" and not ray_errors(stderr.decode()), stderr  # nothing of Ray's on stdout, no error line

    small = corpus(tmp_path / "small.jsonl", 100)  # a whole run: quiet to the end, and nothing left after it
    done = subprocess.run([*argv[:4], str(small), *argv[5:], "--out", str(tmp_path / "s.jsonl")], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert done.stderr.splitlines()[-1].startswith("picogpt score-corpus: scored 100 documents"), done.stderr
    assert not ray_errors(done.stderr), done.stderr


def ray_errors(stderr):
    """Ray's error-level lines (its C++ core's "[time E pid tid] ..." and Python's "ERROR"): a run has none.
    (Warnings may show, such as a small /dev/shm: Ray's logging is at warning level.)"""
    import re
    return [line for line in stderr.splitlines()
            if re.match(r"\[[^\]]* [EF] \d+ \d+\]", line) or re.search(r"\sERROR\s", line)]


def test_without_ray_the_option_says_how_to_install_it(model_path, tmp_path, capsys, monkeypatch):
    inputs = corpus(tmp_path / "docs.jsonl", 12)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    assert main(["score-corpus", str(inputs), "--out", str(tmp_path / "o.jsonl"), "--model", str(model_path),
                 "--ray", "auto"]) == 1
    err = capsys.readouterr().err
    assert "--ray needs Ray, which is not installed: " in err and "pip install" in err and "ray" in err
