"""Generation beyond greedy: sampling, stopping, streaming, batches, scoring (picogpt.generate + CLI).

Sampling is checked on its distributions, not only on running: filters against their definitions and
against Hugging Face's logits processors, frequencies of many draws against the softmax.
"""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from hf_reference import hf_model, random_tensors, write_model_dat
from picogpt import blas, cli
from picogpt.errors import BadArgument, PicogptError
from picogpt.generate import complete, decode_steps, generate, generate_batch, stream_text
from picogpt.sampling import (MinNewTokens, NoRepeatNGram, RepetitionPenalty, Temperature, Text, TopK, TopP,
                              banned_ngram_tokens, choose_next, distribution, logits_processors, softmax64)
from picogpt.scoring import score
from picogpt.model import GPT2
from picogpt.store import load
from picogpt.tokenizer import EOT, decode, encode
from picogpt.trace import collect

# GPT-2's vocabulary (so text tokenizes into it), narrow and shallow to stay fast.
HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2, layer_norm_epsilon=1e-5)
PROMPTS = ["Alan Turing theorized that computers", "Hello", "The quick brown fox jumps over the lazy dog and"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model_dat(tmp_path_factory.mktemp("m") / "model.dat", HPARAMS, random_tensors(HPARAMS, seed=11))


@pytest.fixture(scope="module")
def model(model_path):
    return load(model_path)


class ScriptedModel:
    """Stands in for a model in decode_steps: step k's logits make `script[k]` the only sensible token."""

    def __init__(self, script, n_ctx=64):
        self.script, self.calls = list(script), 0
        self.hparams = dict(HPARAMS, n_ctx=n_ctx)
        self.path = None

    def new_cache(self, n_batch=1, n_positions=None):
        return [None]

    def __call__(self, ids, cache=None, n_pad=None):
        logits = np.zeros((len(ids), 1, HPARAMS["n_vocab"]), dtype=np.float32)
        logits[:, :, self.script[self.calls]] = 10
        self.calls += 1
        return logits


# ---------------------------------------------------------------------------------------------------
# Sampling

def random_logits(seed, n_batch=3, n_vocab=200):
    return np.random.default_rng(seed).normal(0, 3, (n_batch, n_vocab)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_never_emits_a_token_outside_the_k_best(k):
    logits = random_logits(k)
    best = np.argsort(-logits, axis=-1)[:, :k]
    rng = np.random.default_rng(0)
    for _ in range(300):
        chosen = choose_next(TopK(k)(Temperature(1.5)(logits)), rng)
        assert all(token in row for token, row in zip(chosen, best))
    kept = np.isfinite(TopK(k)(logits))
    assert (kept.sum(axis=-1) == k).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(p):
    logits = random_logits(int(p * 100))
    probs = softmax64(logits)
    kept = np.isfinite(TopP(p)(logits))
    for row_probs, row_kept in zip(probs, kept):
        kept_probs = row_probs[row_kept]
        assert kept_probs.min() >= row_probs[~row_kept].max(initial=0)  # the most likely tokens
        assert kept_probs.sum() >= p  # reaches p...
        assert kept_probs.sum() - kept_probs.min() < p  # ...and no smaller set does


def test_filters_and_penalty_agree_with_hugging_face_processors():
    logits = random_logits(7)
    history = torch.tensor([[3, 5, 5, 190], [0, 1, 2, 3], [199, 7, 8, 9]])
    text = Text(history.numpy(), np.zeros(3, np.int64), 0)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(history, torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_allclose(RepetitionPenalty(1.3)(logits, text), theirs, rtol=1e-6)
    scores = torch.from_numpy(logits.copy())
    assert (np.isfinite(TopK(10)(logits)) == np.isfinite(TopKLogitsWarper(10)(None, scores).numpy())).all()
    assert (np.isfinite(TopP(0.8)(logits)) == np.isfinite(TopPLogitsWarper(0.8)(None, scores).numpy())).all()


def test_sampled_frequencies_match_the_softmax():
    """200,000 draws from a known distribution: every token's frequency within 4.5 standard errors
    (a false alarm has probability ~1e-5 per token; the seed makes the run itself deterministic), and
    a total variation distance under 0.01."""
    logits = np.log(np.array([[0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005]], dtype=np.float32))
    probs = softmax64(logits)[0]
    rng = np.random.default_rng(1234)
    n = 200_000
    draws = np.concatenate([choose_next(np.repeat(logits, 1000, axis=0), rng) for _ in range(n // 1000)])
    freq = np.bincount(draws, minlength=len(probs)) / n
    assert (np.abs(freq - probs) <= 4.5 * np.sqrt(probs * (1 - probs) / n)).all()
    assert 0.5 * np.abs(freq - probs).sum() < 0.01
    # Temperature 2 flattens the same distribution to softmax(logits / 2).
    draws = np.concatenate([choose_next(Temperature(2.0)(np.repeat(logits, 1000, axis=0)), rng) for _ in range(50)])
    flat = softmax64(logits / 2)[0]
    assert 0.5 * np.abs(np.bincount(draws, minlength=len(probs)) / len(draws) - flat).sum() < 0.01


def test_temperature_towards_zero_converges_to_greedy(model):
    ids = encode(PROMPTS[0])
    greedy = list(generate(model, ids, 15, stop_at_eot=False))
    assert list(generate(model, ids, 15, stop_at_eot=False, temperature=1e-4, seed=3)) == greedy
    assert list(generate(model, ids, 15, stop_at_eot=False, temperature=0)) == greedy  # 0 is greedy, no division
    # Temperatures so small that float32's logits / T overflow (or T itself is below float32's range): their
    # limit, greedy, not NaN and a token outside the vocabulary
    for temperature in (1e-40, 1e-300, 5e-324):
        assert list(generate(model, ids, 15, stop_at_eot=False, temperature=temperature, seed=3)) == greedy
        assert list(generate(model, ids, 15, stop_at_eot=False, temperature=temperature, top_k=5, top_p=1e-300,
                              seed=3)) == greedy


@pytest.mark.parametrize("options", [dict(repetition_penalty=1e-40), dict(repetition_penalty=1e-40, temperature=1.0),
                                     dict(repetition_penalty=1e300, temperature=1e300),
                                     dict(temperature=1.0, top_p=1e-300),
                                     dict(temperature=1e-40, repetition_penalty=1e300)])
def test_extreme_settings_give_a_defined_token_inside_the_vocabulary(model, options):
    ids = encode(PROMPTS[0])
    options = dict(options, seed=1) if options.get("temperature", 0) > 0 else options
    tokens = list(generate(model, ids, 15, stop_at_eot=False, **options))
    assert len(tokens) == 15 and all(0 <= t < HPARAMS["n_vocab"] for t in tokens)
    assert tokens == list(generate(model, ids, 15, stop_at_eot=False, **options))  # the same again
    logits = model(ids)[-1]
    probs = distribution(logits, ids, **{k: v for k, v in options.items() if k != "seed"})
    assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1)


def test_a_penalty_near_zero_tends_to_the_likeliest_seen_token():
    """The limit of a repetition penalty towards 0 (every seen token with a positive logit grows past any
    other): the seen token of the largest logit, even where float32 made several of them infinite."""
    logits = np.array([[3.0, 1.0, 5.0, -2.0, 2.5]], dtype=np.float32)
    text = Text(np.array([[0, 1, 3]]), np.zeros(1, np.int64), 0)  # seen: 0, 1, 3 (not 2, the likeliest)
    for penalty in (1e-3, 1e-40, 1e-300):
        assert choose_next(RepetitionPenalty(penalty)(logits, text))[0] == 0
    np.testing.assert_array_equal(softmax64(RepetitionPenalty(1e-40)(logits, text))[0], [1, 0, 0, 0, 0])
    kept = TopP(0.0)(logits)  # p = 0 keeps the likeliest token alone, as transformers' min_tokens_to_keep
    assert np.isfinite(kept).sum() == 1 and np.isfinite(kept[0, 2])


def test_same_seed_same_tokens_different_seed_different_tokens(model):
    ids = encode(PROMPTS[0])
    options = dict(stop_at_eot=False, temperature=1.0, top_k=1000, top_p=0.95, seed=42)
    first = list(generate(model, ids, 20, **options))
    assert list(generate(model, ids, 20, **options)) == first
    assert list(generate(model, ids, 20, **dict(options, use_cache=False))) == first
    assert list(generate(model, ids, 20, **dict(options, seed=43))) != first


def test_same_seed_same_text_on_every_backend(model):
    ids = encode(PROMPTS[2])
    options = dict(stop_at_eot=False, temperature=0.9, seed=7)
    texts = {}
    for backend in ("numpy", "openblas"):
        blas.use(backend)
        try:
            texts[backend] = list(generate(model, ids, 20, **options))
        finally:
            blas.use("numpy")
    assert texts["numpy"] == texts["openblas"]


def test_repetition_penalty_discourages_repeats(model):
    ids = encode(PROMPTS[1])
    plain = list(generate(model, ids, 30, stop_at_eot=False))
    penalised = list(generate(model, ids, 30, stop_at_eot=False, repetition_penalty=5.0))
    assert len(set(penalised)) > len(set(plain))  # this random model loops; the penalty breaks the loop


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-1), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top-k must be a whole number >= 1"),
    (dict(top_p=1.5), r"top-p must be in \(0, 1\]"),
    (dict(repetition_penalty=0), "repetition penalty must be a number > 0"),
    (dict(top_k=40), "temperature 0 is greedy"),
    (dict(top_p=0.9, temperature=0), "temperature 0 is greedy"),
])
def test_meaningless_sampling_settings_are_refused(model, options, message):
    with pytest.raises(PicogptError, match=message):
        next(generate(model, [1, 2], 3, **options))


# ---------------------------------------------------------------------------------------------------
# The rules of what may come next, as Hugging Face's processors define them

def test_banned_ngrams_follow_the_definition():
    def banned(row, n):
        rows, tokens = banned_ngram_tokens(np.array([row]), n)
        return sorted(tokens.tolist())
    assert banned([1, 2, 3, 1, 2], 3) == [3]  # "1 2" came before, followed by 3
    assert banned([1, 2, 1, 2, 1], 2) == [2, 2]  # "1" came twice, followed by 2 each time
    assert banned([5, 6], 3) == [] and banned([5], 3) == []  # no n-gram yet
    assert banned([4, 7, 4], 1) == [4, 4, 7]  # n = 1: every token already there
    rows, tokens = banned_ngram_tokens(np.array([[1, 2, 1], [3, 1, 3]]), 2)
    assert sorted(zip(rows.tolist(), tokens.tolist())) == [(0, 2), (1, 1)]


def padded_history():
    """Three rows of tokens left-padded with token 0 by 0, 2 and 4 positions, whose last tokens came before,
    and whose padding, read as text, would add n-grams of its own."""
    tokens = np.array([[1, 2, 3, 1, 2, 4, 1, 2, 3, 1],
                       [0, 0, 5, 0, 4, 5, 0, 4, 5, 0],
                       [0, 0, 0, 0, 3, 3, 0, 3, 3, 0]])
    return tokens, np.array([0, 2, 4])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_equals_hugging_faces_and_leaves_padding_out_unless_asked(n):
    logits = random_logits(n)
    tokens, n_pad = padded_history()
    theirs = NoRepeatNGramLogitsProcessor(n)(torch.from_numpy(tokens), torch.from_numpy(logits.copy())).numpy()
    ours = NoRepeatNGram(n, padding_counts=True)(logits, Text(tokens, n_pad, 0))
    assert np.isneginf(ours).all(axis=-1).sum() == 0 and np.isneginf(ours).any(axis=-1).all()  # each row bans some
    assert np.array_equal(np.isneginf(ours), np.isneginf(theirs))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)])
    # By default a padded row is banned what the same row alone is banned: the padding is not text.
    counting_padding = ours
    ours = NoRepeatNGram(n)(logits, Text(tokens, n_pad, 0))
    if n == 2:
        assert not np.array_equal(np.isneginf(ours), np.isneginf(counting_padding))  # the two ways differ here
    for row, pad in enumerate(n_pad):
        alone = NoRepeatNGramLogitsProcessor(n)(torch.from_numpy(tokens[row:row + 1, pad:]),
                                                torch.from_numpy(logits[row:row + 1].copy())).numpy()
        assert np.array_equal(np.isneginf(ours[row:row + 1]), np.isneginf(alone))
    assert np.array_equal(logits, random_logits(n))  # the input is left alone


def test_min_new_tokens_and_the_repetition_penalty_equal_hugging_faces():
    logits = random_logits(5)
    tokens, n_pad = padded_history()
    for n_new in (2, 4, 5):  # the rule holds for new tokens 0 to 4
        theirs = MinNewTokensLengthLogitsProcessor(tokens.shape[1] - n_new, 5, 7)(
            torch.from_numpy(tokens), torch.from_numpy(logits.copy())).numpy()
        ours = MinNewTokens(5, 7)(logits, Text(tokens, n_pad, n_new))
        assert np.array_equal(ours, theirs) and np.isneginf(ours[:, 7]).all() == (n_new < 5)
    theirs = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.from_numpy(n_pad))(
        torch.from_numpy(tokens), torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_allclose(RepetitionPenalty(1.5)(logits, Text(tokens, n_pad, 0)), theirs, rtol=1e-6)


def hf_new_tokens(reference, prompt, n_tokens, **options):
    """Hugging Face's greedy generate on one prompt: its new tokens, EOS included, padding after it dropped."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=options["eos_token_id"], **options)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(options["eos_token_id"]) + 1] if options["eos_token_id"] in new else new


@pytest.fixture(scope="module")
def reference(model_path):
    from picogpt.modelfile import open_model_file
    return hf_model(HPARAMS, open_model_file(model_path).tensors)


@pytest.mark.parametrize("rules", [dict(no_repeat_ngram_size=1), dict(no_repeat_ngram_size=2),
                                   dict(no_repeat_ngram_size=3), dict(min_new_tokens=9),
                                   dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5)])
def test_greedy_decoding_with_the_rules_gives_hugging_faces_tokens(model, reference, rules):
    prompt = encode(PROMPTS[1])  # this random model answers it with one token, over and over
    # The end token: that one, where a minimum is tested (plain greedy search ends at once), else one never reached
    eos = int(np.argmax(model(prompt)[-1])) if "min_new_tokens" in rules else EOT
    expected = hf_new_tokens(reference, prompt, 16, eos_token_id=eos, **rules)
    ours = [int(step.ids[0]) for step in decode_steps(model, [prompt], 16, eos_token_id=eos, **rules)]
    assert ours == expected
    plain = [int(step.ids[0]) for step in decode_steps(model, [prompt], 16, eos_token_id=eos)]
    assert ours != plain  # the rules changed something
    if "min_new_tokens" in rules:
        assert plain == [eos] and eos not in ours[:rules["min_new_tokens"]]  # held off


def test_the_rules_give_each_row_of_a_batch_what_it_gets_alone(model):
    prompts = [encode(p) for p in PROMPTS]
    rules = dict(no_repeat_ngram_size=2, repetition_penalty=1.2, min_new_tokens=4, stop_at_eot=False)
    with pytest.raises(BadArgument, match="min-new-tokens holds off the end token"):  # no end token, no rule
        generate_batch(model, prompts, 12, **rules)
    del rules["min_new_tokens"]
    alone = [list(generate(model, p, 12, **rules)) for p in prompts]
    assert generate_batch(model, prompts, 12, **rules) == alone
    assert all(len(set(zip(row, row[1:]))) == len(row) - 1 for row in alone)  # no bigram twice in what was new


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")  # one step at a time, min_new_tokens counts on
def test_sampling_draws_from_hugging_faces_distribution_with_every_rule(model, reference):
    """Step by step along a sampled text, the distribution picogpt draws from (its processed scores'
    softmax) against Hugging Face's generate's processed scores for the same text, within 1e-6."""
    prompt = encode("the cat and the cat and the")  # "the" ends it, and "the cat" is there: "cat" is banned
    options = dict(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.3, no_repeat_ngram_size=2,
                   min_new_tokens=3)
    eos = int(np.argmax(model(prompt)[-1]))  # the likeliest next token, held off for 3 tokens
    steps = list(decode_steps(model, [prompt], 6, eos_token_id=eos, seed=4, **options))
    text = prompt + [int(step.ids[0]) for step in steps]
    cat = encode(" cat")[0]
    assert np.isneginf(steps[0].scores[0, cat]) and np.isneginf(steps[0].scores[0, eos])
    for k, step in enumerate(steps):
        ids = torch.tensor([text[:len(prompt) + k]])
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=1,
                                     eos_token_id=eos, pad_token_id=eos, output_scores=True,
                                     return_dict_in_generate=True, **dict(options, min_new_tokens=max(0, 3 - k)))
        theirs = softmax64(out.scores[0].numpy())[0]
        ours = softmax64(step.scores)[0]
        assert np.array_equal(ours > 0, theirs > 0)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert distribution(model(prompt)[-1], prompt, **dict(options, min_new_tokens=0)) == pytest.approx(
        softmax64(logits_processors(**dict(options, min_new_tokens=0))(
            model(prompt)[-1][None], Text(np.array([prompt]), np.zeros(1, np.int64), 0)))[0])


# ---------------------------------------------------------------------------------------------------
# Stopping and streaming

def test_stops_at_endoftext_unless_told_not_to():
    words = encode(" one two three")
    assert list(generate(ScriptedModel(words + [EOT] + words), [1], 10)) == words
    assert list(generate(ScriptedModel(words + [EOT] + words), [1], 7, stop_at_eot=False)) == words + [EOT] + words


def test_stop_strings_end_the_text_before_them_even_across_tokens():
    script = encode("Roses are red.\n\nViolets are blue.") + [EOT]
    text = lambda stop: "".join(stream_text(ScriptedModel(script), "x", 30, stop=stop))  # noqa: E731
    assert text([]) == "Roses are red.\n\nViolets are blue."
    assert text(["\n\n"]) == "Roses are red."
    assert text(["blue", "red"]) == "Roses are "  # the first one to appear wins
    assert text(["s are r"]) == "Rose"  # spread over three tokens
    assert text(["green"]) == "Roses are red.\n\nViolets are blue."
    model = ScriptedModel(script)
    assert "".join(stream_text(model, "x", 30, stop=["red"])) == "Roses are "
    assert model.calls == encode("Roses are red").index(encode(" red")[0]) + 1  # no work after the stop


def test_streaming_yields_each_piece_before_the_next_step_and_holds_split_characters():
    text = "日本語のテキスト 🙂👍🏽 café"
    script = encode(text) + [EOT]
    assert any("\ufffd" in decode([t]) for t in script)  # some tokens are parts of a character
    model = ScriptedModel(script)
    pieces = []
    for piece in stream_text(model, "x", 50):
        pieces.append((piece, model.calls))
    assert "".join(p for p, _ in pieces) == text
    assert all("\ufffd" not in p for p, _ in pieces)
    assert [calls for _, calls in pieces] == sorted(calls for _, calls in pieces)
    assert pieces[0][1] < len(script) // 2  # the first text came out long before the last step


def test_context_limit_is_checked_before_any_work_or_slides_on_request(model):
    scripted = ScriptedModel([5] * 100, n_ctx=16)
    with pytest.raises(PicogptError, match=r"prompt \(10 tokens\) plus 7 new tokens exceed .* --sliding-window"):
        next(generate(scripted, list(range(10)), 7))
    assert scripted.calls == 0
    small = GPT2(dict(HPARAMS, n_ctx=16), {**random_tensors(dict(HPARAMS, n_ctx=16), seed=2)})
    ids = encode(PROMPTS[2])[:12]
    slid = list(generate(small, ids, 10, stop_at_eot=False, sliding_window=True))
    assert slid == list(generate(small, ids, 10, stop_at_eot=False, sliding_window=True, use_cache=False))
    for prompt in (ids, (ids * 3)[:40]):  # the second is longer than the context itself
        new = list(generate(small, prompt, 10, stop_at_eot=False, sliding_window=True))
        text = prompt + new
        for i, token in enumerate(new):  # each the greedy choice after the last 16 tokens before it
            assert token == int(np.argmax(small(text[:len(prompt) + i][-16:])[-1]))


# ---------------------------------------------------------------------------------------------------
# Batches

def test_a_batch_of_different_lengths_gives_each_prompt_what_it_gets_alone(model):
    prompts = [encode(p) for p in PROMPTS]
    alone = [list(generate(model, p, 12, stop_at_eot=False)) for p in prompts]
    assert generate_batch(model, prompts, 12, stop_at_eot=False) == alone
    assert generate_batch(model, prompts, 12, stop_at_eot=False, use_cache=False) == alone
    # The logits too, within float32 rounding: padding is invisible.
    tokens = np.zeros((3, max(map(len, prompts))), dtype=np.int64)
    n_pad = [tokens.shape[1] - len(p) for p in prompts]
    for row, p in enumerate(prompts):
        tokens[row, n_pad[row]:] = p
    out = collect(model, tokens, n_pad=n_pad, all_logits=True)
    for row, p in enumerate(prompts):
        single = collect(model, p, all_logits=True)
        np.testing.assert_allclose(out.logits[row, n_pad[row]:], single.logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.hidden_states[-1][row, n_pad[row]:], single.hidden_states[-1], atol=1e-5)


def test_batched_hidden_states_and_attentions_match_hugging_face_with_padding(model_path, model):
    from picogpt.modelfile import open_model_file
    reference = hf_model(HPARAMS, open_model_file(model_path).tensors)
    prompts = [encode(p) for p in PROMPTS[:2]]
    longest = max(map(len, prompts))
    tokens = np.array([[0] * (longest - len(p)) + p for p in prompts])
    n_pad = [longest - len(p) for p in prompts]
    out = collect(model, tokens, n_pad=n_pad, all_logits=True)
    mask = torch.tensor([[0] * n + [1] * (longest - n) for n in n_pad])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens), attention_mask=mask, position_ids=positions,
                           output_hidden_states=True, output_attentions=True)
    for row, n in enumerate(n_pad):  # real positions only: what padded rows compute at pads is arbitrary
        np.testing.assert_allclose(out.logits[row, n:], theirs.logits[row, n:].numpy(), atol=1e-4, rtol=0)
        for ours, ref in zip(out.hidden_states, theirs.hidden_states):
            np.testing.assert_allclose(ours[row, n:], ref[row, n:].numpy(), atol=1e-4, rtol=0)
        for ours, ref in zip(out.attentions, theirs.attentions):
            np.testing.assert_allclose(ours[row, :, n:, n:], ref[row, :, n:, n:].numpy(), atol=1e-6, rtol=0)
            assert not ours[row, :, n:, :n].any()  # no attention on padding


def test_complete_runs_prompts_and_samples_as_one_batch(model):
    alone = [complete(model, p, 10) for p in PROMPTS]
    assert complete(model, PROMPTS, 10) == alone
    samples = complete(model, PROMPTS[:2], 10, num_samples=3, temperature=1.0, seed=5)
    assert len(samples) == 2 and all(len(s) == 3 for s in samples)
    assert len(set(samples[0])) > 1  # sampling: the three differ


def test_batch_rows_end_independently_at_endoftext():
    script = [[11, 12], [21, EOT], [EOT, 32], [41, 42]]  # step k gives row r script[k][r]

    class TwoRows(ScriptedModel):
        def __call__(self, ids, cache=None, n_pad=None):
            logits = np.zeros((2, 1, HPARAMS["n_vocab"]), dtype=np.float32)
            logits[[0, 1], 0, script[self.calls]] = 10
            self.calls += 1
            return logits
    model = TwoRows([])
    assert generate_batch(model, [[1], [2, 3]], 4) == [[11, 21], [12]]
    assert model.calls == 3  # stopped once both rows had ended


# ---------------------------------------------------------------------------------------------------
# Scoring

def test_score_matches_hugging_face_loss(model_path, model):
    from picogpt.modelfile import open_model_file
    reference = hf_model(HPARAMS, open_model_file(model_path).tensors)
    ids = [EOT] + encode("The quick brown fox jumps over the lazy dog.")
    result = score(model, ids)
    with torch.no_grad():
        loss = reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert result.n_tokens == len(ids) - 1
    assert result.mean_nll == pytest.approx(loss, abs=1e-5)
    assert result.perplexity == pytest.approx(np.exp(loss), rel=1e-5)


def test_score_of_a_text_longer_than_the_context_uses_sliding_windows():
    hparams = dict(HPARAMS, n_ctx=16)
    small = GPT2(hparams, random_tensors(hparams, seed=4))
    ids = (encode(PROMPTS[0] + " " + PROMPTS[2]) * 3)[:40]
    result = score(small, ids, stride=1)
    assert result.n_tokens == 39
    for i in (1, 10, 15, 16, 30, 39):  # token i with as much context as fits: the 15 tokens before it
        context = ids[max(0, i - 15):i]
        logits = small(context)[-1].astype(np.float64)
        expected = logits[ids[i]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert result.token_log_probs[i - 1] == pytest.approx(expected, abs=1e-5)
    default = score(small, ids)  # half-window stride: each token still scored once, with >= 8 tokens of context
    assert default.n_tokens == 39 and np.isfinite(default.token_log_probs).all()


# ---------------------------------------------------------------------------------------------------
# Command line

def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_sampling_is_reproducible_with_a_seed(model_path, capsys):
    args = [PROMPTS[0], "-n", "15", "--model", str(model_path), "--temperature", "0.8", "--top-k", "50",
            "--top-p", "0.9", "--repetition-penalty", "1.2", "--ignore-eot"]
    first = run_cli(capsys, *args, "--seed", "1")
    assert first[0] == 0 and first == run_cli(capsys, *args, "--seed", "1")
    assert run_cli(capsys, *args, "--seed", "2")[1] != first[1]
    model = load(model_path)
    expected = complete(model, PROMPTS[0], 15, stop_at_eot=False, temperature=0.8, top_k=50, top_p=0.9,
                        repetition_penalty=1.2, seed=1)
    assert first[1] == expected + "\n"


def test_cli_prompts_file_and_num_samples(model_path, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:2]) + "\n\n", encoding="utf-8")
    status, out, _ = run_cli(capsys, "--prompts-file", str(prompts_file), "-n", "8", "--model", str(model_path))
    model = load(model_path)
    expected = complete(model, PROMPTS[:2], 8)
    assert status == 0 and out == (f"=== prompt 1/2 (line 1): {PROMPTS[0]!r} ===\n{expected[0]}\n"
                                   f"=== prompt 2/2 (line 2): {PROMPTS[1]!r} ===\n{expected[1]}\n")
    status, out, _ = run_cli(capsys, "Hi", "-n", "5", "--model", str(model_path), "--num-samples", "2",
                             "--temperature", "1", "--seed", "3")
    samples = complete(model, "Hi", 5, num_samples=2, temperature=1.0, seed=3)
    assert out == f"=== sample 1/2 ===\n{samples[0]}\n=== sample 2/2 ===\n{samples[1]}\n"


def test_cli_stop_strings(model_path, capsys):
    model = load(model_path)
    full = complete(model, PROMPTS[0], 20, stop_at_eot=False)
    stop = full[5:8]
    status, out, _ = run_cli(capsys, PROMPTS[0], "-n", "20", "--model", str(model_path), "--ignore-eot",
                             "--stop", "unlikely text", "--stop", stop)
    assert status == 0 and out == full[:full.index(stop)] + "\n"


@pytest.mark.parametrize("args, message", [
    (["--top-p", "1.5"], "--top-p: expected a number > 0 and <= 1, got '1.5'"),
    (["--temperature", "-1"], "--temperature: expected a number >= 0, got '-1'"),
    (["--top-k", "x"], "--top-k: expected a whole number >= 1, got 'x'"),
])
def test_cli_bad_sampling_arguments_are_one_line_usage_errors(model_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        cli.main(["Hi", "--model", str(model_path), *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("\n") == 1


def test_cli_prompt_sources_are_exclusive_and_empty_prompts_files_refused(model_path, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n  \n", encoding="utf-8")
    status, _, err = run_cli(capsys, "Hi", "--prompts-file", str(tmp_path / "p.txt"), "--model", str(model_path))
    assert status == 1 and "give only one of a prompt argument and --prompts-file" in err
    status, _, err = run_cli(capsys, "--prompts-file", str(tmp_path / "p.txt"), "--model", str(model_path))
    assert status == 1 and "holds no prompts" in err and err.count("\n") == 1


def test_cli_score(model_path, tmp_path, capsys):
    text = "The quick brown fox jumps over the lazy dog."
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    status, out, _ = run_cli(capsys, "score", str(tmp_path / "t.txt"), "--model", str(model_path))
    result = score(load(model_path), [EOT] + encode(text))
    assert status == 0
    assert f"tokens scored: {result.n_tokens}\n" in out and f"perplexity: {result.perplexity:.4f}\n" in out
    status, _, err = run_cli(capsys, "score", str(tmp_path / "missing.txt"), "--model", str(model_path))
    assert status == 1 and "cannot read the text file" in err


@pytest.fixture(scope="module")
def demo_pair():
    """The shipped demo model (it ends its sentences with <|endoftext|>) and Hugging Face's on its weights."""
    from picogpt.modelfile import open_model_file
    from picogpt.shipped import demo_model_path
    model_file = open_model_file(demo_model_path())
    return load(demo_model_path(), bf16="widen", quiet=True), hf_model(model_file.hparams, model_file.tensors)


def hf_text(reference, prompt, n_tokens, **options):
    """Hugging Face's generate on one prompt, ending at <|endoftext|> as picogpt does: the text of its new tokens."""
    new = hf_new_tokens(reference, encode(prompt), n_tokens, eos_token_id=EOT, **options)
    return decode(new[:-1] if new[-1:] == [EOT] else new)


@pytest.mark.parametrize("flags, options", [
    (["--min-new-tokens", "15"], dict(min_new_tokens=15)),
    (["--min-new-tokens", "12", "--no-repeat-ngram-size", "2"], dict(min_new_tokens=12, no_repeat_ngram_size=2)),
    (["--no-repeat-ngram-size", "1", "--repetition-penalty", "1.3"], dict(no_repeat_ngram_size=1,
                                                                         repetition_penalty=1.3)),
    (["--num-beams", "3", "--min-new-tokens", "12", "--no-repeat-ngram-size", "2"],
     dict(num_beams=3, min_new_tokens=12, no_repeat_ngram_size=2)),
])
def test_cli_rules_give_hugging_faces_text(demo_pair, capsys, flags, options):
    model, reference = demo_pair
    prompt = "The optional argument"
    status, plain, _ = run_cli(capsys, prompt, "-n", "20", "--model", "demo")
    status, out, err = run_cli(capsys, prompt, "-n", "20", "--model", "demo", *flags)
    assert status == 0 and err == "" and out == hf_text(reference, prompt, 20, **options) + "\n"
    assert out != plain  # (the plain text ends after 9 tokens: every case here changes it)
    if "min_new_tokens" in options:
        assert len(encode(out[:-1])) >= options["min_new_tokens"] > len(encode(plain[:-1]))
    if options.get("num_beams", 1) == 1:  # the library's own call gives the same
        assert complete(model, prompt, 20, **options) + "\n" == out


def test_cli_min_new_tokens_needs_an_end_token(model_path, capsys):
    status, out, err = run_cli(capsys, "Hi", "--model", str(model_path), "--min-new-tokens", "3", "--ignore-eot")
    assert status == 2 and out == "" and "min-new-tokens holds off the end token" in err and err.count("\n") == 1
    status, _, err = run_cli(capsys, "Hi", "--model", str(model_path), "--min-new-tokens", "3", "--ignore-eot",
                             "--num-beams", "2")
    assert status == 2 and "min-new-tokens holds off the end token" in err


def test_cli_extreme_numbers_compute_their_limit(capsys):
    """--temperature 1e-40 once made NaN logits and token 50257: now it is greedy's limit, and the other
    extremes give a text (one line out, nothing on stderr)."""
    prompt = "Return a new list"
    status, greedy, _ = run_cli(capsys, prompt, "-n", "12", "--model", "demo")
    assert status == 0 and run_cli(capsys, prompt, "-n", "12", "--model", "demo", "--temperature", "1e-40",
                                   "--seed", "1") == (0, greedy, "")
    for flags in (["--repetition-penalty", "1e-40"], ["--repetition-penalty", "1e300", "--temperature", "1e300"],
                  ["--num-beams", "2", "--repetition-penalty", "1e-40"]):
        status, out, err = run_cli(capsys, prompt, "-n", "12", "--model", "demo", "--seed", "2", *flags) \
            if "--temperature" in flags else run_cli(capsys, prompt, "-n", "12", "--model", "demo", *flags)
        assert status == 0 and err == "" and out.endswith("\n") and "\ufffd" not in out, (flags, err)


def test_cli_a_line_of_a_prompts_file_too_long_for_the_context_is_named(model_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\n" + " word" * 70 + "\nBye\n", encoding="utf-8")  # line 3: 70 tokens, n_ctx 64
    for beams in ([], ["--num-beams", "2"]):
        status, out, err = run_cli(capsys, "--prompts-file", str(prompts), "-n", "5", "--model", str(model_path),
                                   *beams)
        assert status == 1 and out == "" and err.count("\n") == 1
        assert f"line 3 of {prompts}: the prompt (70 tokens) plus 5 new tokens exceed the model's context" in err
