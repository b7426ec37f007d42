"""Judging greedy text: the faults the model card counts, and the counts over every held-out opening.

A continuation loops when it writes a four-token phrase a second time; it ends early when it stops at
<|endoftext|> before SAMPLE_TOKENS, and ends before completing a sentence when it holds no full stop, !
or ? before a space or its end; it holds nonsense when a reference model gives one of its tokens
p < RARE_P. The sequence-level steps (sequence_level.py) push down what these rules find.
"""

import math
import re

import numpy as np

import picogpt
from picogpt.generate import generate
from picogpt.scoring import score
from picogpt.tokenizer import load_tokenizer

from .corpus import docstrings, held_out_openings, stdlib_files

SAMPLE_TOKENS = 30  # the bar: no phrase repeated within 30 tokens
MAKE_RUN_TOKENS = 20  # what `make run` prints
RARE_P = 1e-4  # --judge --reference: a token that model gives less than this is nonsense after the prompt
# The samples a training run ends with: the README's prompt, then openings of held-out docstrings.
README_PROMPT = "The optional argument"
N_HELD_OUT_PROMPTS = 12
STOP = r"[.!?][\"')\]]*"  # a full stop, ! or ?, and any closing quotes or brackets
SENTENCE_END = re.compile(STOP + r"(?:\s|$)")  # ... then a space or the end of the text


def repeating_positions(ids, start, n=4):
    """The positions, from `start` on, of tokens in a run of n tokens that occurred earlier in ids."""
    seen, positions = set(), set()
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        if gram in seen:
            positions.update(range(max(i, start), i + n))
        seen.add(gram)
    return sorted(positions)


def repeated_phrase(ids, n=4):
    """The first run of n tokens that occurs twice in ids, as text-free ids, or None."""
    positions = repeating_positions(ids, 0, n)  # the first of them starts the first repeat
    return tuple(ids[positions[0]:positions[0] + n]) if positions else None


def holds_a_sentence(text):
    """Whether text completes a sentence: a full stop, ! or ? (and any closing quotes or brackets) before
    whitespace or the end. "e.g. " counts too: a rule for counting, not a parser."""
    return SENTENCE_END.search(text) is not None


def greedy_loops(model_path, prompts, encoding, reference=None):
    """How many greedy continuations of the prompts repeat a four-token phrase within SAMPLE_TOKENS tokens,
    how many within the MAKE_RUN_TOKENS that `make run` prints, how many end (at <|endoftext|>) before
    SAMPLE_TOKENS, how many of those before they complete a sentence (empty ones too), and how many of the
    continuations are distinct: the issue's test of the demo model ("at least one complete sentence", "no
    phrase repeated within 30 tokens"), counted over every held-out docstring opening rather than read on a
    dozen. A model that says little loops little, one that ends after "The following functions are:" writes
    no sentence, and one that ends every prompt with "New in version 3.11." does neither.

    With a reference model (picogpt's), also how many continuations hold a token that it gives p < RARE_P,
    and its mean negative log-likelihood of their tokens (nats per token): a model can stop looping by
    writing nonsense ("tolerated tolerated toleratedEss"), which a loop count does not see."""
    model = picogpt.load(model_path, quiet=True)
    within_sample = within_make_run = ended_early = unfinished = rare = 0
    nll, n_tokens, continuations = 0.0, 0, set()
    for prompt in prompts:
        ids = encoding.encode(prompt)
        new = list(generate(model, ids, SAMPLE_TOKENS))
        continuations.add(tuple(new))
        within_sample += repeated_phrase(new) is not None
        within_make_run += repeated_phrase(new[:MAKE_RUN_TOKENS]) is not None
        ended_early += len(new) < SAMPLE_TOKENS
        unfinished += len(new) < SAMPLE_TOKENS and not holds_a_sentence(encoding.decode(new))
        if reference is not None and new:
            log_probs = score(reference, ids + new).token_log_probs[len(ids) - 1:]  # [len(new)]
            rare += bool((log_probs < math.log(RARE_P)).any())
            nll -= log_probs.sum()
            n_tokens += len(new)
    counts = within_sample, within_make_run, ended_early, unfinished, len(continuations)
    return counts if reference is None else (*counts, rare, nll / max(1, n_tokens))


def greedy_loops_line(model_path, prompts, encoding, reference_path=None):
    """greedy_loops' counts as the one line that --judge prints and a training run logs."""
    reference = picogpt.load(reference_path, quiet=True) if reference_path else None
    within_sample, within_make_run, ended_early, unfinished, distinct, *rare = greedy_loops(model_path, prompts,
                                                                                          encoding, reference)
    return (f"greedy loops: {within_sample} of {len(prompts)} held-out docstring openings repeat a four-token phrase "
            f"within {SAMPLE_TOKENS} tokens, {within_make_run} within {MAKE_RUN_TOKENS}; {ended_early} end before "
            f"{SAMPLE_TOKENS} tokens, {unfinished} of them before completing a sentence; {distinct} are distinct; "
            f"for {model_path}"
            + (f"; {rare[0]} hold a token that {reference_path} gives p < {RARE_P:g}, and its mean negative "
               f"log-likelihood of their tokens is {rare[1]:.3f} nats" if rare else ""))


def sample_prompts(openings):
    """The README's prompt, then N_HELD_OUT_PROMPTS of the held-out openings picked evenly."""
    picks = np.linspace(0, len(openings) - 1, N_HELD_OUT_PROMPTS).astype(int)
    return [README_PROMPT] + [openings[i] for i in picks]


def sample_line(model, prompt, encoding):
    """A greedy continuation of SAMPLE_TOKENS as the log shows it, with its faults named."""
    new = list(generate(model, encoding.encode(prompt), SAMPLE_TOKENS))
    text, repeat = encoding.decode(new), repeated_phrase(new)
    faults = ([f"repeats {encoding.decode(list(repeat))!r}"] if repeat else []) + (
        ["no complete sentence"] if len(new) < SAMPLE_TOKENS and not holds_a_sentence(text) else [])
    return f"sample: {prompt!r} -> {text!r}" + (f" ({'; '.join(faults)})" if faults else "")


def judge(model_paths, reference_path=None):
    """--judge: greedy_loops_line for each model file, over every held-out docstring opening."""
    encoding = load_tokenizer()
    prompts = held_out_openings(list(docstrings(stdlib_files())))
    for path in model_paths:
        print(greedy_loops_line(path, prompts, encoding, reference_path), flush=True)
