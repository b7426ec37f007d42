"""picogpt serve: the scheduler's slot cache against the model's own cache, then a real server on 127.0.0.1
(the demo model, a free port) called with the official openai client (synchronous, streaming, async),
httpx and curl: the same text as the command line, the same log-probabilities as `picogpt score`, the API's
shapes and errors, keys, disconnects, SIGTERM, and a load test."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
try:  # the HTTP client the openai package is built on (httpx2 in its newer releases, httpx before)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

import picogpt  # noqa: E402
from picogpt.generate import complete, prompt_ids  # noqa: E402
from picogpt.sampling import logits_processors  # noqa: E402
from picogpt.scheduler import Completion, Engine, Failed, Finished, SlotCache, Token, wait_until  # noqa: E402
from picogpt.scoring import score  # noqa: E402
from picogpt.tokenizer import encode  # noqa: E402

PROMPTS = ["The optional argument", "Return a new list", "If the", "A", "Raise an exception when", "The file"]


@pytest.fixture(scope="module")
def demo():
    return picogpt.load("demo")


# ---------------------------------------------------------------------------------------------------
# The scheduler, in process

def test_the_slot_cache_decodes_rows_of_different_lengths_as_the_models_own_cache_does(demo):
    """Three sequences of different lengths in one SlotCache, one decode step for all: each row's logits are
    those of the sequence alone through model.KVCache (a departed row's stale keys included: rows are removed
    and moved, and the mask must hide what lies beyond each row's length)."""
    from picogpt.model import gpt2
    h = demo.hparams
    texts = [prompt_ids(t) for t in ("A", "Return a new list of the", "If the file", "The optional argument is")]
    slots = SlotCache(h, max_rows=4)
    for ids in texts:
        cache = demo.new_cache(1, len(ids))
        demo(ids, cache=cache)
        slots.add(cache.keys[:, 0], cache.values[:, 0])
    slots.remove(1)  # the longest leaves; the last row moves into its place, its keys over the longer ones
    kept = [texts[0], texts[3], texts[2]]
    assert slots.lengths.tolist() == [len(t) for t in kept]
    nxt = [11, 318, 262]
    positions, mask = slots.step_positions_and_mask()
    logits = gpt2(np.array(nxt)[:, None], positions, mask, **demo.params, n_head=h["n_head"],
                  eps=h["layer_norm_epsilon"], cache=slots, last_only=True)[:, -1]
    for row, (ids, token) in enumerate(zip(kept, nxt)):
        alone = demo(ids + [token])[0]
        np.testing.assert_allclose(logits[row], alone, atol=1e-4, rtol=1e-4)
    slots.remove(0), slots.remove(0), slots.remove(0)
    assert slots.n_rows == 0 and slots.nbytes == 0  # the last row out releases the arrays


def collected(events, n=1):
    texts = ["".join(e.text for e in events if isinstance(e, (Token, Finished)) and e.choice == c) for c in range(n)]
    return texts, [e for e in events if isinstance(e, Finished)], [e for e in events if isinstance(e, Failed)]


def test_a_request_whose_consumer_fails_fails_alone_and_the_engine_goes_on(demo):
    """An exception inside one request's handling (here its sink) fails that request only: the others in the
    same batch finish with the command line's text, and a request after it is served."""
    engine = Engine(demo, max_rows=8).start()
    try:
        events = {i: [] for i in range(3)}

        def failing_sink(event):
            events[1].append(event)
            if isinstance(event, Token) and sum(isinstance(e, Token) for e in events[1]) == 3:
                raise RuntimeError("the consumer broke")

        sinks = [events[0].append, failing_sink, events[2].append]
        for i, sink in enumerate(sinks):
            engine.submit(Completion(prompt_ids(PROMPTS[i]), 20, logits_processors(), sink))
        assert wait_until(lambda: all(collected(events[i])[1] for i in (0, 2)) and collected(events[1])[2], 60)
        for i in (0, 2):
            assert collected(events[i])[0] == [complete(demo, PROMPTS[i], 20)]
        assert "the consumer broke" in collected(events[1])[2][0].message
        later = []
        engine.submit(Completion(prompt_ids(PROMPTS[3]), 5, logits_processors(), later.append))
        assert wait_until(lambda: collected(later)[1], 30)
        assert wait_until(lambda: engine.status()["rows"] == 0, 10) and engine.status()["cache_bytes"] == 0
    finally:
        engine.stop()


def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_slot(demo):
    engine = Engine(demo, max_rows=4).start()
    try:
        long_one, short = [], []
        long_request = Completion(prompt_ids("The"), 200, logits_processors(), long_one.append, stop_at_eot=False)
        engine.submit(long_request)
        assert wait_until(lambda: len(long_one) >= 3, 30)
        long_request.cancel()
        assert wait_until(lambda: engine.status()["rows"] == 0, 10)
        assert not collected(long_one)[1]  # nothing more was said to it
        engine.submit(Completion(prompt_ids("A"), 3, logits_processors(), short.append))
        assert wait_until(lambda: collected(short)[1], 30)
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------------------------
# A real server

def server_memory(pid):
    """The server process's resident memory in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class Server:
    """`picogpt serve --model demo --port 0` in a child process; .url once it listens."""

    def __init__(self, *args, env=None):
        self.output = []
        self.process = subprocess.Popen([sys.executable, "-m", "picogpt", "serve", "--model", "demo", "--port", "0",
                                         "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, **(env or {})})
        line = self.process.stdout.readline()
        self.output.append(line)
        found = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        if not found:
            self.process.kill()
            raise AssertionError(f"the server did not start: {line}{self.process.stdout.read()}")
        self.url, self.port = found.group(1), int(found.group(2))
        self.reader = threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def client(self, **options):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=options.pop("api_key", "none"), max_retries=0,
                             **options)

    def stop(self, timeout=30):
        """SIGTERM, and the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture(scope="module")
def server():
    server = Server("--max-batch", "16")
    yield server
    assert server.stop() == 0, "".join(server.output)


def test_greedy_completions_are_the_command_lines_text(server, demo):
    """The text of `python -m picogpt PROMPT -n 20 --model demo`, alone and with others in the batch."""
    done = subprocess.run([sys.executable, "-m", "picogpt", PROMPTS[0], "-n", "20", "--model", "demo"],
                          capture_output=True, text=True, timeout=120)
    client = server.client()
    answer = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert answer.choices[0].text + "\n" == done.stdout
    assert answer.object == "text_completion" and answer.model == "demo" and answer.id.startswith("cmpl-")
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].index == 0
    assert answer.usage.prompt_tokens == len(encode(PROMPTS[0]))
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.completions.create(model="demo", prompt=p, max_tokens=30,
                                                                     temperature=0) for p in PROMPTS))
    answers = asyncio.run(together())
    assert [a.choices[0].text for a in answers] == [complete(demo, p, 30) for p in PROMPTS]


def test_several_prompts_and_choices_in_one_request(server, demo):
    answer = server.client().completions.create(model="demo", prompt=PROMPTS[:3], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in answer.choices] == list(range(6))
    assert [c.text for c in answer.choices] == [t for p in PROMPTS[:3] for t in [complete(demo, p, 8)] * 2]
    tokens = answer.choices[0].text and encode(answer.choices[0].text)
    assert answer.usage.prompt_tokens == sum(len(encode(p)) for p in PROMPTS[:3]) and tokens


def test_seeded_sampling_is_the_command_lines_whatever_else_is_in_the_batch(server, demo):
    """seed S with n choices samples as `picogpt --seed S --num-samples n`, alone or among other requests."""
    settings = dict(model="demo", prompt="The", max_tokens=20, temperature=0.9, top_p=0.95, seed=7, n=2)
    alone = [c.text for c in server.client().completions.create(**settings).choices]
    assert alone == complete(demo, "The", 20, temperature=0.9, top_p=0.95, seed=7, num_samples=2)

    async def crowded():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as aclient:
            others = [aclient.completions.create(model="demo", prompt=p, max_tokens=25, temperature=1, seed=i)
                      for i, p in enumerate(PROMPTS)]
            return await asyncio.gather(aclient.completions.create(**settings), *others)
    assert [c.text for c in asyncio.run(crowded())[0].choices] == alone


def test_streamed_text_is_the_text_not_streamed(server):
    client = server.client()
    for settings in (dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=0, stop=[" the", "."])):
        whole = client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=25, **settings)
        chunks = list(client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=25, stream=True,
                                                **settings))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    for echo in (dict(echo=True), dict(echo=True, logprobs=1)):  # the prompt comes first, streamed or not
        whole = client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=5, temperature=0, **echo)
        chunks = list(client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=5, temperature=0,
                                                stream=True, **echo))
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert whole.choices[0].text.startswith(PROMPTS[2]) and len(whole.choices[0].text) > len(PROMPTS[2])
    stopped = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=25, temperature=0, stop=" first")
    assert stopped.choices[0].text == " is the same as for the" and stopped.choices[0].finish_reason == "stop"


def test_echo_and_logprobs_are_picogpt_scores(server, demo):
    """echo with logprobs and max_tokens 0, as lm-evaluation-harness scores text: the per-token
    log-probabilities of `picogpt score --no-eot` (picogpt.scoring.score), to 1e-5."""
    text = "Return a new list of the items, sorted by their keys."
    answer = server.client().completions.create(model="demo", prompt=text, max_tokens=0, echo=True, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert answer.choices[0].text == text and logprobs.token_logprobs[0] is None
    ids = encode(text)
    np.testing.assert_allclose(logprobs.token_logprobs[1:], score(demo, ids).token_log_probs, atol=1e-5, rtol=0)
    assert "".join(logprobs.tokens) == text and logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]
    assert all(len(top) >= 2 for top in logprobs.top_logprobs[1:])
    # lm-evaluation-harness's shape: a list of token-id lists; the EOT it puts in front is a token like any
    contexts = [[50256] + encode("The optional argument"), encode("If the file exists")]
    batch = httpx.post(f"{server.url}/v1/completions", json=dict(model="demo", prompt=contexts, max_tokens=0,
                                                                 echo=True, logprobs=1, temperature=0)).json()
    for ids, choice in zip(contexts, batch["choices"]):
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:], score(demo, ids).token_log_probs,
                                   atol=1e-5, rtol=0)


def test_generated_tokens_logprobs_and_the_usage_in_a_stream(server, demo):
    client = server.client()
    answer = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = answer.choices[0].logprobs
    assert "".join(lp.tokens) == answer.choices[0].text and len(lp.token_logprobs) == answer.usage.completion_tokens
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and top[token] == logprob == max(top.values())  # greedy takes the likeliest
    ids = encode(PROMPTS[0]) + encode(answer.choices[0].text)
    np.testing.assert_allclose(lp.token_logprobs, score(demo, ids).token_log_probs[-6:], atol=1e-5, rtol=0)
    chunks = list(client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_the_raw_shapes_with_curl(server):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps(dict(model="demo", prompt="The", max_tokens=3, temperature=0))
    done = subprocess.run([curl, "-s", "-i", f"{server.url}/v1/completions", "-H", "Content-Type: application/json",
                           "-d", body], capture_output=True, text=True, timeout=60)
    head, _, payload = done.stdout.partition("\n\n")  # (text mode reads \r\n as \n)
    assert head.startswith("HTTP/1.1 200") and "content-type: application/json" in head.lower()
    answer = json.loads(payload)
    assert set(answer) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(answer["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    streamed = subprocess.run([curl, "-s", "-N", f"{server.url}/v1/completions", "-d",
                               json.dumps(dict(json.loads(body), stream=True))], capture_output=True, text=True,
                              timeout=60).stdout
    events = [line for line in streamed.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == answer["choices"][0]["text"]
    models = json.loads(subprocess.run([curl, "-s", f"{server.url}/v1/models"], capture_output=True, text=True,
                                       timeout=60).stdout)
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["demo"]
    assert [m.id for m in server.client().models.list()] == ["demo"]


BAD_BODIES = [  # (body, the field named); the demo model's context is 256 tokens
    (dict(prompt="x", max_tokens=300), "max_tokens"),
    (dict(prompt="x " * 300), "prompt"),
    (dict(prompt="x", max_tokens=-1), "max_tokens"),
    (dict(prompt="x", max_tokens="ten"), "max_tokens"),
    (dict(prompt="x", n=17), "n"),
    (dict(prompt="x", logprobs=6), "logprobs"),
    (dict(prompt="x", temperature=-1), "temperature"),
    (dict(prompt="x", top_p=0), "top_p"),
    (dict(prompt="x", stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(prompt="x", stop=""), "stop"),
    (dict(prompt="x", stream="yes"), "stream"),
    (dict(prompt="x", seed=-3), "seed"),
    (dict(prompt="x", presence_penalty=0.5), "presence_penalty"),
    (dict(prompt="x", frequency_penalty=1), "frequency_penalty"),
    (dict(prompt="x", best_of=3), "best_of"),
    (dict(prompt="x", logit_bias={"50256": -100}), "logit_bias"),
    (dict(prompt="x", suffix="end"), "suffix"),
    (dict(prompt="x", temperature=0, top_k=5), "temperature"),
    (dict(prompt="x", repetition_penalty=0), "repetition_penalty"),
    (dict(prompt="x", stream_options={"include_usage": True}), "stream_options"),
    (dict(prompt="x", frobnicate=1), "frobnicate"),
    (dict(), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[1, "a"]), "prompt"),
    (dict(prompt=[[1, 2], []]), "prompt"),
    (dict(prompt=[70000]), "prompt"),
    (dict(prompt=["x"] * 17), "prompt"),
    (dict(prompt=["x"] * 9, n=2), "n"),
]


@pytest.mark.parametrize("body, field", BAD_BODIES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_BODIES)])
def test_a_bad_request_is_400_naming_the_field_and_the_server_goes_on(server, body, field):
    answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == field and field in error["message"] + " prompt" and "\n" not in error["message"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_bodies_that_are_not_requests(server):
    url = f"{server.url}/v1/completions"
    for content in (b"{not json", b"[1, 2]", json.dumps(dict(prompt="x" * (2**20 + 10))).encode()):
        answer = httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["message"], answer.text
    assert httpx.post(url, json=dict(model="gpt-4", prompt="x")).status_code == 404
    chat = httpx.post(f"{server.url}/v1/chat/completions", json=dict(model="demo", messages=[]))
    assert chat.status_code == 404 and "not a chat model" in chat.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client().completions.create(model="demo", prompt="x", max_tokens=1000)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", json=dict(
            model="demo", prompt="The", max_tokens=200, ignore_eos=True, stream=True), timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert httpx.get(f"{server.url}/health").json()["rows"] >= 1
    assert wait_until(lambda: httpx.get(f"{server.url}/health").json()["rows"] == 0, 10)


def test_an_api_key_is_required_compared_and_never_logged():
    key = "sk-test-0123456789abcdef"
    server = Server("-v", env={"PICOGPT_API_KEY": key})
    try:
        url = f"{server.url}/v1/completions"
        body = dict(model="demo", prompt="The", max_tokens=2)
        assert httpx.post(url, json=body).status_code == 401
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert server.client(api_key=key).completions.create(**body).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="sk-other").completions.create(**body)
        assert httpx.get(f"{server.url}/health").status_code == 200  # (says nothing about the model's answers)
    finally:
        assert server.stop() == 0
    log = "".join(server.output)
    assert "POST /v1/completions" in log and key not in log  # -v logs requests, never the key


def test_sigterm_ends_requests_in_flight_cleanly_and_exits_0():
    """With --grace 1, a stream still going when SIGTERM comes is ended with finish_reason "length" and
    [DONE] about a second later; no new connection is taken; the process exits 0."""
    server = Server("--grace", "1")
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=dict(
                model="demo", prompt="The", max_tokens=240, ignore_eos=True, stream=True), timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert time.monotonic() - started < 10
        assert server.process.wait(20) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=5)
    finally:
        server.stop()


def test_load_many_clients_some_streaming_some_cancelled(server):
    """24 concurrent clients send 240 requests (a third streaming, one in eight of those cut after their first
    chunk): every request is answered, none with a 5xx, the batch is empty afterwards, its cache released, and
    the server's memory back near its level before the burst. Prints the figures (pytest -s)."""
    health = f"{server.url}/health"
    httpx.post(f"{server.url}/v1/completions", json=dict(model="demo", prompt="warm", max_tokens=4))
    before = server_memory(server.process.pid)
    n_clients, n_requests = 24, 240
    results, peak = [], [0]

    async def one(aclient, i):
        body = dict(model="demo", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=1 + i % 12, temperature=i % 3 * 0.5,
                    seed=i, n=1 + (i % 5 == 0))
        if i % 3:
            answer = await aclient.post("/v1/completions", json=body)
            results.append(("plain", answer.status_code, answer.json()["choices"][0]["finish_reason"]))
            return
        async with aclient.stream("POST", "/v1/completions", json=dict(body, stream=True)) as answer:
            lines = []
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if i % 8 == 0:  # cancelled: the client goes away mid-stream
                        break
            cut = i % 8 == 0
            results.append(("cancelled" if cut else "stream", answer.status_code, "cut" if cut else lines[-1]))

    async def client_loop(c):
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as aclient:
            for i in range(c, n_requests, n_clients):
                await one(aclient, i)
                peak[0] = max(peak[0], (await aclient.get("/health")).json()["rows"])

    async def burst():
        await asyncio.gather(*(client_loop(c) for c in range(n_clients)))

    started = time.monotonic()
    asyncio.run(burst())
    seconds = time.monotonic() - started
    assert len(results) == n_requests
    statuses = [status for _, status, _ in results]
    assert statuses.count(200) == n_requests, sorted(set(statuses))
    assert all(end == "data: [DONE]" for kind, _, end in results if kind == "stream")
    assert all(end in ("stop", "length") for kind, _, end in results if kind == "plain")
    assert wait_until(lambda: httpx.get(health).json()["rows"] == 0, 10)
    state = httpx.get(health).json()
    assert state["waiting"] == 0 and state["cache_bytes"] == 0
    after = server_memory(server.process.pid)
    print(f"\nload test: {n_requests} requests from {n_clients} concurrent clients in {seconds:.1f} s "
          f"({sum(k == 'stream' for k, _, _ in results)} streamed, {sum(k == 'cancelled' for k, _, _ in results)} "
          f"cancelled mid-stream), {sum(s >= 500 for s in statuses)} 5xx, at most {peak[0]} rows in a step seen; "
          f"server memory {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after")
    assert after < before + 64 * 2**20


def test_the_command_refuses_in_one_line(server):
    for args, status, words in ((["--replicas", "2"], 2, "needs --ray"), (["--port", "70000"], 2, "--port"),
                                (["--port", str(server.port)], 1, "cannot listen on 127.0.0.1")):
        done = subprocess.run([sys.executable, "-m", "picogpt", "serve", "--model", "demo", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == status and words in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


def test_serve_bench_prints_a_row_per_stream_count_with_same_run_ratios():
    """The benchmark's shape (its figures are for docs/serve.md, never asserted here)."""
    done = subprocess.run([sys.executable, "-m", "picogpt", "serve-bench", "--model", "demo", "--streams", "1,2", "-n",
                           "4", "--prompt-tokens", "4", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"\s+\d+\s+[\d.]+\s+[\d.]+\s", line)]
    assert [row[0] for row in rows] == ["1", "2"] and rows[0][2] == "1.00"
    assert "CPU " in done.stdout.splitlines()[0]


def test_an_exception_in_one_request_is_a_500_for_it_alone(demo, monkeypatch):
    """A fault inside one request's decoding (here a processor that raises, put in for requests with
    repetition_penalty 1.2345) answers that request 500 with a message, streaming or not, while a request
    decoded in the same batch gets its text; the server then serves on. The app and uvicorn are the real ones,
    in a thread of this process, so that the fault can be put in."""
    from picogpt import serve
    from picogpt.sampling import LogitsProcessors

    def broken(scores, text):
        raise RuntimeError("a processor broke")

    def processors(**options):
        if options.get("repetition_penalty") == 1.2345:
            return LogitsProcessors([broken], sample=False)
        return logits_processors(**options)

    monkeypatch.setattr(serve, "logits_processors", processors)
    engine = Engine(demo, max_rows=8).start()
    server = serve.ServerThread(engine, "demo")
    try:
        async def together():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                body = dict(model="demo", max_tokens=20, temperature=0)
                return await asyncio.gather(
                    client.post("/v1/completions", json=dict(body, prompt=PROMPTS[0])),
                    client.post("/v1/completions", json=dict(body, prompt=PROMPTS[1], repetition_penalty=1.2345)),
                    client.post("/v1/completions", json=dict(body, prompt=PROMPTS[2], repetition_penalty=1.2345,
                                                             stream=True)))
        good, bad, bad_stream = asyncio.run(together())
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == complete(demo, PROMPTS[0], 20)
        assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
        assert "a processor broke" in bad.json()["error"]["message"]
        events = [line[6:] for line in bad_stream.text.splitlines() if line.startswith("data: ")]
        assert "a processor broke" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
        again = httpx.post(f"{server.url}/v1/completions", json=dict(model="demo", prompt="A", max_tokens=3))
        assert again.status_code == 200 and engine.status()["rows"] == 0
    finally:
        server.close()
        engine.stop()


def test_a_large_request_is_not_passed_over_by_smaller_ones():
    """Admission is strictly oldest first: a request of n=4 waiting for slots stops younger n=1 requests from
    taking the slots it waits for, so a steady stream of small ones cannot starve it."""
    from types import SimpleNamespace

    from picogpt.scheduler import Engine
    engine = Engine.__new__(Engine)  # the admission rule alone: no model, no thread
    engine.max_rows, engine.rows = 4, [object()] * 2  # two slots free
    big, small_ones = SimpleNamespace(n=4, cancelled=False), [SimpleNamespace(n=1, cancelled=False) for _ in range(3)]
    engine.waiting = [big] + small_ones
    assert engine._take_admissible() == [] and engine.waiting == [big] + small_ones
    engine.rows = []
    assert engine._take_admissible() == [big] and engine.waiting == small_ones
