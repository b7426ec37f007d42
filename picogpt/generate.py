"""Decoding: turning next-token logits into new tokens, and tokens into text.

One loop serves every case: a batch of token sequences (one sequence is a batch of one) runs through
the model together, each step picks every sequence's next token (greedy, or sampled from the
distribution that temperature, top-k, top-p and a repetition penalty leave), and the tokens are yielded
as they are chosen. On top of it: `generate` (one sequence, token ids), `generate_batch` (lists of
ids), `stream_text` and `complete` (text in, text out, with stop strings). How probable a text is
under the model is picogpt.scoring's business.
"""

import math
import numbers
import os

import numpy as np

from .errors import PicogptError, plural
from .hints import picogpt_command
from .tokenizer import EOT, StreamDecoder, encode

PAD = 0  # the filler in front of shorter prompts in a batch (any id: attention never looks at it)


# ---------------------------------------------------------------------------------------------------
# Choosing the next token

def apply_repetition_penalty(logits, seen, penalty):
    """Make tokens already in the text less likely (CTRL's penalty, with Hugging Face's semantics).

    logits [n_batch, n_vocab]; seen [n_batch, n_vocab] bool, True for tokens in the prompt or output.
    A seen token's logit is divided by `penalty` when positive and multiplied by it when negative, so
    penalty > 1 always lowers it. penalty 1 changes nothing.
    """
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def top_k_filter(logits, k):
    """Keep each row's k largest logits (and any tied with the k-th), set the rest to -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth_largest = -np.partition(-logits, k - 1, axis=-1)[:, k - 1:k]  # [n_batch, 1]
    return np.where(logits >= kth_largest, logits, -np.inf)


def top_p_filter(logits, p):
    """Nucleus filtering: keep each row's smallest set of most likely tokens whose probability reaches p.

    A token is kept when the tokens more likely than it hold less than p between them, so the most
    likely token is always kept and the kept set's mass is >= p.
    """
    order = np.argsort(-logits, axis=-1, kind="stable")  # most likely first
    probs = softmax64(np.take_along_axis(logits, order, axis=-1))
    mass_before = np.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


def softmax64(logits):
    """Softmax over the last axis in float64, so that cumulative sums over 50257 tokens stay exact."""
    x = logits.astype(np.float64)
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def choose_next(logits, rng, temperature=0.0, top_k=None, top_p=None):
    """The next token of every row of logits [n_batch, n_vocab]: ids [n_batch].

    temperature 0 is greedy (the most likely token; ties go to the lowest id). Otherwise the logits
    are divided by the temperature, filtered by top-k then top-p, and one token is drawn per row from
    their softmax by inverting its cumulative distribution with one uniform number from `rng`.
    """
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    logits = logits / np.float32(temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    cumulative = np.cumsum(softmax64(logits), axis=-1)  # [n_batch, n_vocab]
    u = rng.random(len(logits))  # [n_batch], uniform in [0, 1)
    # The first token whose cumulative probability exceeds u: tokens of probability 0 are never chosen.
    return np.array([np.searchsorted(row, ui * row[-1], side="right") for row, ui in zip(cumulative, u)])


def check_options(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """Refuse sampling settings that mean nothing, in one sentence, before any work."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise PicogptError(f"temperature must be a number >= 0 (0 is greedy), not {temperature}")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise PicogptError(f"top-k must be a whole number >= 1, not {top_k}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise PicogptError(f"top-p must be in (0, 1], not {top_p}")
    if not (isinstance(repetition_penalty, numbers.Real) and math.isfinite(repetition_penalty)
            and repetition_penalty > 0):
        raise PicogptError(f"the repetition penalty must be a number > 0 (1 is none), not {repetition_penalty}")
    if temperature == 0 and (top_k is not None or (top_p is not None and top_p < 1)):  # silently ignored otherwise
        raise PicogptError("top-k and top-p choose what is sampled, but temperature 0 is greedy and samples "
                           "nothing; give a temperature > 0 (1 samples from the model's own distribution)")


def check_fits(model, n_prompt, n_tokens, remedy=None):
    """Fail before any work if the prompt and the new tokens cannot fit in the model's context; remedy
    replaces the advice (for a command without --sliding-window)."""
    n_ctx = model.hparams["n_ctx"]
    if n_prompt + n_tokens > n_ctx:
        remedy = remedy or (f"shorten the prompt, ask for fewer tokens, or keep only the last {n_ctx} tokens "
                            f"with --sliding-window")
        raise PicogptError(f"the prompt ({plural(n_prompt, 'token')}) plus {plural(n_tokens, 'new token')} exceed "
                           f"the model's context of {n_ctx} tokens; {remedy}")


def memory_needed(hparams, n_batch, n_prompt, n_positions, use_cache=True):
    """Bytes a batch needs at its peak beyond the weights (which are mapped from the file), by part.

    n_batch rows, prompts padded to n_prompt tokens, up to n_positions tokens in all. The parts: the KV
    cache (keys and values of every layer, float32), the largest activations of one forward pass (the
    MLP's [n_batch, n_seq, 4 n_embd] and the attention weights [n_batch, n_head, n_seq, n_positions],
    each with the copy its next step makes), and each step's logits with the float64 softmaxes, sums and
    sort order that sampling with top-p keeps alive at once (8 copies). An estimate to refuse
    what cannot fit, on the generous side; not an exact count.
    """
    n_embd, n_head, n_vocab = hparams["n_embd"], hparams["n_head"], hparams["n_vocab"]
    n_seq = n_prompt if use_cache else n_positions  # the longest pass: prefill, or the last full recompute
    cache = 2 * hparams["n_layer"] * n_batch * n_positions * n_embd * 4 if use_cache else 0
    activations = 2 * 4 * n_batch * n_seq * max(4 * n_embd, n_head * n_positions)
    logits = n_batch * n_vocab * (4 + 8 * 8 + 2)  # float32 logits, float64/int64 copies, boolean masks
    return {"the KV cache": cache, "activations": activations, "logits": logits}


def available_memory():
    """Bytes of memory this process can still get: the system's (Linux's MemAvailable, else all of it),
    or less where a container's limit (cgroup v2 memory.max less memory.current) says so; None where
    nothing is known."""
    known = []
    try:
        with open("/proc/meminfo") as f:
            known += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not known:
        try:
            known.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text != "max":
                known.append(int(text) - int(used.read()))
    except (OSError, ValueError):
        pass
    return min(known) if known else None


def check_memory(hparams, n_batch, n_prompt, n_tokens, use_cache=True):
    """Refuse, in one sentence and before any work, a batch that cannot fit in the memory available:
    n_batch prompts padded to n_prompt tokens, n_tokens to generate (the model sees n_ctx at most)."""
    n_positions = min(n_prompt + n_tokens, hparams["n_ctx"])
    parts = memory_needed(hparams, n_batch, min(n_prompt, hparams["n_ctx"]), n_positions, use_cache)
    needed, available = sum(parts.values()), available_memory()
    if available is not None and needed > available:
        largest = max(parts, key=parts.get)
        raise PicogptError(f"{plural(n_batch, 'row')} of up to {plural(n_positions, 'token')} need about "
                           f"{needed / 1e9:.1f} GB of memory ({largest} {parts[largest] / 1e9:.1f} GB) but "
                           f"{available / 1e9:.1f} GB is available; ask for fewer samples or prompts at once, "
                           f"or fewer tokens")


# ---------------------------------------------------------------------------------------------------
# The decoding loop

def left_pad(prompts):
    """Prompts of different lengths -> one matrix [n_batch, longest] with PAD in front, and n_pad [n_batch]."""
    longest = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), longest), PAD, dtype=np.int64)
    for row, prompt in zip(tokens, prompts):
        row[longest - len(prompt):] = prompt
    return tokens, np.array([longest - len(p) for p in prompts])


def decode_steps(model, prompts, n_tokens, use_cache=True, temperature=0.0, top_k=None, top_p=None,
                 repetition_penalty=1.0, seed=None, sliding_window=False):
    """Yield the next token of every prompt, n_tokens times: ids [n_batch] per step.

    Every row keeps going until the last step; callers decide when a row is finished (at
    <|endoftext|>, a stop string) and may stop iterating early. With the cache, the prompts run through
    the model once ("prefill"), then each step runs only the new tokens ("decode"); without it, every
    step recomputes all positions. With sliding_window, a text longer than the model's context keeps its
    last n_ctx tokens (once the window is full, every step recomputes it, since GPT-2's positions are
    absolute); without it, prompt plus new tokens must fit.

    seed: an int (or None) for NumPy's generator, or an object whose .random(n) gives one uniform number
    per row (picogpt.corpus gives each document a stream of its own, so that its sample does not depend
    on the batch it ran in).

    The prompts and settings are checked when decode_steps is called, before the first step is asked for.
    """
    prompts = [[int(i) for i in p] for p in prompts]
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token id (GPT-2 starts an empty text with <|endoftext|>)")
    check_options(temperature, top_k, top_p, repetition_penalty)
    n_prompt = max(len(p) for p in prompts)
    if not sliding_window:
        check_fits(model, n_prompt, n_tokens)
    check_memory(model.hparams, len(prompts), n_prompt, n_tokens, use_cache)
    tokens, n_pad = left_pad(prompts)
    return _steps(model, prompts, tokens, n_pad, n_tokens, use_cache, temperature, top_k, top_p,
                  repetition_penalty, seed)


def _steps(model, prompts, tokens, n_pad, n_tokens, use_cache, temperature, top_k, top_p, repetition_penalty,
           seed):
    """decode_steps' loop, over checked prompts: tokens [n_batch, longest] left-padded by n_pad [n_batch]."""
    n_ctx = model.hparams["n_ctx"]
    rng = seed if hasattr(seed, "random") else np.random.default_rng(seed)
    seen = np.zeros((len(prompts), model.hparams["n_vocab"]), dtype=bool)  # for the repetition penalty
    for row, prompt in enumerate(prompts):
        seen[row, prompt] = True
    cache, cache_start, n_cached = None, 0, 0  # the cache holds the keys and values of tokens[:, cache_start:n_cached]
    for step in range(n_tokens):
        window_start = max(0, tokens.shape[1] - n_ctx)  # the model sees tokens[:, window_start:]
        window_pad = np.maximum(n_pad - window_start, 0)
        if not use_cache:
            logits = model(tokens[:, window_start:], n_pad=window_pad)
        else:
            if cache is None or cache_start != window_start:  # first step, or the window slid: refill
                n_positions = tokens.shape[1] - window_start + n_tokens - step  # the most this cache will hold
                cache = model.new_cache(len(prompts), n_positions)
                cache_start, n_cached = window_start, window_start
            logits = model(tokens[:, n_cached:], cache=cache, n_pad=window_pad)
            n_cached = tokens.shape[1]
        logits = logits[:, -1]  # [n_batch, n_vocab]
        if not np.isfinite(logits).all():  # damaged weights: stop rather than decode garbage
            raise PicogptError(f"the model produced NaN or infinite logits after {plural(tokens.shape[1], 'token')}; "
                               f"its weights are damaged: check them with: "
                               f"{picogpt_command('verify', model.path or 'MODEL')}")
        if repetition_penalty != 1:
            logits = apply_repetition_penalty(logits, seen, np.float32(repetition_penalty))
        next_ids = choose_next(logits, rng, temperature, top_k, top_p)
        seen[np.arange(len(prompts)), next_ids] = True
        tokens = np.concatenate([tokens, next_ids[:, None]], axis=1)
        yield next_ids


def generate(model, ids, n_tokens, stop_at_eot=True, **options):
    """Yield up to n_tokens new token ids after `ids`, each as soon as it is chosen.

    Greedy unless `options` ask for sampling (temperature, top_k, top_p, repetition_penalty, seed; see
    choose_next and decode_steps, which also take use_cache and sliding_window). Stops after
    <|endoftext|>, which is not yielded, unless stop_at_eot is False.
    """
    for (next_id,) in decode_steps(model, [ids], n_tokens, **options):
        if stop_at_eot and next_id == EOT:
            return
        yield int(next_id)


def generate_batch(model, prompts, n_tokens, stop_at_eot=True, **options):
    """New token ids for several prompts run as one batch: a list per prompt, as generate gives it.

    Each row's greedy result is the same as running it alone; the batch stops early once every row
    has ended at <|endoftext|>.
    """
    results, finished = [[] for _ in prompts], [False] * len(prompts)
    for next_ids in decode_steps(model, prompts, n_tokens, **options):
        for row, next_id in enumerate(next_ids.tolist()):
            if finished[row]:
                continue
            if stop_at_eot and next_id == EOT:
                finished[row] = True
            else:
                results[row].append(next_id)
        if all(finished):
            break
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
    """Prompts (text) continued as one batch, as text that is safe to show as it comes.

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
        distinct = [prompt_ids(p) for p in prompts]
        if distinct:  # before making num_samples rows of each: decode_steps checks the same again, with the rest
            check_memory(model.hparams, len(distinct) * num_samples, max(map(len, distinct)), n_tokens,
                         options.get("use_cache", True))
        self.prompt_ids = [ids for ids in distinct for _ in range(num_samples)]
        self._steps = decode_steps(model, self.prompt_ids, n_tokens, **options)
        self.streams = [TextStream(stop, stop_at_eot) for _ in self.prompt_ids]
        self.texts = [""] * len(self.prompt_ids)

    def __iter__(self):
        for next_ids in self._steps:
            pieces = [stream.push(token) for stream, token in zip(self.streams, next_ids.tolist())]
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
