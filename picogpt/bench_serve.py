"""`picogpt serve-bench`: what continuous batching buys. N streams are started at once (N = 1, 2, 4, 8, 16),
each asking for the same number of tokens; one row per N gives the aggregate tokens/s, the time to first
token (mean and worst), and both as ratios to the one-stream row of the same run.

The targets (issue 37), at GPT-2 124M's shape with 2 BLAS threads: 8 streams give at least 3x the aggregate
tokens/s of one, and each of the 8 streams' time to first token stays under 2x one stream's. By default the
streams go straight to the scheduler (picogpt.scheduler.Engine), so the figures are the batching's own; with
--http they are streaming requests to the real server on 127.0.0.1, whose clients share the CPU.

Greedy, with <|endoftext|> a token like any other, so that every stream runs exactly its n tokens; each
stream's prompt is different (random token ids of the given length, fixed seed).
"""

import asyncio
import json
import platform
import threading
import time
from pathlib import Path

import numpy as np

from . import blas
from .errors import PicogptError
from .sampling import logits_processors
from .scheduler import Completion, Engine, Failed, Finished, Token

SHAPE_124M = dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12)
SEED = 124
TARGET_STREAMS, TARGET_SPEEDUP, TARGET_TTFT = 8, 3.0, 2.0


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average():
    """The 1-minute load average (a machine shared with other work times slower): a string, or "unknown"."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "unknown"


def random_124m(folder):
    """A model of random weights of GPT-2 124M's shape (fixed seed), written in folder and loaded."""
    from .bench import random_model
    from .store import load
    path = random_model(Path(folder) / "124M" / "model.dat", dict(SHAPE_124M), SEED)
    return load(str(path), quiet=True)


def prompts_for(model, n_streams, n_tokens):
    rng = np.random.default_rng(SEED)
    return [rng.integers(0, model.hparams["n_vocab"], n_tokens).tolist() for _ in range(n_streams)]


class StreamTimes:
    """When a stream was started, took its first token, and finished; its tokens."""

    def __init__(self):
        self.started = time.perf_counter()
        self.first = self.finished = None
        self.n_tokens = 0
        self.error = None
        self.done = threading.Event()

    def __call__(self, event):  # the engine's sink
        now = time.perf_counter()
        if isinstance(event, Token):
            self.first = self.first or now
            self.n_tokens += 1
        elif isinstance(event, Finished):
            self.finished = now
            self.done.set()
        elif isinstance(event, Failed):
            self.error = event.message
            self.done.set()


def run_engine(engine, prompts, n_tokens):
    """Start one stream per prompt at once; their StreamTimes once all have finished."""
    streams = []
    for prompt in prompts:
        times = StreamTimes()
        streams.append(times)
        engine.submit(Completion(prompt, n_tokens, logits_processors(), times, stop_at_eot=False))
    for times in streams:
        times.done.wait()
        if times.error:
            raise PicogptError(f"a stream failed: {times.error}")
    return streams


def run_http(url, prompts, n_tokens):
    """The same through the server: one streaming request per prompt, all at once."""
    try:  # the HTTP client the openai package is built on: httpx2 in its newer releases, httpx before
        import httpx2 as httpx
    except ImportError:
        import httpx

    async def one(client, prompt):
        times = StreamTimes()
        body = dict(prompt=prompt, max_tokens=n_tokens, temperature=0, ignore_eos=True, stream=True)
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    times.first = times.first or time.perf_counter()
                    times.n_tokens += 1 if choice["finish_reason"] is None else 0
        times.finished = time.perf_counter()
        return times

    async def all_at_once():
        limits = httpx.Limits(max_connections=len(prompts) + 1)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))
    return asyncio.run(all_at_once())


def summary(streams):
    """(aggregate tokens/s, mean and worst time to first token in seconds)."""
    start = min(s.started for s in streams)
    seconds = max(s.finished for s in streams) - start
    ttft = [s.first - s.started for s in streams]
    return sum(s.n_tokens for s in streams) / seconds, float(np.mean(ttft)), float(np.max(ttft))


def run_serve_bench(model, weights, streams=(1, 2, 4, 8, 16), n_tokens=64, prompt_tokens=16, repeats=1, http=False):
    """Print one row per stream count (the best of `repeats` runs), then whether the targets are met."""
    h = model.hparams
    if prompt_tokens + n_tokens > h["n_ctx"]:
        raise PicogptError(f"--prompt-tokens plus -n exceed the model's context of {h['n_ctx']} tokens")
    engine = Engine(model, max_rows=max(streams)).start()
    server = None
    if http:
        from .serve import ServerThread
        server = ServerThread(engine, "bench")
    try:
        print(f"serve-bench: {weights} (n_layer {h['n_layer']}, n_embd {h['n_embd']}), {blas.describe()}, "
              f"CPU {cpu_name()}; {n_tokens} tokens per stream after a {prompt_tokens}-token prompt, greedy, "
              f"{'streaming HTTP requests to 127.0.0.1' if http else 'the scheduler alone'}, best of {repeats}; "
              f"load average {load_average()} before")
        run = (lambda prompts: run_http(server.url, prompts, n_tokens)) if http else \
            (lambda prompts: run_engine(engine, prompts, n_tokens))
        run(prompts_for(model, 1, prompt_tokens))  # warm-up: the first pass pays for page faults
        print(f"{'streams':>7}  {'tokens/s':>9}  {'x 1':>5}  {'TTFT mean':>10}  {'TTFT worst':>10}  {'worst / 1':>9}")
        rows = {}
        for n_streams in streams:
            best = None
            for _ in range(repeats):
                figures = summary(run(prompts_for(model, n_streams, prompt_tokens)))
                best = figures if best is None or figures[0] > best[0] else best
            rows[n_streams] = best
            one = rows.get(1, rows[streams[0]])
            rate, mean_ttft, worst_ttft = best
            print(f"{n_streams:>7}  {rate:>9.1f}  {rate / one[0]:>5.2f}  {1000 * mean_ttft:>8.1f}ms  "
                  f"{1000 * worst_ttft:>8.1f}ms  {worst_ttft / one[2]:>9.2f}", flush=True)
    finally:
        if server:
            server.close()
        engine.stop()
    print(f"load average {load_average()} after (the CPUs' other work slows every row)")
    if 1 in rows and TARGET_STREAMS in rows:
        speedup = rows[TARGET_STREAMS][0] / rows[1][0]
        ttft = rows[TARGET_STREAMS][2] / rows[1][2]
        met = speedup >= TARGET_SPEEDUP and ttft < TARGET_TTFT
        print(f"target ({TARGET_STREAMS} streams: >= {TARGET_SPEEDUP:g}x one stream's tokens/s, every time to first "
              f"token < {TARGET_TTFT:g}x one stream's): {speedup:.2f}x and {ttft:.2f}x, "
              f"{'met' if met else 'NOT met'}")
    return 0
