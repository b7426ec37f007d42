"""`picogpt serve`: OpenAI's legacy completions API (the one base models are served with) over HTTP, with
every request decoded in one continuous batch (picogpt.scheduler).

    POST /v1/completions    prompt (text, texts, token ids or lists of them), max_tokens, temperature, top_p,
                            n, stop, seed, stream, logprobs, echo; picogpt's own top_k, repetition_penalty,
                            no_repeat_ngram_size, and vLLM's ignore_eos
    GET  /v1/models         the model served
    GET  /health            {"status": "ok", ...} while the server works (no key needed)

This module is the HTTP side only: it checks a request's body (one sentence naming the field, with the
API's error JSON and status 400), turns it into the scheduler's Completions, and turns their events into
the API's responses: one JSON object, or server-sent events in the API's chunk format ending with
`data: [DONE]`. An ASGI app (FastAPI, under uvicorn); the only module besides serve_ray that imports them.
The server-sent events are written here, one line each (`data: {json}`), rather than through sse-starlette:
the format is two lines, and StreamingResponse already stops a stream whose client has gone.
"""

import asyncio
import contextlib
import hmac
import json
import math
import numbers
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .errors import PicogptError, first_line, one_line, plural
from .generate import check_fits, prompt_ids
from .memory import check_memory
from .sampling import logits_processors
from .scheduler import Completion, EngineBusy, Failed, Finished, PromptLogprobs, Token, token_text
from .tokenizer import EOT, decode

# The limits (docs/serve.md states them): a request beyond one is refused with 400, naming the field.
MAX_BODY_BYTES = 2**20  # a request's JSON body
MAX_PROMPTS = 16  # prompts in one request
MAX_N = 16  # choices per prompt (and prompts x n must fit in the batch: --max-batch)
MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's API caps it
MAX_STOPS = 4  # stop strings, as OpenAI's API caps them
DEFAULT_MAX_TOKENS = 16  # the API's default

# The fields of a completion request: OpenAI's, then picogpt's extensions (named as such in the docs).
API_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
              "stream_options", "logprobs", "echo", "presence_penalty", "frequency_penalty", "best_of",
              "logit_bias", "suffix", "user"}
EXTENSIONS = {"top_k", "repetition_penalty", "no_repeat_ngram_size", "ignore_eos"}


class RequestError(Exception):
    """A request the API refuses: HTTP status, one sentence, and the field it names (param)."""

    def __init__(self, message, param=None, status=400, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = one_line(message), param, status, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------
# A request's body -> checked settings

@dataclass
class CompletionRequest:
    prompts: list  # [[token ids]], one list per prompt
    texts: list  # each prompt's text (echo returns it)
    max_tokens: int
    n: int
    stop: tuple
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool
    ignore_eos: bool
    sampling: dict = field(default_factory=dict)  # temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _get(body, name, default, check, expected):
    """body[name] (default when absent or null), refused unless check(value): 'name must be <expected>'."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise RequestError(f"{name} must be {expected}, not {json.dumps(value)[:60]}", name)
    return value


def parse_prompts(prompt, n_vocab):
    """The API's four shapes of prompt -> ([token ids] per prompt, [text] per prompt)."""
    def ids_of(tokens, where):
        if not tokens:
            raise RequestError(f"{where} is an empty list of token ids; give at least one token", "prompt")
        if not all(_is_int(t) and 0 <= t < n_vocab for t in tokens):
            bad = next(t for t in tokens if not (_is_int(t) and 0 <= t < n_vocab))
            raise RequestError(f"{where} holds {json.dumps(bad)[:30]}, which is not a token id of this model's "
                               f"vocabulary (0 to {n_vocab - 1})", "prompt")
        return [int(t) for t in tokens]

    def text_ids(text):
        try:
            return prompt_ids(text)
        except PicogptError as e:
            raise RequestError(f"prompt: {e}", "prompt") from None

    if prompt is None:
        raise RequestError("prompt is missing; give the text to continue (a string, a list of strings, token ids, or "
                           "a list of token-id lists)", "prompt")
    if isinstance(prompt, str):
        return [text_ids(prompt)], [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                           "lists", "prompt")
    if all(isinstance(p, str) for p in prompt):
        prompts, texts = [text_ids(p) for p in prompt], list(prompt)
    elif all(_is_int(t) for t in prompt):
        prompts = [ids_of(prompt, "prompt")]
        texts = [decode(prompts[0])]
    elif all(isinstance(p, list) for p in prompt):
        prompts = [ids_of(p, f"prompt {i}") for i, p in enumerate(prompt)]
        texts = [decode(p) for p in prompts]
    else:
        raise RequestError("prompt mixes kinds; give one string, a list of strings, a list of token ids or a list of "
                           "token-id lists", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"prompt holds {len(prompts)} prompts, more than the {MAX_PROMPTS} this server takes in "
                           f"one request; send them in several", "prompt")
    return prompts, texts


def parse_completion_request(body, model, model_id, max_rows):
    """A /v1/completions body (a parsed JSON object) -> CompletionRequest, or RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object of the request's fields")
    unknown = sorted(set(body) - API_FIELDS - EXTENSIONS)
    if unknown:
        raise RequestError(f"unrecognized request argument: {unknown[0]} (see docs/serve.md for the fields taken)",
                           unknown[0])
    asked = body.get("model")
    if asked is not None and asked != model_id:
        raise RequestError(f"the model {json.dumps(asked)[:60]} is not served here; this server serves "
                           f"{json.dumps(model_id)}", "model", status=404, code="model_not_found")
    hparams = model.hparams
    prompts, texts = parse_prompts(body.get("prompt"), hparams["n_vocab"])
    max_tokens = _get(body, "max_tokens", DEFAULT_MAX_TOKENS, lambda v: _is_int(v) and v >= 0, "a whole number >= 0")
    n = _get(body, "n", 1, lambda v: _is_int(v) and 1 <= v <= MAX_N, f"a whole number from 1 to {MAX_N}")
    if n * len(prompts) > max_rows:
        raise RequestError(f"{plural(len(prompts), 'prompt')} times n = {n} make {n * len(prompts)} choices, more than "
                           f"the {max_rows} this server decodes at once; ask for fewer", "n")
    temperature = _get(body, "temperature", 1.0, lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2")
    top_p = _get(body, "top_p", 1.0, lambda v: _is_number(v) and 0 < v <= 1, "a number > 0 and <= 1")
    top_k = _get(body, "top_k", None, lambda v: _is_int(v) and (v >= 1 or v in (0, -1)),
                 "a whole number >= 1 (0 or -1: none)")
    top_k = None if top_k in (0, -1) else top_k
    repetition_penalty = _get(body, "repetition_penalty", 1.0, lambda v: _is_number(v) and v > 0, "a number > 0")
    no_repeat = _get(body, "no_repeat_ngram_size", 0, lambda v: _is_int(v) and v >= 0, "a whole number >= 0")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= MAX_STOPS):
        raise RequestError(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    seed = _get(body, "seed", None, lambda v: _is_int(v) and 0 <= v < 2**63, "a whole number from 0 to 2**63 - 1")
    stream = _get(body, "stream", False, lambda v: isinstance(v, bool), "true or false")
    options = _get(body, "stream_options", {}, lambda v: isinstance(v, dict) and set(v) <= {"include_usage"}
                   and isinstance(v.get("include_usage", False), bool), 'an object such as {"include_usage": true}')
    if options and not stream:
        raise RequestError("stream_options is only for stream: true", "stream_options")
    logprobs = _get(body, "logprobs", None, lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                    f"a whole number from 0 to {MAX_LOGPROBS} (or null: none)")
    echo = _get(body, "echo", False, lambda v: isinstance(v, bool), "true or false")
    ignore_eos = _get(body, "ignore_eos", False, lambda v: isinstance(v, bool), "true or false")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, 0, _is_number, "a number") != 0:
            raise RequestError(f"{name} is not supported: picogpt has no additive penalty; its repetition_penalty "
                               f"(an extension: CTRL's, dividing the logits of tokens already in the text) is the "
                               f"nearest", name)
    if _get(body, "best_of", 1, _is_int, "a whole number") != 1:
        raise RequestError("best_of is not supported (only 1); ask for n choices and rank them yourself", "best_of")
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported; leave it out", "logit_bias")
    if body.get("suffix"):
        raise RequestError("suffix is not supported: GPT-2 only continues text; leave it out", "suffix")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("user must be a string", "user")
    for ids in prompts:  # the context, then the memory, as every decoding path checks them
        if len(ids) > hparams["n_ctx"]:
            raise RequestError(f"the prompt is {plural(len(ids), 'token')}, longer than the model's context of "
                               f"{hparams['n_ctx']} tokens; shorten it", "prompt")
        try:
            check_fits(model, len(ids), max_tokens, remedy="lower max_tokens or shorten the prompt")
        except PicogptError as e:
            raise RequestError(str(e), "max_tokens") from None
    try:
        check_memory(hparams, n * len(prompts), max(map(len, prompts)), max_tokens,
                     remedy="ask for fewer choices (n), prompts or tokens")
    except PicogptError as e:
        raise RequestError(str(e), "n") from None
    sampling = dict(temperature=float(temperature), top_p=float(top_p), top_k=top_k,
                    repetition_penalty=float(repetition_penalty), no_repeat_ngram_size=no_repeat)
    try:
        logits_processors(eos_token_id=EOT, **sampling)
    except PicogptError as e:
        raise RequestError(f"{e}", "temperature") from None
    return CompletionRequest(prompts, texts, max_tokens, n, tuple(stop), seed, stream,
                             bool(options.get("include_usage")), logprobs, echo, ignore_eos, sampling)


# ---------------------------------------------------------------------------------------------------
# One request in the engine: its events -> the API's choices

class ChoiceState:
    """What one choice has so far: text, and (with logprobs) its tokens' log-probabilities and offsets."""

    def __init__(self, index, echo_text=""):
        self.index, self.text, self.finish_reason, self.n_tokens = index, echo_text, None, 0
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        self.offset = 0  # characters of the tokens' own texts so far

    def add_token(self, token, logprob, top):
        """Record a token's log-probabilities; the logprobs object of just this token (a stream's chunk)."""
        text = token_text(token)
        top = None if top is None else {token_text(t): lp for t, lp in top.items()}
        piece = dict(tokens=[text], token_logprobs=[logprob], top_logprobs=[top], text_offset=[self.offset])
        for key, values in piece.items():
            getattr(self, key).extend(values)
        self.offset += len(text)
        return piece

    def logprobs(self):
        return dict(tokens=self.tokens, token_logprobs=self.token_logprobs, top_logprobs=self.top_logprobs,
                    text_offset=self.text_offset)


class RequestRun:
    """A checked request submitted to the engine: one Completion per prompt, whose events arrive (from the
    engine thread) on an asyncio queue, and the API's choices built from them."""

    def __init__(self, engine, request, loop):
        self.request, self.queue = request, asyncio.Queue()
        self.choices = []
        self.completions = []
        for p, ids in enumerate(request.prompts):
            sink = self._sink(loop, p)
            self.completions.append(Completion(ids, request.max_tokens, logits_processors(eos_token_id=EOT,
                                               **request.sampling), sink, n=request.n, stop=request.stop,
                                               seed=request.seed, logprobs=request.logprobs, echo=request.echo,
                                               stop_at_eot=not request.ignore_eos))
            echo_text = request.texts[p] if request.echo else ""
            self.choices += [ChoiceState(p * request.n + c, echo_text) for c in range(request.n)]
        self.open = len(self.choices)
        self.prompt_tokens = sum(map(len, request.prompts))
        try:
            for completion in self.completions:
                engine.submit(completion)
        except PicogptError as e:
            self.cancel()
            raise RequestError(str(e), status=503, kind="server_error",
                               code="overloaded" if isinstance(e, EngineBusy) else "shutting_down") from None

    def _sink(self, loop, p):
        def sink(event):
            loop.call_soon_threadsafe(self.queue.put_nowait, (p, event))
        return sink

    def cancel(self):
        for completion in self.completions:
            completion.cancel()

    async def events(self):
        """Yield (choice state, what this event adds to it: a dict of text, logprobs, finish_reason) until every
        choice has finished; RequestError(500) if the engine failed the request."""
        n, request = self.request.n, self.request
        if request.echo and request.logprobs is None:  # the prompt's text first (with logprobs: its tokens' too)
            for choice in self.choices:
                yield choice, dict(text=request.texts[choice.index // n], logprobs=None, finish_reason=None)
        while self.open:
            p, event = await self.queue.get()
            if isinstance(event, Failed):
                self.cancel()
                raise RequestError(f"the request failed: {event.message}", status=500, kind="server_error")
            if isinstance(event, PromptLogprobs):
                for c in range(n):
                    choice = self.choices[p * n + c]
                    pieces = [choice.add_token(t, lp, top) for t, lp, top in
                              zip(event.tokens, event.logprobs, event.top)]
                    yield choice, dict(text=request.texts[p], logprobs=_joined(pieces), finish_reason=None)
                continue
            choice = self.choices[p * n + event.choice]
            if isinstance(event, Token):
                choice.text += event.text
                choice.n_tokens += 1
                logprobs = None if event.logprob is None else choice.add_token(event.token, event.logprob, event.top)
                yield choice, dict(text=event.text, logprobs=logprobs, finish_reason=None)
            elif isinstance(event, Finished):
                choice.text += event.text
                choice.finish_reason = event.reason
                self.open -= 1
                yield choice, dict(text=event.text, logprobs=None, finish_reason=event.reason)

    def usage(self):
        completion_tokens = sum(c.n_tokens for c in self.choices)
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=self.prompt_tokens + completion_tokens)


def _joined(pieces):
    """Several tokens' logprobs objects as one."""
    return {key: [v for piece in pieces for v in piece[key]] for key in
            ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


# ---------------------------------------------------------------------------------------------------
# The app

def make_app(engine, model_id, api_key=None):
    """The ASGI app over a started Engine. api_key: requests to /v1/ need `Authorization: Bearer <key>`."""
    app = FastAPI(title="picogpt", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def error_response(error):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestError)
    async def refused(request, error):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):  # an unknown path, a wrong method
        message = {404: f"no such endpoint: {request.url.path} (see GET /v1/models, POST /v1/completions)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
        return error_response(RequestError(message, status=error.status_code))

    @app.exception_handler(Exception)
    async def failed(request, error):  # a bug: the request fails, the server goes on
        return error_response(RequestError(f"internal error: {first_line(error)}", status=500, kind="server_error"))

    async def authorized(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError("missing or wrong API key: send the header Authorization: Bearer <key>", status=401,
                               code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.status()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "picogpt"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat():
        raise RequestError("GPT-2 is not a chat model, so /v1/chat/completions is not served; send the text to "
                           "continue to /v1/completions", status=404, code="not_a_chat_model")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        body = await read_json(request)
        checked = parse_completion_request(body, engine.model, model_id, engine.max_rows)
        run = RequestRun(engine, checked, asyncio.get_running_loop())
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=model_id)
        if checked.stream:
            return StreamingResponse(stream_events(run, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await collect(run, head, request))

    return app


async def read_json(request):
    """The body as JSON, read up to MAX_BODY_BYTES: RequestError (400) beyond it, or if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(f"the body is {declared} bytes, more than the {MAX_BODY_BYTES} this server takes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(f"the body is more than the {MAX_BODY_BYTES} bytes this server takes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {first_line(e)}") from None


async def collect(run, head, request):
    """The whole response of a request that does not stream; the client going away cancels it."""
    gone = asyncio.ensure_future(wait_disconnected(request))
    events = run.events().__aiter__()
    try:
        while True:
            step = asyncio.ensure_future(events.__anext__())
            await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():  # the client went away: free its slots at the next step
                step.cancel()
                run.cancel()
                raise RequestError("the client disconnected", status=499)
            try:
                step.result()
            except StopAsyncIteration:
                break
    finally:
        gone.cancel()
        run.cancel()  # (nothing, if every choice finished)
    choices = [dict(text=c.text, index=c.index, logprobs=c.logprobs() if run.request.logprobs is not None else None,
                    finish_reason=c.finish_reason) for c in run.choices]
    return dict(head, choices=choices, usage=run.usage())


async def wait_disconnected(request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def stream_events(run, head):
    """Server-sent events: one chunk per piece of text (or token, with logprobs), a chunk with each choice's
    finish_reason, the usage if asked for, then [DONE]. A client that goes away cancels this generator,
    and its choices leave the batch at the next step."""
    def chunk(payload):
        return f"data: {json.dumps(payload)}\n\n"
    try:
        async for choice, change in run.events():
            if change["text"] or change["logprobs"] or change["finish_reason"]:
                yield chunk(dict(head, choices=[dict(change, index=choice.index)]))
        if run.request.include_usage:
            yield chunk(dict(head, choices=[], usage=run.usage()))
    except RequestError as e:
        yield chunk(e.body())
    finally:
        run.cancel()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------
# Running it under uvicorn

def bind(host, port):
    """A listening socket on host:port (port 0: a free one), or one line saying why not."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise PicogptError(f"cannot listen on {host}:{port}: {e.strerror or first_line(e)}; give another --port "
                           f"(or --host)") from None
    sock.set_inheritable(True)
    return sock


def run_server(engine, model_id, host="127.0.0.1", port=8000, api_key=None, grace=10.0, say=print,
               access_log=False):
    """Serve until SIGTERM or Ctrl-C: then stop accepting, let requests in flight finish for `grace` seconds,
    end the ones still going (finish_reason "length", their text so far), and return."""
    sock = bind(host, port)
    where = sock.getsockname()
    url_host = f"[{where[0]}]" if ":" in where[0] else where[0]
    config = uvicorn.Config(make_app(engine, model_id, api_key), log_level="info" if access_log else "warning",
                            access_log=access_log,
                            timeout_graceful_shutdown=grace + 5, lifespan="off")
    key = "an API key is required" if api_key else "no API key"
    say(f"listening on http://{url_host}:{where[1]} (model {model_id}; {key}; Ctrl-C or SIGTERM stops it)")
    try:
        GracefulServer(config, engine, grace).run(sockets=[sock])
    finally:
        sock.close()


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose stop gives requests in flight `grace` seconds before the engine ends them."""

    def __init__(self, config, engine, grace):
        super().__init__(config)
        self.engine, self.grace, self.cut_timer = engine, grace, None

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        if self.cut_timer is None:
            self.cut_timer = threading.Timer(self.grace, self.engine.cut)
            self.cut_timer.daemon = True
            self.cut_timer.start()

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own re-raises the signal once shut down, which would end the process with status 143 (SIGTERM)
        # or 130: here a stop that was asked for is a clean exit, 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class ServerThread:
    """The app under uvicorn in a thread of this process, on a free port of 127.0.0.1 (for the benchmark's
    --http): .url; close() stops it."""

    def __init__(self, engine, model_id):
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(make_app(engine, model_id), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
