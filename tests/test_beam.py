"""Beam search (picogpt.beam) against Hugging Face's own `generate` on the same random weights: the
same sequences, and the same scores within 1e-4, for the options Hugging Face's beam search takes."""

import numpy as np
import pytest
import torch

from hf_reference import hf_model, random_tensors, write_model_dat
from picogpt import cli
from picogpt.beam import beam_search
from picogpt.generate import generate
from picogpt.model import GPT2
from picogpt.tokenizer import decode, encode

HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2, layer_norm_epsilon=1e-5)
PROMPTS = [encode("The quick brown fox"), encode("Hello"), encode("Alan Turing theorized that computers")]
N_TOKENS = 12


@pytest.fixture(scope="module")
def models():
    tensors = random_tensors(HPARAMS, seed=11)
    return GPT2(HPARAMS, tensors), hf_model(HPARAMS, tensors)


@pytest.fixture(scope="module")
def early_eos(models):
    """A token the model really produces within a few steps (so that beams end early), not at once."""
    model, _ = models
    return list(generate(model, PROMPTS[0], 6, stop_at_eot=False))[3]


def hf_beams(reference, prompts, **options):
    """Hugging Face's generate on left-padded prompts (pad 0, with the attention mask): the new tokens of
    each returned sequence (padding after an early end dropped), and the output object."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=N_TOKENS,
                                 return_dict_in_generate=True, output_scores=True, **options)
    return out.sequences[:, width:].tolist(), out


CASES = {
    "2 beams": dict(num_beams=2),
    "4 beams": dict(num_beams=4),
    "length penalty 0.5": dict(num_beams=4, length_penalty=0.5),
    "length penalty 2": dict(num_beams=4, length_penalty=2.0),
    "early stopping": dict(num_beams=4, early_stopping=True),
    "early stopping never": dict(num_beams=3, early_stopping="never", length_penalty=2.0),
    "early stopping never, penalty 0": dict(num_beams=3, early_stopping="never", length_penalty=0.0),
    "return 4 of 4": dict(num_beams=4, num_return_sequences=4),
    "return 2 of 3, penalty 0.5": dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
    "min new tokens": dict(num_beams=3, min_new_tokens=8),
    "no repeat 2-grams": dict(num_beams=3, no_repeat_ngram_size=2),
    "no repeat 3-grams": dict(num_beams=2, no_repeat_ngram_size=3),
    "repetition penalty 1.3": dict(num_beams=3, repetition_penalty=1.3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eos", ["reached early", "never reached"])
def test_beam_search_equals_hugging_face(models, early_eos, case, eos):
    model, reference = models
    options = CASES[case]
    eos_id = early_eos if eos == "reached early" else 50256  # the model never gets to <|endoftext|> here
    expected, out = hf_beams(reference, PROMPTS, eos_token_id=eos_id, **options)
    # Hugging Face's n-gram ban sees the left padding of the shorter prompts: so does this comparison's
    ours = beam_search(model, PROMPTS, N_TOKENS, eos_token_id=eos_id, ngrams_count_padding=True, output_scores=True,
                       **options)
    flat = [seq for per_prompt in ours.sequences for seq in per_prompt]
    fill = 0 or eos_id  # Hugging Face fills after an end with `pad_token_id or eos_token_id`: pad 0 is falsy
    assert [seq + [fill] * (len(expected[0]) - len(seq)) for seq in flat] == expected
    if eos == "reached early" and case == "length penalty 0.5":
        assert any(seq and seq[-1] == eos_id for seq in flat)  # the EOS really ends beams here
    if case == "min new tokens":
        assert all(eos_id not in seq[:8] for seq in flat)  # and is held off for 8 tokens
    np.testing.assert_allclose(ours.scores.reshape(-1), out.sequences_scores.numpy(), atol=1e-4)
    assert len(ours.step_scores) == len(out.scores)
    for mine, theirs in zip(ours.step_scores, out.scores):
        theirs = theirs.numpy()
        assert np.array_equal(np.isneginf(mine), np.isneginf(theirs))
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(mine[finite], theirs[finite], atol=1e-4)


def test_bad_beam_options_are_refused(models):
    model, _ = models
    with pytest.raises(Exception, match="num_return_sequences must be from 1 to num_beams"):
        beam_search(model, PROMPTS, 3, num_beams=2, num_return_sequences=3)
    with pytest.raises(Exception, match="early_stopping must be"):
        beam_search(model, PROMPTS, 3, num_beams=2, early_stopping="sometimes")
    with pytest.raises(Exception, match="exceed the model's context of 64 tokens; shorten the prompt or ask"):
        beam_search(model, PROMPTS, 60, num_beams=2)


def test_cli_num_beams(tmp_path, models, capsys):
    model, reference = models
    path = write_model_dat(tmp_path / "model.dat", HPARAMS, random_tensors(HPARAMS, seed=11))
    prompt = "The quick brown fox"
    assert cli.main([prompt, "-n", str(N_TOKENS), "--model", str(path), "--num-beams", "4", "--length-penalty", "0.5",
                     "--ignore-eot"]) == 0
    expected, _ = hf_beams(reference, [encode(prompt)], num_beams=4, length_penalty=0.5, eos_token_id=None)
    assert capsys.readouterr().out == decode(expected[0]) + "\n"
    with pytest.raises(SystemExit):
        cli.main([prompt, "--model", str(path), "--num-beams", "0"])
    assert cli.main([prompt, "--model", str(path), "--num-beams", "2", "--temperature", "0.8"]) == 2
    assert "--num-beams searches" in capsys.readouterr().err
