"""Scoring: how probable a text is under the model, token by token (log-probabilities, the mean
negative log-likelihood and the perplexity), with a sliding window for texts longer than the context.

    from picogpt.scoring import score
    result = score(model, [EOT] + encode(text))   # GPT-2's documents start after <|endoftext|>
    result.mean_nll, result.perplexity
"""

import math
import numbers
from typing import NamedTuple

import numpy as np

from .errors import BadArgument, PicogptError


class Score(NamedTuple):
    """How probable a text is under the model."""

    n_tokens: int  # tokens scored
    log_prob: float  # natural log of the probability of all of them: sum of token_log_probs
    token_log_probs: np.ndarray  # [n_tokens] float64: log p(token | the tokens before it)

    @property
    def mean_nll(self):
        """Mean negative log-likelihood per token (nats): the cross-entropy loss."""
        return -self.log_prob / self.n_tokens

    @property
    def perplexity(self):
        return math.exp(self.mean_nll)


def log_softmax(logits):
    """log of softmax over the last axis, computed without forming the probabilities: [..., n_vocab]."""
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def token_log_probs(logits, targets):
    """log p(targets[i]) under each row of logits [n, n_vocab]: float64 [n]. The softmax's normaliser,
    log Σ exp(x), is summed in float64 without forming the [n, n_vocab] log-probabilities: the logits are
    overwritten with their exponentials, so pass logits that are not needed again."""
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)
    largest = logits.max(axis=-1, keepdims=True)
    np.exp(np.subtract(logits, largest, out=logits), out=logits)
    return picked - (np.log(logits.sum(axis=-1, dtype=np.float64)) + largest[:, 0])


def score(model, ids, stride=None):
    """Log-probability of ids[1:], each token given all before it (ids[0] is context only).

    A text longer than the model's context is scored in windows of n_ctx tokens, each starting `stride`
    tokens after the one before (default: half a window); each token is scored once, in the window where
    it has the most context, as in Hugging Face's guide to perplexity of fixed-length models. The stride
    must be less than n_ctx: windows must overlap by at least one token, or the first token of a window
    would have nothing before it (Hugging Face's recipe then skips it; here it is refused).
    """
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise PicogptError("scoring needs at least two tokens: the first one is context for the second")
    n_ctx = model.hparams["n_ctx"]
    stride = max(1, n_ctx // 2) if stride is None else stride
    if not (isinstance(stride, numbers.Integral) and 1 <= stride < n_ctx):
        raise BadArgument(f"the stride must be a whole number from 1 to {n_ctx - 1} (less than the model's context "
                          f"of {n_ctx} tokens so that the windows overlap), not {stride}")
    log_probs = np.empty(len(ids) - 1)
    scored = 1  # ids[:scored] have been scored (ids[0] never is)
    start = 0
    while scored < len(ids):
        window = ids[start:start + n_ctx]
        logits = model(window, all_logits=True)  # [len(window), n_vocab]: position j predicts window[j + 1]
        targets = np.arange(scored - start, len(window))  # positions in the window not yet scored
        scored_ids = np.array(window)[targets]
        log_probs[scored - 1:scored - 1 + len(targets)] = token_log_probs(logits[targets - 1], scored_ids)
        scored = start + len(window)
        start += stride
    return Score(len(ids) - 1, float(log_probs.sum()), log_probs)
