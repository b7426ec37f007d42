"""Beam search: the num_beams most probable continuations, kept side by side in one batch.

Every prompt runs as num_beams rows of one batch through the one KV cache. Each step scores every
row's next-token log-probabilities (after the logits processors), adds them to the row's running
score, and keeps, per prompt, the 2 x num_beams best (row, token) pairs over all its rows: the best
num_beams of those that do not end (EOS, or the length limit) run on, and those that end compete for
the num_beams finished places by their score / generated_length ** length_penalty. The cache is then
reordered so each surviving row holds its parent's keys and values (one gather, no loop over beams).
Each prompt itself runs once, its keys and values then copied to its beams' rows.

The rules are Hugging Face transformers' `_beam_search` (its vectorised form, transformers 4.50 to 5.x;
written against 5.24, tested against 5.25): the same candidate count, the same -1e9 masks for finished or
impossible beams, the same early-stopping heuristic (`early_stopping` False, True or "never"), the same
length penalty on the generated length, and the same processors (picogpt.sampling's: repetition penalty, no-repeat
n-grams, a minimum of new tokens) applied to the log-probabilities, so the same weights give the same
sequences. Each step's logits come as picogpt.generate's loop takes them (`next_token_logits`, checked),
and the batch's memory is checked before any work, as there.
"""

from typing import NamedTuple

import numpy as np

from .errors import PicogptError
from .generate import check_fits, left_pad, next_token_logits
from .memory import check_memory
from .sampling import Text, logits_processors
from .scoring import log_softmax

NEG = -1.0e9  # Hugging Face's "impossible" score


class Beams(NamedTuple):
    """The result for a batch of prompts: the num_return_sequences best of each, best first."""

    sequences: list  # per prompt: lists of new token ids (ending with the EOS that finished it, if any)
    scores: np.ndarray  # [n_prompts, num_return_sequences]: sum of log-probs / generated length ** length_penalty
    step_scores: list  # per step: the processed log-probabilities [n_prompts * num_beams, n_vocab] (output_scores)


def top_k_desc(values, k):
    """Indices of the k largest values of each row [n_rows, n], largest first (ties: lower index first).
    A partition finds them and only those k are sorted: a step's candidates are num_beams x n_vocab."""
    if k < values.shape[-1]:
        picked = np.argpartition(-values, k - 1, axis=-1)[:, :k]
    else:
        picked = np.broadcast_to(np.arange(values.shape[-1]), values.shape)
    picked_values = np.take_along_axis(values, picked, axis=-1)
    order = np.lexsort((picked, -picked_values), axis=-1)
    return np.take_along_axis(picked, order, axis=-1)


def beam_search(model, prompts, n_tokens, num_beams, length_penalty=1.0, early_stopping=False,
                num_return_sequences=1, eos_token_id=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
                min_new_tokens=0, pad_token_id=0, ngrams_count_padding=False, output_scores=False):
    """Beam search after each prompt (lists of token ids) for at most n_tokens new tokens: Beams.

    eos_token_id: the token that ends a sequence (picogpt's CLI passes <|endoftext|>), or None.
    pad_token_id: what fills the left of shorter prompts (attention never sees it). The rules
    (repetition_penalty, no_repeat_ngram_size, min_new_tokens) are picogpt.sampling's, as in decoding;
    ngrams_count_padding: the no-repeat rule sees the padding, as Hugging Face's does (the drop-in's
    choice). output_scores keeps every step's processed log-probabilities (Beams.step_scores).
    """
    if num_beams < 1 or not 1 <= num_return_sequences <= num_beams:
        raise PicogptError(f"num_return_sequences must be from 1 to num_beams ({num_beams}), "
                           f"not {num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise PicogptError(f"early_stopping must be True, False or 'never', not {early_stopping!r}")
    processors = logits_processors(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                                   min_new_tokens=min_new_tokens, eos_token_id=eos_token_id,
                                   ngrams_count_padding=ngrams_count_padding)
    n_vocab = model.hparams["n_vocab"]
    tokens, n_pad = left_pad(prompts, pad_token_id)  # [n_prompts, prompt_len]
    batch, prompt_len = tokens.shape
    check_fits(model, prompt_len, n_tokens, remedy="shorten the prompt or ask for fewer tokens")
    check_memory(model.hparams, batch * num_beams, prompt_len, n_tokens, kept_scores=n_tokens if output_scores else 0,
                 remedy="use fewer beams or prompts at once, or fewer tokens")
    max_length = prompt_len + n_tokens
    keep = max(2, 1 + (eos_token_id is not None)) * num_beams  # candidates per prompt each step
    top_beams = np.arange(keep) < num_beams

    # Everything per prompt and beam, as Hugging Face keeps it: running beams and finished ones.
    running = np.repeat(tokens[:, None, :], num_beams, axis=1)  # [batch, beams, cur_len]
    running_scores = np.zeros((batch, num_beams), np.float32)
    running_scores[:, 1:] = NEG  # at first all beams are the same: only one may be continued
    finished = np.zeros((batch, num_beams, max_length), np.int64)
    finished_len = np.full((batch, num_beams), prompt_len)
    finished_scores = np.full((batch, num_beams), NEG, np.float32)
    is_finished = np.zeros((batch, num_beams), bool)
    heuristic_unsatisfied = np.ones((batch, 1), bool)
    rows_pad = np.repeat(n_pad, num_beams)
    # The prompts run once each (all beams of a prompt start the same), then every beam row gets a copy.
    prompt_cache = model.new_cache(batch, prompt_len)
    first_logits = next_token_logits(model, tokens, n_pad, prompt_cache)  # [batch, n_vocab]
    cache = model.new_cache(batch * num_beams, max_length)
    cache.keys[:, :, :, :prompt_len] = np.repeat(prompt_cache.keys, num_beams, axis=1)
    cache.values[:, :, :, :prompt_len] = np.repeat(prompt_cache.values, num_beams, axis=1)
    cache.length = prompt_len
    del prompt_cache
    step_scores, cur_len = [], prompt_len
    while True:
        flat = running.reshape(batch * num_beams, -1)
        if cur_len == prompt_len:
            logits = np.repeat(first_logits, num_beams, axis=0)  # [rows, n_vocab]
        else:
            logits = next_token_logits(model, flat[:, cache.length:], rows_pad, cache, cur_len)  # [rows, n_vocab]
        log_probs = log_softmax(logits.astype(np.float32))
        log_probs = processors(log_probs, Text(flat, rows_pad, cur_len - prompt_len)).astype(np.float32)
        if output_scores:
            step_scores.append(log_probs)
        total = (log_probs.reshape(batch, num_beams, n_vocab) + running_scores[:, :, None]).reshape(batch, -1)
        top = top_k_desc(total, keep)  # [batch, keep] over beams x vocab
        top_scores = np.take_along_axis(total, top, axis=1)
        parent, token = top // n_vocab, top % n_vocab
        candidates = np.concatenate([np.take_along_axis(running, parent[:, :, None], axis=1), token[:, :, None]], 2)
        ends = (cur_len + 1 >= max_length) | ((token == eos_token_id) if eos_token_id is not None else False)
        ends = np.broadcast_to(ends, token.shape)

        # The best num_beams candidates that do not end run on.
        live_scores = top_scores + ends.astype(np.float32) * np.float32(NEG)
        chosen = top_k_desc(live_scores, num_beams)
        next_running = np.take_along_axis(candidates, chosen[:, :, None], axis=1)
        next_scores = np.take_along_axis(live_scores, chosen, axis=1)
        next_parent = np.take_along_axis(parent, chosen, axis=1)

        # Candidates among the top num_beams that end compete for the finished places.
        just_finished = ends & top_beams[None, :]
        ended_scores = top_scores / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
        full = np.all(is_finished, axis=-1, keepdims=True) & (early_stopping is True)
        ended_scores = ended_scores + full.astype(np.float32) * np.float32(NEG)
        ended_scores = ended_scores + (~heuristic_unsatisfied).astype(np.float32) * np.float32(NEG)
        ended_scores = ended_scores + (~just_finished).astype(np.float32) * np.float32(NEG)
        padded = np.zeros((batch, keep, max_length), np.int64)
        padded[:, :, :cur_len + 1] = candidates
        merged = np.concatenate([finished, padded], axis=1)
        merged_scores = np.concatenate([finished_scores, ended_scores], axis=1)
        merged_len = np.concatenate([finished_len, np.full((batch, keep), cur_len + 1)], axis=1)
        merged_done = np.concatenate([is_finished, just_finished], axis=1)
        best = top_k_desc(merged_scores, num_beams)
        finished = np.take_along_axis(merged, best[:, :, None], axis=1)
        finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        finished_len = np.take_along_axis(merged_len, best, axis=1)
        is_finished = np.take_along_axis(merged_done, best, axis=1)

        # The cache follows the surviving beams: row r now continues row parent[r] of the same prompt.
        rows = (next_parent + np.arange(batch)[:, None] * num_beams).reshape(-1)
        if not np.array_equal(rows, np.arange(len(rows))):  # only the positions filled so far move
            filled = cache.length
            cache.keys[:, :, :, :filled] = cache.keys[:, rows, :, :filled]
            cache.values[:, :, :, :filled] = cache.values[:, rows, :, :filled]
        running, running_scores, cur_len = next_running, next_scores, cur_len + 1

        # Hugging Face's early-stopping heuristic and stopping rule.
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_running = running_scores[:, :1] / np.float32(best_length ** length_penalty)
        worst_finished = np.where(is_finished, np.min(finished_scores, axis=1, keepdims=True), np.float32(NEG))
        heuristic_unsatisfied = heuristic_unsatisfied & np.any(best_running > worst_finished, axis=-1, keepdims=True)
        open_beams = not (np.all(is_finished) and early_stopping is True)
        if not (np.any(heuristic_unsatisfied) and open_beams and not np.all(ends)):
            break

    sequences = [[finished[b, i, prompt_len:finished_len[b, i]].tolist() for i in range(num_return_sequences)]
                 for b in range(batch)]
    return Beams(sequences, finished_scores[:, :num_return_sequences], step_scores)
