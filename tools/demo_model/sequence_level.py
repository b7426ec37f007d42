"""The sequence-level steps: the model's own greedy continuations, and the losses that train it against
their loops, their junk and their early ends, and towards the best of a reference's samples.

Next-token training on good text never shows a model its own loops. Every UL_EVERY-th step of a run
started with --unlikelihood-from continues BATCH_SIZE prefixes (prefixes.py) greedily for
UL_CONTINUATION tokens and trains on what it wrote: sequence-level unlikelihood (Welleck et al. 2019,
"Neural Text Generation with Unlikelihood Training") or a margin on greedy's choice. The rate is a
constant UL_LR, and the run stops when the greedy continuations of N_LOOP_OPENINGS training-docstring
openings that loop have fallen by fewer than UL_PLATEAU over the last PATIENCE evaluations (or at
--max-steps): counted on training text, so the held-out openings still judge it.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from picogpt.tokenizer import EOT

from .judging import SAMPLE_TOKENS, holds_a_sentence, repeated_phrase, repeating_positions
from .training import EVAL_EVERY, PATIENCE

UL_LR, UL_CONTINUATION, UL_EVERY, UL_PLATEAU, N_LOOP_OPENINGS = 1e-4, 60, 2, 3, 96
# --unlikelihood-best-of: how the reference samples (as the README's sampling example), and how much a
# continuation's likelihood without the prefix counts against it (Li et al. 2016's MMI-bidi lambda): the
# reference's likeliest continuation alone is boilerplate that fits any prefix ("New in version 3.3.").
BEST_OF_TEMPERATURE, BEST_OF_TOP_K, BEST_OF_GENERIC = 0.8, 40, 0.5


@torch.no_grad()
def greedy_torch(model, windows, n_tokens, stop_at_eot):
    """transformers' greedy generate after each window [batch, n]: the new tokens [batch, <= n_tokens]."""
    model.eval()
    out = model.generate(windows, attention_mask=torch.ones_like(windows), do_sample=False, num_beams=1,
                         max_new_tokens=n_tokens, min_new_tokens=0 if stop_at_eot else n_tokens,
                         eos_token_id=EOT if stop_at_eot else None, pad_token_id=EOT)
    model.train()
    return out[:, windows.shape[1]:]


def own_continuations(model, prefixes, encoding=None):
    """Continue each prefix [batch, n_prefix] greedily for UL_CONTINUATION tokens: the sequences [batch, n],
    and which of their next-token targets [batch, n - 1] (up to the first <|endoftext|>) repeat an earlier
    four-token phrase and which are the continuation's others. Given the tokenizer (--unlikelihood-early-end),
    an <|endoftext|> that ends a continuation holding no complete sentence (empty, or only "\nThe following
    functions are:") counts with the repeating tokens."""
    n_prefix = prefixes.shape[1]
    seq = torch.cat([prefixes, greedy_torch(model, prefixes, UL_CONTINUATION, stop_at_eot=False)], dim=1)
    penalised = torch.zeros(seq.shape, dtype=torch.bool)  # [batch, n_prefix + UL_CONTINUATION]
    continuation = torch.zeros(seq.shape, dtype=torch.bool)
    for row, ids in enumerate(seq.tolist()):
        end = ids.index(EOT, n_prefix) if EOT in ids[n_prefix:] else len(ids)
        continuation[row, n_prefix:end] = True
        penalised[row, repeating_positions(ids[:end], n_prefix)] = True
        if encoding is not None and end < len(ids) and not holds_a_sentence(encoding.decode(ids[n_prefix:end])):
            penalised[row, end] = True  # the <|endoftext|> itself: [:, 1:] below makes it the target at end - 1
    return seq, penalised[:, 1:], continuation[:, 1:] & ~penalised[:, 1:]


def unlikelihood_loss(model, prefixes, bf16):
    """Sequence-level unlikelihood: continue each prefix greedily, then lower the probability p the model
    gives each continuation token that repeats an earlier four-token phrase (-log(1 - p), averaged over
    those tokens; up to the first <|endoftext|>)."""
    seq, repeats, _ = own_continuations(model, prefixes)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(seq[:, :-1]).logits  # [batch, n - 1, n_vocab]: position i predicts token i + 1
    p = F.softmax(logits.float(), dim=-1).gather(-1, seq[:, 1:, None])[..., 0]  # [batch, n - 1]
    return -torch.log(torch.clamp(1 - p[repeats], min=1e-5)).sum() / max(1, int(repeats.sum()))


def margin_unlikelihood_loss(model, prefixes, bf16, margin, reference=None, among=None, nonsense=None,
                             encoding=None):
    """The sequence-level step as a hinge on greedy's choice (--unlikelihood-margin): continue each prefix
    greedily, then at each token that repeats a four-token phrase, max(0, margin + log p(that token) -
    log p(the best other token)), averaged over those tokens.

    Greedy decoding asks only which token comes first. -log(1 - p) pushes a repeating token with force p,
    which fades as the distribution flattens, while near-ties among small p are where greedy text wanders;
    it also keeps pushing a token that is no longer chosen. This pushes with the same force until the
    token is margin nats below the model's next choice, raises that choice alone, and then stops.

    With `among` (--unlikelihood-margin-among K), the other token is the best of the reference's K
    likeliest there, so that what the hinge raises is a token the reference found plausible, not whatever
    junk comes second in a flattened distribution. With `nonsense` (--unlikelihood-nonsense P), a
    continuation token that the reference gives p < P is pushed down as a repeating one is: greedy's junk,
    as well as its loops. Given the tokenizer (--unlikelihood-early-end), so is an <|endoftext|> that ends
    a continuation holding no complete sentence: a model pushed off its loops learns that ending is never
    penalised, and ends right after the prompt or after "\nThe following functions are:". Where the
    document really ends there (a one-sentence docstring), this pushes against the data: the trade is a
    model that always writes on.
    """
    if reference is None and (among is not None or nonsense is not None):
        raise ValueError("a margin among a reference's likeliest tokens, or on its nonsense, needs that reference")
    seq, repeats, others = own_continuations(model, prefixes, encoding)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(seq[:, :-1]).logits  # [batch, n - 1, n_vocab]: position i predicts token i + 1
        if reference is not None:
            with torch.no_grad():
                reference_logits = reference(seq[:, :-1]).logits.float()
    logits = logits.float()  # a difference of logits is the difference of log-probabilities
    if nonsense is not None:  # the continuation's tokens the reference finds nonsense join the repeating ones
        reference_p = F.softmax(reference_logits, dim=-1).gather(-1, seq[:, 1:, None])[..., 0]  # [batch, n - 1]
        repeats = repeats | ((repeats | others) & (reference_p < nonsense))
    chosen = logits.gather(-1, seq[:, 1:, None])[..., 0]  # [batch, n - 1]
    candidates = logits
    if among is not None:  # only the reference's `among` likeliest tokens can be the other choice
        top = reference_logits.topk(among).indices  # [batch, n - 1, among]
        likeliest = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, True)
        candidates = logits.masked_fill(~likeliest, float("-inf"))
    runner_up = candidates.scatter(-1, seq[:, 1:, None], float("-inf")).amax(-1)  # [batch, n - 1]
    return F.relu(margin + chosen - runner_up)[repeats].sum() / max(1, int(repeats.sum()))


def token_log_probs(logits, seq):
    """The log-probability logits [batch, n - 1, n_vocab] give each next token of seq [batch, n]: [batch, n - 1]."""
    logits = logits.float()
    return logits.gather(-1, seq[:, 1:, None])[..., 0] - logits.logsumexp(-1)


@torch.no_grad()
def best_sampled_continuations(reference, prefixes, k, encoding, batches, bf16, nonsense=None):
    """--unlikelihood-best-of K: sample K continuations of each prefix [batch, n_prefix] from the reference
    (frozen, in eval mode; temperature BEST_OF_TEMPERATURE among the BEST_OF_TOP_K likeliest tokens, up to
    UL_CONTINUATION tokens, seeded from `batches`), keep those that end at <|endoftext|> after completing a
    sentence, without repeating a four-token phrase or (given `nonsense`) holding a token the reference
    gives p < nonsense, and of those take the one that scores best: the reference's mean log-probability of
    its tokens, its <|endoftext|> included, after the prefix, less BEST_OF_GENERIC times that after
    <|endoftext|> alone, so that boilerplate that fits every prefix does not win.

    Returns the chosen sequences [m, n] (m <= batch: a prefix may have none; padded with <|endoftext|>) and
    which of their next-token targets [m, n - 1] are the continuation and its <|endoftext|>."""
    n_prefix = prefixes.shape[1]
    seed = int(torch.randint(2**31 - 1, (1,), generator=batches))  # so that a resumed run samples the same
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = reference.generate(prefixes.repeat_interleave(k, 0), do_sample=True,
                                     attention_mask=torch.ones_like(prefixes).repeat_interleave(k, 0),
                                     temperature=BEST_OF_TEMPERATURE, top_k=BEST_OF_TOP_K,
                                     max_new_tokens=UL_CONTINUATION, eos_token_id=EOT, pad_token_id=EOT)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        reference_logits = reference(samples[:, :-1]).logits
    log_probs = token_log_probs(reference_logits, samples)  # [batch * k, n - 1]
    kept, ends = [], []  # the samples that qualify, and where each one's <|endoftext|> is
    for j, ids in enumerate(samples.tolist()):
        if EOT not in ids[n_prefix:]:
            continue
        end = ids.index(EOT, n_prefix)  # log_probs[j, i] is the reference's for token i + 1
        continuation = log_probs[j, n_prefix - 1:end - 1]
        if (repeating_positions(ids[:end], n_prefix) or not holds_a_sentence(encoding.decode(ids[n_prefix:end]))
                or (nonsense is not None and bool((continuation < math.log(nonsense)).any()))):
            continue
        kept.append(j)
        ends.append(end)
    if not kept:
        return samples[:0, :n_prefix + 1], torch.zeros(0, n_prefix, dtype=torch.bool)
    # the same continuations after <|endoftext|> alone: [len(kept), longest + 1], padded after their end
    alone = torch.full((len(kept), max(ends) - n_prefix + 2), EOT)
    for row, (j, end) in enumerate(zip(kept, ends)):
        alone[row, 1:end - n_prefix + 2] = samples[j, n_prefix:end + 1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        alone_log_probs = token_log_probs(reference(alone[:, :-1]).logits, alone)
    best = {}  # prefix row -> (score, sample, end)
    for row, (j, end) in enumerate(zip(kept, ends)):
        score = (log_probs[j, n_prefix - 1:end].mean()
                 - BEST_OF_GENERIC * alone_log_probs[row, :end - n_prefix + 1].mean()).item()
        best[j // k] = max(best.get(j // k, (-math.inf,)), (score, j, end))
    chosen = [best[row][1] for row in sorted(best)]
    ends = [best[row][2] for row in sorted(best)]
    seq = samples[chosen, :max(ends) + 1]  # [m, n]
    positions = torch.arange(seq.shape[1] - 1)  # target i is token i + 1
    targets = (positions >= n_prefix - 1) & (positions < torch.tensor(ends)[:, None])  # [m, n - 1]
    return seq, targets


def best_sample_loss(model, reference, prefixes, bf16, k, encoding, batches, nonsense=None):
    """Cross-entropy of the model on best_sampled_continuations' continuations and their <|endoftext|>,
    averaged over those tokens (0 when no prefix has one): a push towards text the reference finds likely
    that ends after a sentence, where the hinge only pushes away from what greedy wrote."""
    seq, targets = best_sampled_continuations(reference, prefixes, k, encoding, batches, bf16, nonsense)
    if not targets.any():
        return torch.zeros((), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(seq[:, :-1]).logits  # [m, n - 1, n_vocab]
    return F.cross_entropy(logits.float()[targets], seq[:, 1:][targets])


def looping_openings(model, prompts_ids, encoding):
    """How many greedy continuations of SAMPLE_TOKENS (ending at <|endoftext|>) repeat a four-token phrase,
    and how many end holding no complete sentence."""
    loops = unfinished = 0
    for ids in prompts_ids:
        new = greedy_torch(model, torch.tensor([ids]), SAMPLE_TOKENS, stop_at_eot=True)[0].tolist()
        ended = EOT in new
        new = new[:new.index(EOT)] if ended else new
        loops += repeated_phrase(new) is not None
        unfinished += ended and not holds_a_sentence(encoding.decode(new))
    return loops, unfinished


class UnlikelihoodSchedule:
    """The constant rate UL_LR until the looping continuations of training openings have fallen by fewer
    than UL_PLATEAU over the last PATIENCE evaluations, or until max_steps."""

    def __init__(self, max_steps, loop_counts=(), stopped_at=None):
        self.max_steps, self.loop_counts, self.stopped_at = max_steps, list(loop_counts), stopped_at

    def lr(self, step):
        return UL_LR

    @property
    def end(self):
        return self.stopped_at or self.max_steps

    @property
    def fewest_loops_step(self):
        """The step of the first evaluation at which the fewest training openings looped."""
        return min((int(np.argmin(self.loop_counts)) + 1) * EVAL_EVERY, self.end)

    def evaluated(self, step, loops):
        """Record an evaluation after `step` steps; returns why training stops now, or None."""
        self.loop_counts.append(loops)
        recent = self.loop_counts[-PATIENCE - 1:]
        if len(recent) > PATIENCE and recent[0] - min(recent[1:]) < UL_PLATEAU:
            self.stopped_at = step
            return f"the looping openings fell by fewer than {UL_PLATEAU} over the last {PATIENCE} evaluations"
        return None
