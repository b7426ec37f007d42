"""Decoding: turning next-token logits into a stream of new tokens."""

import numpy as np

from .errors import PicogptError


def check_fits(model, n_prompt, n_tokens):
    """Fail before any work if the prompt and the new tokens cannot fit in the model's context."""
    n_ctx = model.hparams["n_ctx"]
    if n_prompt + n_tokens > n_ctx:
        raise PicogptError(f"the prompt ({n_prompt} tokens) plus {n_tokens} new tokens exceed the model's "
                           f"context of {n_ctx} tokens; shorten the prompt or ask for fewer tokens")


def generate(model, ids, n_tokens, use_cache=True):
    """Greedy decoding: yield `n_tokens` token ids, each the most likely one after all before it.

    With the cache (the default) the prompt runs through the model once ("prefill") and every new token
    alone after it ("decode"); without it, every step recomputes the whole sequence, as picoGPT does.
    Nothing is computed ahead: each token is yielded as soon as it is chosen.
    """
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("generate needs at least one token id (GPT-2 starts an empty text with <|endoftext|>)")
    check_fits(model, len(ids), n_tokens)
    cache = model.new_cache() if use_cache else None
    inputs = ids
    for _ in range(n_tokens):
        logits = model(inputs, cache=cache)  # [1, n_vocab]: the next token's logits
        if not np.isfinite(logits).all():  # damaged weights: stop rather than decode garbage
            raise PicogptError(f"the model produced NaN or infinite logits after {len(ids)} tokens; its weights "
                               f"are damaged: check them with picogpt verify {model.path or 'MODEL'}")
        next_id = int(np.argmax(logits[-1]))
        yield next_id
        ids.append(next_id)
        inputs = [next_id] if use_cache else ids
