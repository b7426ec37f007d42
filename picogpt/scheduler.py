"""Continuous batching: many completions decoded together, each joining and leaving the batch on its own.

A server's requests arrive whenever their clients send them, ask for different lengths and settings, and
end at different steps. Decoding them one after another would make each wait for all before it; padding
them into one fixed batch (picogpt.generate's loop) would make each wait for the batch's longest. Here,
as in vLLM's and llama.cpp's servers, one engine thread repeats one step:

    1. admit:  prompts that arrived since the last step are run through the model together (a left-padded
               prefill, picogpt.model's positions and mask), their first tokens chosen, and their keys and
               values copied into free rows ("slots") of one cache;
    2. leave:  the rows of completions that ended (a stop, their max_tokens, a cancelled or disconnected
               request) were dropped at the end of the step before, freeing their slots;
    3. decode: every row in the cache runs one token through the model as one batch [n_rows, 1], each at
               its own position and seeing its own keys only (SlotCache), and chooses its next token.

A request never waits for another to finish: it joins at the next step, whatever the others are doing.

The math stays in picogpt.model (`gpt2`, called with the positions and mask built here); the choice of
each token is picogpt.sampling's pipeline, built per request from its own settings; text, stop strings and
<|endoftext|> are picogpt.generate's TextStream. Each request draws from its own random stream, so what a
seeded request samples does not depend on what else is in the batch: a request of n choices and seed S
draws exactly as `picogpt --seed S --num-samples n` does.

Nothing here knows HTTP: a request hands in a `sink`, a callable that receives its events (Token,
PromptLogprobs, Finished, Failed) from the engine thread, and picogpt.serve turns them into the API's shapes.
"""

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import blas
from .errors import PicogptError, first_line, plural
from .generate import TextStream, next_token_logits
from .model import gpt2
from .sampling import Text, choose_next, random_stream
from .scoring import token_log_probs
from .tokenizer import EOT, decode

PREFILL_TOKENS = 4096  # padded prompt tokens run in one prefill at most (a longer prompt runs alone)


# ---------------------------------------------------------------------------------------------------
# The cache: one row per sequence being decoded, each with its own length

class SlotCache:
    """Keys and values of the sequences being decoded, one row ("slot") each, each of its own length.

    keys, values [n_layer, capacity, n_head, n_positions, head_dim]; rows 0..n_rows-1 are in use (a row that
    leaves takes the last row's place, so the rows in use stay contiguous and a step runs exactly them);
    lengths [n_rows]: the positions each row has filled. Both sizes grow (doubling) as rows join and longer
    texts come, and everything is released when the last row leaves, so memory goes back to its level
    after a burst. It offers the interface model.mha writes through: layer(i).extend(k, v).
    """

    def __init__(self, hparams, max_rows):
        self.max_rows = max_rows  # the rows' capacity doubles up to this
        self.shape = (hparams["n_layer"], hparams["n_head"], hparams["n_embd"] // hparams["n_head"])
        self.n_ctx = hparams["n_ctx"]
        self.keys = self.values = None
        self.lengths = np.zeros(0, np.int64)  # [n_rows]
        self._layers = [_SlotLayer(self, i) for i in range(self.shape[0])]

    @property
    def n_rows(self):
        return len(self.lengths)

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def reserve(self, n_rows, n_positions):
        """Room for n_rows rows of n_positions positions (capacities double, positions up to n_ctx)."""
        n_layer, n_head, head_dim = self.shape
        old_rows, old_positions = (0, 0) if self.keys is None else (self.keys.shape[1], self.keys.shape[3])
        if n_rows <= old_rows and n_positions <= old_positions:
            return
        rows = old_rows if n_rows <= old_rows else min(max(n_rows, 2 * old_rows), max(n_rows, self.max_rows))
        positions = old_positions if n_positions <= old_positions else \
            min(max(n_positions, 2 * old_positions), max(n_positions, self.n_ctx))
        keys = np.zeros((n_layer, rows, n_head, positions, head_dim), np.float32)
        values = np.zeros_like(keys)
        if self.keys is not None and self.n_rows:
            used = int(self.lengths.max())
            keys[:, :self.n_rows, :, :used] = self.keys[:, :self.n_rows, :, :used]
            values[:, :self.n_rows, :, :used] = self.values[:, :self.n_rows, :, :used]
        self.keys, self.values = keys, values

    def add(self, keys, values):
        """A new row holding a prefilled sequence's keys and values [n_layer, n_head, n_seq, head_dim]; its index."""
        n_seq = keys.shape[2]
        row = self.n_rows
        self.reserve(row + 1, n_seq)
        self.keys[:, row, :, :n_seq] = keys
        self.values[:, row, :, :n_seq] = values
        self.lengths = np.append(self.lengths, n_seq)
        return row

    def remove(self, row):
        """Free a row: the last row moves into its place (its keys and values copied), so the rows in use stay
        0..n_rows-1. When no row is left, the arrays are released."""
        last = self.n_rows - 1
        if row != last:
            used = int(self.lengths[last])
            self.keys[:, row, :, :used] = self.keys[:, last, :, :used]
            self.values[:, row, :, :used] = self.values[:, last, :, :used]
            self.lengths[row] = self.lengths[last]
        self.lengths = self.lengths[:last]
        if last == 0:
            self.keys = self.values = None

    def step_positions_and_mask(self):
        """For one new token per row: positions [n_rows, 1] (each row's own length) and the mask
        [n_rows, 1, 1, n_kv] (0 or -inf), n_kv = the longest row + 1: a row sees its own filled positions and
        the new one, never the spare positions beyond its length (zeros, or a departed row's keys)."""
        n_kv = int(self.lengths.max()) + 1
        visible = np.arange(n_kv)[None, :] <= self.lengths[:, None]  # [n_rows, n_kv]
        return self.lengths[:, None], np.where(visible, np.float32(0), np.float32(-np.inf))[:, None, None, :]

    def layer(self, i):
        return self._layers[i]


class _SlotLayer:
    """One layer's view of a SlotCache: extend() writes each row's new key at that row's own length."""

    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    def extend(self, k, v):
        """k, v [n_rows, n_head, 1, head_dim] -> the keys and values of every row so far,
        [n_rows, n_head, n_kv, head_dim] (n_kv: the longest row + 1; the mask hides the rest)."""
        cache, rows = self.cache, np.arange(self.cache.n_rows)
        cache.keys[self.i, rows, :, cache.lengths] = k[:, :, 0]
        cache.values[self.i, rows, :, cache.lengths] = v[:, :, 0]
        n_kv = int(cache.lengths.max()) + 1
        return cache.keys[self.i, :len(rows), :, :n_kv], cache.values[self.i, :len(rows), :, :n_kv]


# ---------------------------------------------------------------------------------------------------
# A request and what the engine tells it

@dataclass
class Token:
    """Choice `choice` took a token: the text it made printable (may be ""), and its log-probabilities
    (when asked for: `logprob` of the token, `top` {token id: logprob} of the likeliest `logprobs` tokens)."""

    choice: int
    token: int
    text: str
    logprob: float | None = None
    top: dict | None = None


@dataclass
class PromptLogprobs:
    """For echo: the prompt's tokens with the log-probability of each given those before it (the first has
    none), and the likeliest alternatives at each position (None for the first)."""

    tokens: list
    logprobs: list
    top: list


@dataclass
class Finished:
    """Choice `choice` ended: the text it still held back, why ("stop": <|endoftext|> or a stop string;
    "length": max_tokens, or the server cut it at shutdown), and how many tokens it generated."""

    choice: int
    text: str
    reason: str
    n_tokens: int


@dataclass
class Failed:
    """The request failed inside the engine (its other choices end too); message is one line."""

    message: str


@dataclass(eq=False)
class Completion:
    """One prompt to continue n times, with its own settings; the engine sends its events to sink(event).

    prompt: token ids; processors: picogpt.sampling.logits_processors(...) for this request (checked);
    seed: an int, or None for a random stream; logprobs: how many alternatives to report per token
    (None: no log-probabilities); echo: report the prompt's log-probabilities too (with logprobs);
    stop_at_eot False: <|endoftext|> is a token like any other, and each choice runs max_tokens.
    """

    prompt: list
    max_tokens: int
    processors: object
    sink: object
    n: int = 1
    stop: tuple = ()
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stop_at_eot: bool = True
    cancelled: bool = False
    streams: list = field(default_factory=list)  # [n] TextStream, once admitted
    open_choices: set = field(default_factory=set)
    pending: dict = field(default_factory=dict)  # choice -> (logprob, top) of the token just chosen

    def __post_init__(self):
        self.rng = random_stream(self.seed) if self.processors.sample else None

    def cancel(self):
        """Stop at the next step and free the slots (the client went away); nothing more is sent."""
        self.cancelled = True

    def draws(self, choices):
        """What choose_next draws with for the choices still open: the request's stream gives one number per
        choice per step, open or not, as picogpt's batch of num_samples rows does, so each choice's sample is
        the same as the command line's."""
        return _Draws(self.rng, self.n, choices)


class _Draws:
    def __init__(self, rng, n, choices):
        self.rng, self.n, self.choices = rng, n, choices

    def random(self, n_rows):
        return self.rng.random(self.n)[self.choices]


@dataclass(eq=False)
class _Row:
    """A row of the batch: one choice of a completion, its last token (the next step's input)."""

    completion: Completion
    choice: int
    last: int


# ---------------------------------------------------------------------------------------------------
# The engine

class Engine:
    """Runs the batch in a thread of its own: submit() a Completion from any thread, and its events arrive in
    its sink. max_rows: the most choices decoded at once (a completion waits for slots beyond that).

        engine = Engine(model, max_rows=16).start()
        engine.submit(Completion(prompt_ids, 20, logits_processors(), sink=print))
        ...
        engine.stop()
    """

    def __init__(self, model, max_rows=16, max_waiting=None):
        self.model, self.max_rows = model, max_rows
        self.max_waiting = 8 * max_rows if max_waiting is None else max_waiting
        self.cache = SlotCache(model.hparams, max_rows)
        self.rows = []  # [_Row] aligned with the cache's rows
        self.waiting = []  # [Completion] submitted, not yet admitted
        self.condition = threading.Condition()
        self.stopping = self.cutting = False
        self.thread = None
        self.steps = 0  # decode steps taken (for /health and the tests)

    # --- from other threads

    def start(self):
        self.thread = threading.Thread(target=self._run, name="picogpt-engine", daemon=True)
        self.thread.start()
        return self

    def submit(self, completion):
        """Queue a completion for the next step; refuses (PicogptError) when the queue is full."""
        if completion.n > self.max_rows:
            raise PicogptError(f"n is {completion.n} but this server decodes at most {self.max_rows} choices at "
                               f"once; ask for fewer")
        with self.condition:
            if self.stopping or self.cutting:
                raise PicogptError("the server is shutting down; send the request again to another server")
            if len(self.waiting) >= self.max_waiting:
                raise EngineBusy(f"{plural(len(self.waiting), 'request')} already wait for a slot; try again later")
            self.waiting.append(completion)
            self.condition.notify()

    def cut(self):
        """Shutting down: refuse new requests, end every open choice at the next step (finish reason "length"),
        fail the waiting ones."""
        with self.condition:
            self.cutting = True
            self.condition.notify()

    def stop(self, timeout=10):
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def status(self):
        """What /health reports: rows decoding, requests waiting, the cache's bytes, steps taken."""
        return dict(rows=len(self.rows), waiting=len(self.waiting), cache_bytes=self.cache.nbytes, steps=self.steps)

    # --- the engine thread

    def _run(self):
        blas.limit_this_thread()  # OpenMP's thread count (oneDNN's) is per thread: --threads, here too
        while True:
            with self.condition:
                while not (self.waiting or self.rows or self.stopping):
                    self.condition.wait()
                if self.stopping:
                    break
                if self.cutting:
                    self._cut_all()
                    continue
                admitted = self._take_admissible()
            self._drop_cancelled()
            if admitted:
                self._admit(admitted)
            if self.rows:
                self._decode_step()
        for completion in self.waiting + [row.completion for row in self.rows]:
            self._fail(completion, "the server stopped before this request finished")
        self.rows, self.waiting = [], []

    def _take_admissible(self):
        """The waiting completions whose choices fit in the free slots, strictly oldest first: one that does not
        fit yet stops the taking, so that a large request is never passed over for ever by smaller ones."""
        free = self.max_rows - len(self.rows)
        taken = []
        for completion in list(self.waiting):
            if completion.cancelled:
                self.waiting.remove(completion)
            elif completion.n <= free:
                taken.append(completion)
                self.waiting.remove(completion)
                free -= completion.n
            else:
                break
        return taken

    def _cut_all(self):
        for completion in self.waiting:
            self._fail(completion, "the server is shutting down; send the request again to another server")
        self.waiting = []
        for row in list(self.rows):
            self._finish(row, "length")

    def _drop_cancelled(self):
        for row in [row for row in self.rows if row.completion.cancelled]:
            self._remove(row)

    def _remove(self, row):
        index = self.rows.index(row)
        self.cache.remove(index)
        self.rows[index] = self.rows[-1]
        self.rows.pop()

    # --- admitting: prefill, first tokens, join

    def _admit(self, completions):
        """Run the new prompts through the model (echo's alone, with every position's logits; the others
        left-padded together, PREFILL_TOKENS at most per pass), choose their first tokens and give them rows."""
        alone = [c for c in completions if c.echo and c.logprobs is not None]
        together = sorted((c for c in completions if c not in alone), key=lambda c: len(c.prompt))
        passes, current = [[c] for c in alone], []
        for completion in together:  # (sorted by length, so that each pass pads little)
            if current and (len(current) + 1) * len(completion.prompt) > PREFILL_TOKENS:
                passes.append(current)
                current = []
            current.append(completion)
        if current:
            passes.append(current)
        for group in passes:
            try:
                self._prefill(group)
            except Exception as e:  # noqa: BLE001 (one pass failed: retry its requests alone, failing only theirs)
                if len(group) == 1:
                    self._fail(group[0], f"the prompt could not be run: {first_line(e)}")
                else:
                    for completion in group:
                        try:
                            self._prefill([completion])
                        except Exception as e:  # noqa: BLE001
                            self._fail(completion, f"the prompt could not be run: {first_line(e)}")

    def _prefill(self, completions):
        model = self.model
        lengths = [len(c.prompt) for c in completions]
        longest = max(lengths)
        tokens = np.zeros((len(completions), longest), np.int64)  # left-padded: [n_completions, longest]
        for row, c in enumerate(completions):
            tokens[row, longest - len(c.prompt):] = c.prompt
        n_pad = longest - np.array(lengths)
        cache = model.new_cache(len(completions), longest)
        echo = completions[0].echo and completions[0].logprobs is not None  # (then it runs alone)
        if echo:
            all_logits = model(tokens, cache=cache, n_pad=n_pad, all_logits=True)[0]  # [n_prompt, n_vocab]
            if not np.isfinite(all_logits).all():
                raise PicogptError("the model produced NaN or infinite logits; its weights are damaged")
            logits = all_logits[-1:]
        else:
            logits = next_token_logits(model, tokens, n_pad, cache)  # [n_completions, n_vocab]
        for row, completion in enumerate(completions):
            if completion.cancelled:
                continue
            try:
                if echo:
                    completion.sink(prompt_logprobs(completion.prompt, all_logits, completion.logprobs))
                keys = cache.keys[:, row, :, n_pad[row]:]  # [n_layer, n_head, n_prompt, head_dim]
                values = cache.values[:, row, :, n_pad[row]:]
                self._join(completion, logits[row], keys, values)
            except Exception as e:  # noqa: BLE001 (this request fails; the others go on)
                self._fail(completion, f"{first_line(e)}")

    def _join(self, completion, logits, keys, values):
        """The completion's first tokens from its prompt's logits [n_vocab], then a row per choice that goes on."""
        completion.streams = [TextStream(completion.stop, completion.stop_at_eot) for _ in range(completion.n)]
        completion.open_choices = set(range(completion.n))
        if completion.max_tokens == 0:
            for choice in range(completion.n):
                self._finish_choice(completion, choice, "length")
            return
        choices = np.arange(completion.n)
        ids = self._choose(completion, np.repeat(logits[None], completion.n, axis=0), choices)
        for choice, token in zip(choices, ids):
            if self._take(completion, choice, token):
                self.rows.append(_Row(completion, int(choice), int(token)))
                self.cache.reserve(len(self.rows), len(completion.prompt) + completion.max_tokens)
                self.cache.add(keys, values)

    # --- one decode step for every row

    def _decode_step(self):
        rows = self.rows
        ids = np.array([[row.last] for row in rows], np.int64)  # [n_rows, 1]
        try:
            positions, mask = self.cache.step_positions_and_mask()
            h = self.model.hparams
            logits = gpt2(ids, positions, mask, **self.model.params, n_head=h["n_head"], eps=h["layer_norm_epsilon"],
                          cache=self.cache, last_only=True)[:, -1]  # [n_rows, n_vocab]
            if not np.isfinite(logits).all():
                raise PicogptError("the model produced NaN or infinite logits; its weights are damaged")
        except Exception as e:  # noqa: BLE001 (the batch's pass failed: its requests fail, the server goes on)
            for completion in {id(row.completion): row.completion for row in rows}.values():
                self._fail(completion, f"the decoding step failed: {first_line(e)}")
            return
        self.cache.lengths += 1  # every row has stored its new token's keys and values
        self.steps += 1
        by_completion = {}
        for index, row in enumerate(rows):
            by_completion.setdefault(id(row.completion), []).append((index, row))
        for pairs in by_completion.values():
            completion = pairs[0][1].completion
            try:
                indices = [index for index, _ in pairs]
                choices = np.array([row.choice for _, row in pairs])
                chosen = self._choose(completion, logits[indices], choices)
                for (_, row), token in zip(pairs, chosen):
                    row.last = int(token)
                    if not self._take(completion, row.choice, token):
                        self._remove(row)
            except Exception as e:  # noqa: BLE001 (this request fails; the others go on)
                self._fail(completion, first_line(e))

    def _choose(self, completion, logits, choices):
        """Each open choice's next token from its logits [n_choices, n_vocab], through the request's pipeline;
        the log-probabilities (raw, before the pipeline) go with it when asked for."""
        n_new = len(completion.streams[choices[0]].tokens)
        generated = [completion.prompt + completion.streams[c].tokens for c in choices]
        text = Text(np.array(generated, np.int64), np.zeros(len(choices), np.int64), n_new)
        scores = completion.processors(logits, text)
        ids = choose_next(scores, completion.draws(choices) if completion.rng is not None else None)
        completion.pending = {}
        if completion.logprobs is not None:
            for choice, row_logits, token in zip(choices, logits, ids):
                completion.pending[int(choice)] = top_logprobs(row_logits, int(token), completion.logprobs)
        return ids

    def _take(self, completion, choice, token):
        """Give choice its new token: send the text it makes printable; end it at a stop, <|endoftext|> or
        max_tokens. Whether it goes on."""
        stream = completion.streams[choice]
        piece = stream.push(int(token))
        if not (int(token) == EOT and completion.stop_at_eot):  # (the <|endoftext|> that ends a choice: no text)
            logprob, top = completion.pending.get(int(choice), (None, None))
            completion.sink(Token(int(choice), int(token), piece, logprob, top))
        if stream.finished:
            self._finish_choice(completion, choice, "stop")
            return False
        if len(stream.tokens) >= completion.max_tokens:
            self._finish_choice(completion, choice, "length")
            return False
        return True

    def _finish_choice(self, completion, choice, reason):
        stream = completion.streams[choice]
        rest = stream.flush()
        completion.open_choices.discard(int(choice))
        completion.sink(Finished(int(choice), rest, reason, len(stream.tokens)))

    def _finish(self, row, reason):
        self._remove(row)
        try:
            self._finish_choice(row.completion, row.choice, reason)
        except Exception:  # noqa: BLE001 (its client is gone)
            pass

    def _fail(self, completion, message):
        """End a completion with an error: its rows leave, its sink hears Failed once."""
        for row in [row for row in self.rows if row.completion is completion]:
            self._remove(row)
        if completion.cancelled:
            return
        completion.cancelled = True
        try:
            completion.sink(Failed(message))
        except Exception:  # noqa: BLE001 (its client is gone)
            pass


class EngineBusy(PicogptError):
    """Too many requests wait already (the server answers 503)."""


# ---------------------------------------------------------------------------------------------------
# Log-probabilities, as the API reports them

def top_logprobs(logits, token, k):
    """(log p(token), {id: log p} of the k likeliest tokens and the chosen one) from one position's logits
    [n_vocab]; the normaliser is picogpt.scoring's, in float64, so the values equal `picogpt score`'s."""
    (logprob,) = token_log_probs(logits[None].copy(), np.array([token]))
    if k == 0:
        return float(logprob), {token: float(logprob)}
    normaliser = float(logits[token]) - logprob  # log Σ exp(logits)
    top = np.argpartition(-logits, k - 1)[:k]
    alternatives = {int(i): float(logits[i]) - normaliser for i in top[np.argsort(-logits[top], kind="stable")]}
    alternatives.setdefault(token, float(logprob))
    return float(logprob), alternatives


def prompt_logprobs(prompt, logits, k):
    """PromptLogprobs of prompt ids from the logits of every prompt position [n_prompt, n_vocab]: position j
    predicts prompt[j + 1], as picogpt.scoring.score computes it."""
    logprobs, top = [None], [None]
    for j in range(len(prompt) - 1):
        logprob, alternatives = top_logprobs(logits[j], prompt[j + 1], k)
        logprobs.append(logprob)
        top.append(alternatives)
    return PromptLogprobs(list(prompt), logprobs, top)


def token_text(token):
    """A token's own text, as the API's logprobs name it (bytes that are not whole characters: U+FFFD)."""
    return decode([token])


def wait_until(predicate, timeout, every=0.01):
    """For callers that poll the engine (the benchmark, the tests): whether predicate() came true in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
