"""picogpt serve on Ray Serve (--ray): two replicas on a local cluster of 2 CPUs answer with the command line's
text, and a replica killed (its process sent SIGKILL) is replaced by Ray Serve while the other keeps serving.
Needs Ray with Serve (the test extra's ray[serve]); without it these tests skip."""

import os
import signal
import socket
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[test]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")
pytest.importorskip("fastapi")
try:  # the HTTP client the openai package is built on (httpx2 in its newer releases, httpx before)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

import picogpt  # noqa: E402
from conftest import process_ids  # noqa: E402
from picogpt import serve_ray  # noqa: E402
from picogpt.generate import complete  # noqa: E402
from picogpt.scheduler import wait_until  # noqa: E402


def a_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployed():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    port = a_free_port()
    model = picogpt.load("demo")
    try:
        serve_ray.deploy(ray, model, "demo", replicas=2, port=port, threads=1)
        yield model, f"http://127.0.0.1:{port}"
    finally:
        serve_ray.shutdown(ray)
        ray.shutdown()


def replica_pids():
    """Process ids of the running replicas (Ray titles an actor's process after its class: ServeReplica:APP:NAME)."""
    return process_ids(b"ServeReplica:picogpt:PicogptServer")


def ask(url, prompt, n_tokens=12):
    answer = httpx.post(f"{url}/v1/completions", json=dict(model="demo", prompt=prompt, max_tokens=n_tokens,
                                                           temperature=0), timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the replicas' processes in /proc (Linux)")
def test_two_replicas_answer_and_a_killed_one_is_replaced_while_the_other_serves(deployed):
    model, url = deployed
    assert serve_ray.replicas_running(ray) == 2
    pids = replica_pids()
    assert len(pids) == 2
    prompts = ["The optional argument", "Return a new list", "If the"]
    for prompt in prompts * 2:
        assert ask(url, prompt) == complete(model, prompt, 12)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    os.kill(pids[0], signal.SIGKILL)
    started = time.monotonic()
    answered = 0
    while time.monotonic() - started < 60 and not (answered >= 3 and serve_ray.replicas_running(ray) == 2
                                                    and pids[0] not in replica_pids() and len(replica_pids()) == 2):
        assert ask(url, prompts[answered % 3]) == complete(model, prompts[answered % 3], 12)  # the other serves
        answered += 1
        time.sleep(0.2)
    assert wait_until(lambda: serve_ray.replicas_running(ray) == 2 and len(replica_pids()) == 2, 60)
    assert pids[0] not in replica_pids() and answered >= 3
    assert ask(url, prompts[0]) == complete(model, prompts[0], 12)
