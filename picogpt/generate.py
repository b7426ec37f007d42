"""Decoding: turning next-token logits into new tokens, and tokens into text.

One loop serves greedy search and sampling alike: a batch of token sequences (one sequence is a batch
of one) runs through the model together, each step's logits go through the next-token pipeline that
the options build once (picogpt.sampling: repetition penalty, no-repeat n-grams, a minimum of new
tokens, then temperature, top-k and top-p when sampling) and every row's next token is chosen from
them, and the tokens are yielded as they are chosen. On top of it: `generate` (one sequence, token
ids), `generate_batch` (lists of ids), `stream_text` and `complete` (text in, text out, with stop
strings). Beam search (picogpt.beam) has a loop of its own but takes each step the same way
(`next_token_logits`) through the same pipeline. How probable a text is under the model is
picogpt.scoring's business.
"""

from typing import NamedTuple

import numpy as np

from .errors import PicogptError, plural
from .hints import picogpt_command
from .memory import check_memory
from .sampling import Text, choose_next, logits_processors, random_stream
from .tokenizer import EOT, StreamDecoder, encode

PAD = 0  # the filler in front of shorter prompts in a batch (any id: attention never looks at it)


# ---------------------------------------------------------------------------------------------------
# One step, as every decoding loop takes it

def next_token_logits(model, new_tokens, n_pad, cache=None, n_text=None):
    """The model's logits for the token after each row: [n_rows, n_vocab], after running new_tokens
    [n_rows, n_seq] (left-padded by n_pad [n_rows]) on top of the cache, or alone without one.

    Logits that are NaN or infinite mean damaged weights: one sentence that says how to check them,
    rather than decoding garbage. n_text, for that sentence: the tokens run so far.
    """
    logits = model(new_tokens, cache=cache, n_pad=n_pad)[:, -1]  # [n_rows, n_vocab]
    if not np.isfinite(logits).all():
        n_text = new_tokens.shape[1] if n_text is None else n_text
        raise PicogptError(f"the model produced NaN or infinite logits after {plural(n_text, 'token')}; its "
                           f"weights are damaged: check them with: {picogpt_command('verify', model.path or 'MODEL')}")
    return logits


def check_fits(model, n_prompt, n_tokens, remedy=None):
    """Fail before any work if the prompt and the new tokens cannot fit in the model's context; remedy
    replaces the advice (for a command without --sliding-window)."""
    n_ctx = model.hparams["n_ctx"]
    if n_prompt + n_tokens > n_ctx:
        remedy = remedy or (f"shorten the prompt, ask for fewer tokens, or keep only the last {n_ctx} tokens "
                            f"with --sliding-window")
        raise PicogptError(f"the prompt ({plural(n_prompt, 'token')}) plus {plural(n_tokens, 'new token')} exceed "
                           f"the model's context of {n_ctx} tokens; {remedy}")


def left_pad(prompts, pad_token_id=PAD):
    """Prompts (lists of token ids) of different lengths -> one matrix [n_batch, longest] with pad_token_id in
    front, and n_pad [n_batch]. Every decoding loop's batch is made here, so the prompts are checked here."""
    prompts = [[int(i) for i in p] for p in prompts]
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token id (GPT-2 starts an empty text with <|endoftext|>)")
    longest = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), longest), pad_token_id, dtype=np.int64)
    for row, prompt in zip(tokens, prompts):
        row[longest - len(prompt):] = prompt
    return tokens, np.array([longest - len(p) for p in prompts])


# ---------------------------------------------------------------------------------------------------
# The decoding loop

class Step(NamedTuple):
    """One step of every row: what decode_steps yields."""

    ids: np.ndarray  # [n_batch]: each row's next token (pad_token_id for a row that has ended)
    scores: np.ndarray  # [n_batch, n_vocab]: what it was chosen from (the logits after the processors)


def decode_steps(model, prompts, n_tokens, **settings):
    """Yield the next token of every prompt (lists of token ids, of any lengths), step by step: Step.

    The prompts are padded on the left into one batch; the settings are decode_padded's. Checked here,
    before the first step is asked for.
    """
    tokens, n_pad = left_pad(prompts)
    return decode_padded(model, tokens, n_pad, n_tokens, **settings)


def decode_padded(model, tokens, n_pad, n_tokens, eos_token_id=None, pad_token_id=None, use_cache=True,
                  sliding_window=False, seed=None, **options):
    """Yield the next token of every row of tokens [n_batch, longest], whose first n_pad[row] tokens are
    padding, up to n_tokens times: Step(ids [n_batch], scores [n_batch, n_vocab]).

    options are the next-token pipeline's (temperature, top_k, top_p, repetition_penalty,
    no_repeat_ngram_size, min_new_tokens; see picogpt.sampling.logits_processors), built once here.
    eos_token_id: the token that ends a row (None: nothing does, and every row runs n_tokens steps).
    A row that has produced it gets pad_token_id (default: eos_token_id) from then on, which runs
    through the model like any token and is for the caller to ignore; the loop ends once every row has
    ended. With the cache, the prompts run through the model once ("prefill"), then each step runs only
    the new tokens ("decode"); without it, every step recomputes all positions. With sliding_window, a
    text longer than the model's context keeps its last n_ctx tokens (once the window is full, every step
    recomputes it, since GPT-2's positions are absolute); without it, prompt plus new tokens must fit.

    seed: an int (or None) for NumPy's generator, or an object whose .random(n) gives one uniform number
    per row (picogpt.corpus gives each document a stream of its own, so that its sample does not depend
    on the batch it ran in).

    Everything is checked when decode_padded is called, before the first step is asked for: the
    options, the context and the memory the batch needs.
    """
    processors = logits_processors(eos_token_id=eos_token_id, **options)
    if not sliding_window:
        check_fits(model, tokens.shape[1], n_tokens)
    check_memory(model.hparams, len(tokens), tokens.shape[1], n_tokens, use_cache)
    pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    rng = random_stream(seed) if processors.sample else None
    return _steps(model, np.asarray(tokens, dtype=np.int64), np.asarray(n_pad), n_tokens, processors, rng,
                  eos_token_id, pad_token_id, use_cache)


def _steps(model, tokens, n_pad, n_tokens, processors, rng, eos_token_id, pad_token_id, use_cache):
    """decode_padded's loop, over checked settings."""
    n_ctx, n_prompt = model.hparams["n_ctx"], tokens.shape[1]
    ended = np.zeros(len(tokens), dtype=bool)
    cache, cache_start, n_cached = None, 0, 0  # the cache holds the keys and values of tokens[:, cache_start:n_cached]
    for step in range(n_tokens):
        window_start = max(0, tokens.shape[1] - n_ctx)  # the model sees tokens[:, window_start:]
        window_pad = np.maximum(n_pad - window_start, 0)
        if not use_cache:
            logits = next_token_logits(model, tokens[:, window_start:], window_pad, n_text=tokens.shape[1])
        else:
            if cache is None or cache_start != window_start:  # first step, or the window slid: refill
                n_positions = tokens.shape[1] - window_start + n_tokens - step  # the most this cache will hold
                cache = model.new_cache(len(tokens), n_positions)
                cache_start, n_cached = window_start, window_start
            logits = next_token_logits(model, tokens[:, n_cached:], window_pad, cache, n_text=tokens.shape[1])
            n_cached = tokens.shape[1]
        scores = processors(logits, Text(tokens, n_pad, tokens.shape[1] - n_prompt))
        ids = choose_next(scores, rng)
        if eos_token_id is not None:
            ids = np.where(ended, pad_token_id, ids)
            ended |= ids == eos_token_id
        tokens = np.concatenate([tokens, ids[:, None]], axis=1)
        yield Step(ids, scores)
        if ended.all():
            return


def generate(model, ids, n_tokens, stop_at_eot=True, **options):
    """Yield up to n_tokens new token ids after `ids`, each as soon as it is chosen.

    Greedy unless `options` ask for sampling (temperature, top_k, top_p, seed), with the rules
    repetition_penalty, no_repeat_ngram_size and min_new_tokens (picogpt.sampling), and use_cache and
    sliding_window (decode_padded). Stops after <|endoftext|>, which is not yielded, unless stop_at_eot
    is False.
    """
    for step in decode_steps(model, [ids], n_tokens, eos_token_id=EOT if stop_at_eot else None, **options):
        (next_id,) = step.ids.tolist()
        if stop_at_eot and next_id == EOT:
            return
        yield next_id


def generate_batch(model, prompts, n_tokens, stop_at_eot=True, **options):
    """New token ids for several prompts run as one batch: a list per prompt, as generate gives it.

    Each row's result is the same as running it alone; the batch stops early once every row has ended
    at <|endoftext|> (after which the loop gives an ended row <|endoftext|> again, skipped here).
    """
    results = [[] for _ in prompts]
    for step in decode_steps(model, prompts, n_tokens, eos_token_id=EOT if stop_at_eot else None, **options):
        for row, next_id in enumerate(step.ids.tolist()):
            if not (stop_at_eot and next_id == EOT):
                results[row].append(next_id)
    return results


# ---------------------------------------------------------------------------------------------------
# Text in, text out

class StopStrings:
    """Cuts a stream of text pieces at the first of several stop strings, without printing any of it.

    push() returns what is safe to show: text that cannot be the start of a stop string. A piece
    ending in a prefix of a stop string ("\\n" when "\\n\\n" stops) is held back until the next piece
    decides. After a stop string appears, `stopped` is True and the text from it on is dropped.
    """

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.held, self.stopped = "", False

    def push(self, piece):
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held, self.stopped = "", True
            return text[:min(found)]
        keep = max((k for s in self.stops for k in range(1, min(len(s) - 1, len(text)) + 1)
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self):
        held, self.held = self.held, ""
        return held


class TextStream:
    """One sequence's new tokens -> text that is safe to show as it comes.

    Ends the sequence at <|endoftext|> (unless stop_at_eot is False) and before the first stop string;
    holds back the bytes of a character split over tokens until it is complete. `tokens` are the ids
    taken so far, `finished` says whether the sequence has ended.
    """

    def __init__(self, stop=(), stop_at_eot=True):
        self.utf8, self.stops, self.stop_at_eot = StreamDecoder(), StopStrings(stop), stop_at_eot
        self.tokens, self.finished = [], False

    def push(self, token):
        """Take the next token (ignored once finished); return the text it makes printable."""
        if self.finished:
            return ""
        if self.stop_at_eot and token == EOT:
            self.finished = True
            return ""
        self.tokens.append(token)
        piece = self.stops.push(self.utf8.push(token))
        self.finished = self.stops.stopped
        return piece

    def flush(self):
        """End the stream: the text held back (a partial character, a possible start of a stop string)."""
        self.finished = True
        if self.stops.stopped:
            return ""
        rest = self.stops.push(self.utf8.flush())
        return rest if self.stops.stopped else rest + self.stops.flush()


def prompt_ids(prompt):
    """Token ids of a prompt; an empty prompt starts from <|endoftext|>, as GPT-2's documents do."""
    return encode(prompt) or [EOT]


class TextBatch:
    """Prompts (text, or token ids) continued as one batch, as text that is safe to show as it comes.

        batch = TextBatch(model, ["Hello", "The cat"], 20, stop=["\\n"])
        for pieces in batch:       # one step: the text each row made printable ("" where none)
            ...
        batch.finish()             # what the rows still held back (a partial character, a possible stop)
        batch.texts, batch.tokens  # each row's whole continuation, and the token ids it took

    num_samples > 1 continues each prompt that many times (rows prompt 0 sample 0, prompt 0 sample 1,
    ...). Iteration ends after n_tokens steps or once every row has finished (see TextStream); options go
    to decode_steps, which checks them and the context here, before any work.
    """

    def __init__(self, model, prompts, n_tokens, stop=(), stop_at_eot=True, num_samples=1, **options):
        distinct = [prompt_ids(p) if isinstance(p, str) else list(p) for p in prompts]
        if distinct:  # before making num_samples rows of each: decode_steps checks the same again, with the rest
            check_memory(model.hparams, len(distinct) * num_samples, max(map(len, distinct)), n_tokens,
                         options.get("use_cache", True))
        self.prompt_ids = [ids for ids in distinct for _ in range(num_samples)]
        self._steps = decode_steps(model, self.prompt_ids, n_tokens, eos_token_id=EOT if stop_at_eot else None,
                                   **options)
        self.streams = [TextStream(stop, stop_at_eot) for _ in self.prompt_ids]
        self.texts = [""] * len(self.prompt_ids)

    def __iter__(self):
        for step in self._steps:
            pieces = [stream.push(token) for stream, token in zip(self.streams, step.ids.tolist())]
            self.texts = [text + piece for text, piece in zip(self.texts, pieces)]
            yield pieces
            if all(stream.finished for stream in self.streams):
                return

    def finish(self):
        """End every row: return the text each still held back (now also in .texts)."""
        rest = [stream.flush() for stream in self.streams]
        self.texts = [text + piece for text, piece in zip(self.texts, rest)]
        return rest

    @property
    def tokens(self):
        """The new token ids of each row, as far as its text goes (not the <|endoftext|> that ended it)."""
        return [stream.tokens for stream in self.streams]


def stream_text(model, prompt, n_tokens, stop=(), stop_at_eot=True, **options):
    """Yield the continuation of `prompt` (a string) as text, piece by piece, as tokens are chosen.

    A character split over several tokens (an emoji, most CJK) appears once complete; text is cut
    before the first of the `stop` strings, which ends generation.
    """
    batch = TextBatch(model, [prompt], n_tokens, stop, stop_at_eot, **options)
    for (piece,) in batch:
        if piece:
            yield piece
    (rest,) = batch.finish()
    if rest:
        yield rest


def complete(model, prompts, n_tokens, stop=(), stop_at_eot=True, num_samples=1, **options):
    """The continuation of a prompt, or of each prompt of a list (run as one batch), as text.

    num_samples > 1 continues each prompt that many times (sampling makes them differ) and returns a
    list of num_samples strings per prompt.
    """
    single = isinstance(prompts, str)
    batch = TextBatch(model, [prompts] if single else prompts, n_tokens, stop, stop_at_eot, num_samples, **options)
    for _ in batch:
        pass
    batch.finish()
    texts = batch.texts
    if num_samples > 1:
        texts = [texts[i:i + num_samples] for i in range(0, len(texts), num_samples)]
    return texts[0] if single else texts
