"""The next-token pipeline: a step's logits -> the scores the next token is chosen from -> the token.

Every way picogpt decodes goes through here: the decode loop (greedy and sampling, one prompt or a
batch: picogpt.generate, which corpus completion runs too), beam search (picogpt.beam), the Hugging
Face drop-in's generate (picogpt.hf, which runs those two) and the explain page's next-token view
(`distribution`). The options build one list of processors, once, in Hugging Face transformers' order
(its `_get_logits_processor`): first the rules that change which tokens may come next, then, when
sampling, the warpers that reshape what is drawn from.

    RepetitionPenalty   tokens already in the text made less likely (CTRL's penalty)
    NoRepeatNGram       no n-gram of the text appears twice
    MinNewTokens        the end token cannot come before min_new_tokens new tokens
    Temperature         logits / T                                  (sampling only, as the three below)
    TopK                only the k likeliest tokens
    TopP                only the likeliest tokens holding probability p (nucleus sampling)

Each processor is a callable `(scores [n_rows, n_vocab], text) -> scores` that returns new scores and
leaves its input alone; `text` is the rows' tokens so far (`Text`). A new rule is one more class here,
and every decoding path has it. `choose_next` then takes each row's most likely token (greedy,
temperature 0) or draws one from the softmax of its scores.
"""

import math
import numbers
from typing import NamedTuple

import numpy as np

from .errors import BadArgument, PicogptError


class Text(NamedTuple):
    """The tokens of each row so far, as the processors see them."""

    tokens: np.ndarray  # [n_rows, length] int: left padding, the prompt, the new tokens
    n_pad: np.ndarray  # [n_rows]: how many of each row's first tokens are padding
    n_new: int  # how many of the last tokens are new (generated), the same for every row

    def seen(self, n_vocab):
        """[n_rows, n_vocab] bool: True for every token that is in the row's text (padding aside)."""
        rows, columns = np.nonzero(np.arange(self.tokens.shape[1])[None, :] >= np.asarray(self.n_pad)[:, None])
        seen = np.zeros((len(self.tokens), n_vocab), dtype=bool)
        seen[rows, self.tokens[rows, columns]] = True
        return seen


# ---------------------------------------------------------------------------------------------------
# The rules: which tokens may come next

class RepetitionPenalty(NamedTuple):
    """s / penalty where s > 0, s · penalty where not, for tokens already in the text (CTRL, Keskar et al. 2019)."""

    penalty: float  # > 1 lowers every seen token, whatever the sign of its score; 1 changes nothing

    def __call__(self, scores, text):
        penalty = float32_within(self.penalty)
        with np.errstate(over="ignore"):  # an overflow is dealt with below
            penalised = np.where(scores > 0, scores / penalty, scores * penalty)
        return limit_of_overflow(np.where(text.seen(scores.shape[-1]), penalised, scores), scores)  # (padding
        # is not text, as in HF; a penalty near 0 favours the seen tokens beyond what float32 holds: see there)


class NoRepeatNGram(NamedTuple):
    """-inf for every token that would make the text's last n tokens an n-gram it already holds."""

    n: int
    padding_counts: bool = False  # True: n-grams that reach into the padding count, as in Hugging Face

    def __call__(self, scores, text):
        tokens = text.tokens
        if not self.padding_counts:  # a row's result must not depend on what it was batched with
            tokens = np.where(np.arange(tokens.shape[1])[None, :] < np.asarray(text.n_pad)[:, None], -1, tokens)
        rows, banned = banned_ngram_tokens(tokens, self.n)
        keep = banned >= 0  # (-1: padding followed a prefix, never a token)
        scores = scores.copy()
        scores[rows[keep], banned[keep]] = -np.inf
        return scores


def banned_ngram_tokens(tokens, n):
    """The tokens that would repeat an n-gram of their row: each row's last n - 1 tokens, wherever they
    appeared before, and the token that followed them there. tokens [n_rows, length] -> (rows, banned),
    two flat arrays of the same length. Hugging Face's `_get_ngrams`, vectorised."""
    tokens = np.asarray(tokens)
    n_rows, length = tokens.shape
    if length + 1 < n:  # not even the prefix of an n-gram yet
        return np.zeros(0, np.int64), np.zeros(0, tokens.dtype)
    if n == 1:  # every token already there
        return np.repeat(np.arange(n_rows), length), tokens.reshape(-1)
    starts = np.lib.stride_tricks.sliding_window_view(tokens, n - 1, axis=1)[:, :length - n + 1]  # [n_rows, k, n-1]
    last = tokens[:, length - n + 1:]  # [n_rows, n - 1]
    rows, where = np.nonzero((starts == last[:, None, :]).all(axis=-1))
    return rows, tokens[rows, where + n - 1]


class MinNewTokens(NamedTuple):
    """-inf for the end token while fewer than `minimum` new tokens have been generated."""

    minimum: int
    eos_token_id: int

    def __call__(self, scores, text):
        if text.n_new >= self.minimum:
            return scores
        scores = scores.copy()
        scores[:, self.eos_token_id] = -np.inf
        return scores


# ---------------------------------------------------------------------------------------------------
# The warpers: what is drawn from, when sampling

class Temperature(NamedTuple):
    """s / T: T < 1 sharpens the distribution towards the likeliest tokens, T > 1 flattens it."""

    temperature: float

    def __call__(self, scores, text=None):
        with np.errstate(over="ignore"):  # a T near 0: see limit_of_overflow
            return limit_of_overflow(scores / float32_within(self.temperature), scores)


class TopK(NamedTuple):
    """Keep each row's k largest scores (and any tied with the k-th), set the rest to -inf."""

    k: int

    def __call__(self, scores, text=None):
        if self.k >= scores.shape[-1]:
            return scores
        kth_largest = -np.partition(-scores, self.k - 1, axis=-1)[:, self.k - 1:self.k]  # [n_rows, 1]
        return np.where(scores >= kth_largest, scores, -np.inf)


class TopP(NamedTuple):
    """Keep each row's smallest set of likeliest tokens whose probability reaches p (nucleus sampling).

    A token is kept when the tokens likelier than it hold less than p between them, so the likeliest
    token is always kept and the kept set's mass is >= p.
    """

    p: float

    def __call__(self, scores, text=None):
        if self.p >= 1:
            return scores
        order = np.argsort(-scores, axis=-1, kind="stable")  # likeliest first
        probs = softmax64(np.take_along_axis(scores, order, axis=-1))
        mass_before = np.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < self.p
        keep_sorted[:, 0] = True  # the likeliest token, whatever p (p = 0 included, as in HF)
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        return np.where(keep, scores, -np.inf)


FLOAT32_RANGE = (float(np.finfo(np.float32).smallest_subnormal), float(np.finfo(np.float32).max))


def float32_within(value):
    """A setting (> 0) as a float32 within float32's range: 1e300 would be infinity and 1e-300 zero, and a
    score of 0 times infinity, or -inf times zero, NaN."""
    return np.float32(min(max(float(value), FLOAT32_RANGE[0]), FLOAT32_RANGE[1]))


def limit_of_overflow(new, old):
    """new, a processor's scores from old, or, in the rows where float32 overflowed (a finite score that
    became +inf, or a row of finite scores that all became -inf: a temperature near 0, a repetition
    penalty near 0), the limit that the setting tends to: all the probability on the tokens whose score
    grew fastest, those of the largest old score among the ones that overflowed upwards (among all, where
    none did). So extreme settings give a defined next token, the greedy one in the limit of a
    temperature towards 0, and never NaN."""
    up = np.isposinf(new) & np.isfinite(old)
    sunk = np.isneginf(new).all(axis=-1) & np.isfinite(old).any(axis=-1)
    rows = up.any(axis=-1) | sunk
    if not rows.any():
        return new
    candidates = np.where(up[rows] | (sunk[rows, None] & np.isfinite(old[rows])), old[rows], -np.inf)
    new = new.copy()
    new[rows] = np.where(candidates == candidates.max(axis=-1, keepdims=True), np.float32(0), -np.inf)
    return new


def softmax64(scores):
    """Softmax over the last axis in float64, so that cumulative sums over 50257 tokens stay exact."""
    x = scores.astype(np.float64)
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------
# The list, built once from the options

class LogitsProcessors(tuple):
    """The processors of one set of options, applied in order; `sample` says whether the next token is
    drawn from the scores (temperature > 0) or is the likeliest one."""

    def __new__(cls, processors, sample):
        chain = super().__new__(cls, processors)
        chain.sample = sample
        return chain

    def __call__(self, scores, text):
        for processor in self:
            scores = processor(scores, text)
        return scores


def check_options(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
                  min_new_tokens=0):
    """Refuse decoding settings that mean nothing, in one sentence, before any work."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise PicogptError(f"temperature must be a number >= 0 (0 is greedy), not {temperature}")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise PicogptError(f"top-k must be a whole number >= 1, not {top_k}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise PicogptError(f"top-p must be in (0, 1], not {top_p}")
    if not (isinstance(repetition_penalty, numbers.Real) and math.isfinite(repetition_penalty)
            and repetition_penalty > 0):
        raise PicogptError(f"the repetition penalty must be a number > 0 (1 is none), not {repetition_penalty}")
    for name, value in (("the no-repeat n-gram size", no_repeat_ngram_size), ("min-new-tokens", min_new_tokens)):
        if not isinstance(value, numbers.Integral) or value < 0:
            raise PicogptError(f"{name} must be a whole number >= 0 (0 is none), not {value}")
    if temperature == 0 and (top_k is not None or (top_p is not None and top_p < 1)):  # silently ignored otherwise
        raise PicogptError("top-k and top-p choose what is sampled, but temperature 0 is greedy and samples "
                           "nothing; give a temperature > 0 (1 samples from the model's own distribution)")


def logits_processors(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
                      min_new_tokens=0, eos_token_id=None, ngrams_count_padding=False):
    """The LogitsProcessors these options ask for, checked (check_options), in Hugging Face's order.

    temperature 0 is greedy: no warpers, and the likeliest token is taken. eos_token_id is the token
    min_new_tokens holds off (None: there is none, and min_new_tokens is refused). ngrams_count_padding:
    n-grams that reach into a row's left padding count, as Hugging Face's processor counts them (the
    drop-in's choice); picogpt's own batches leave padding out, so that a row's text is what it is alone.
    """
    check_options(temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, min_new_tokens)
    if min_new_tokens > 0 and eos_token_id is None:
        raise BadArgument("min-new-tokens holds off the end token, but this decoding has none (it does not stop at "
                          "<|endoftext|>); drop one of the two")
    processors = []
    if repetition_penalty != 1:
        processors.append(RepetitionPenalty(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGram(no_repeat_ngram_size, ngrams_count_padding))
    if min_new_tokens > 0:
        processors.append(MinNewTokens(min_new_tokens, eos_token_id))
    if temperature > 0:
        if temperature != 1:
            processors.append(Temperature(temperature))
        if top_k is not None:
            processors.append(TopK(top_k))
        if top_p is not None and top_p < 1:
            processors.append(TopP(top_p))
    return LogitsProcessors(processors, sample=temperature > 0)


# ---------------------------------------------------------------------------------------------------
# The choice

def choose_next(scores, rng=None):
    """The next token of every row of scores [n_rows, n_vocab]: ids [n_rows].

    rng None is greedy: the likeliest token (ties go to the lowest id). Otherwise one token is drawn per
    row from the softmax of its scores, by inverting the cumulative distribution with one uniform number
    from rng.random(n_rows); a token of probability 0 (filtered out) is never drawn.
    """
    if rng is None:
        return np.argmax(scores, axis=-1)
    cumulative = np.cumsum(softmax64(scores), axis=-1)  # [n_rows, n_vocab]
    if not (cumulative[:, -1] > 0).all():  # NaN, or nothing possible: never a token outside the vocabulary
        raise PicogptError("no next token can be drawn: a row's scores give no probability to any token "
                           "(a processor left NaN or only -inf); this is a bug in picogpt.sampling, please report it")
    u = rng.random(len(scores))  # [n_rows], uniform in [0, 1)
    return np.array([np.searchsorted(row, ui * row[-1], side="right") for row, ui in zip(cumulative, u)])


def random_stream(seed):
    """What choose_next draws with: NumPy's generator for an int seed (None: a random one), or an object
    that already has .random(n), one uniform number per row (picogpt.corpus gives each document its own)."""
    return seed if hasattr(seed, "random") else np.random.default_rng(seed)


def distribution(logits, ids, **options):
    """The probabilities the next token is chosen with after the tokens `ids`, from their logits [n_vocab]:
    float64 [n_vocab] (greedy: 1 for the likeliest token). The explain page's next-token view computes
    the same in the browser; options as logits_processors takes them."""
    processors = logits_processors(**options)
    text = Text(np.asarray([ids]), np.zeros(1, np.int64), 0)
    scores = processors(np.asarray(logits, dtype=np.float32)[None], text)
    if processors.sample:
        return softmax64(scores)[0]
    probs = np.zeros(scores.shape[-1])
    probs[choose_next(scores)[0]] = 1
    return probs
