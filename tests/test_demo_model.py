"""The demo model shipped in data/demo/ (trained by tools/demo_model/, `python -m tools.demo_model`).

Its real trained weights against Hugging Face's GPT2LMHeadModel (logits at every position within 1e-4,
20 greedy tokens identical, with and without picogpt's cache), its greedy output pinned as text through
the command line, and a model card whose numbers are the training log's, whose commands the trainer
takes, and whose links, like the history's, lead to files.
"""

import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_reference import hf_model
from picogpt.cli import main
from picogpt.generate import generate
from picogpt.store import load
from picogpt.modelfile import open_model_file
from picogpt.reference import hf_greedy
from picogpt.tokenizer import decode, encode

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo"
MODEL, LOG, CARD = DEMO / "model.dat", DEMO / "train_log.txt", DEMO / "README.md"
HISTORY = REPO / "docs" / "demo-model-history.md"  # the runs tried and not shipped, and the models before
HPARAMS = dict(n_vocab=50257, n_ctx=256, n_embd=192, n_head=6, n_layer=8, layer_norm_epsilon=1e-5)
LOGITS_TOLERANCE = 1e-4
# Docstring-like text, then words the corpus hardly has, so rarely trained embeddings are exercised too.
PARITY_PROMPT = ("Return a list of the lines in the string, breaking at line boundaries. "
                 "Alan Turing theorized that computers would one day become very powerful")
GOLDEN_PROMPT = "The optional argument"  # the prompt of `make run` (see the model card for why this one)
# The shipped model's greedy 20 tokens (the same as Hugging Face's).
GOLDEN_TEXT = " is the same as for the first argument."  # then <|endoftext|>


@pytest.fixture(scope="module")
def demo():
    model_file = open_model_file(MODEL)
    model_file.verify()
    model = load(str(MODEL), bf16="widen", quiet=True)  # bfloat16 matrices, multiplied in float32
    return model, hf_model(model_file.hparams, model_file.tensors)


def test_demo_model_is_a_small_gpt2_under_30_mb():
    assert MODEL.stat().st_size <= 30_000_000
    model_file = open_model_file(MODEL)
    assert model_file.hparams == HPARAMS and model_file.weight_dtype == "bf16"  # matrices in bfloat16
    assert sum(f.stat().st_size for f in DEMO.parent.rglob("*") if f.is_file()) < 35_000_000  # all of data/


def test_logits_at_every_position_match_hugging_face(demo):
    model, reference = demo
    ids = encode(PARITY_PROMPT)
    ours = model(ids, all_logits=True)
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == theirs.shape == (len(ids), 50257)
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_TOLERANCE, rtol=0)


@pytest.mark.parametrize("prompt", ["Return the number of", "This module provides", "The default value is"])
def test_greedy_tokens_match_hugging_face_with_and_without_cache(demo, prompt):
    model, reference = demo
    ids = encode(prompt)
    # 20 tokens whatever they are: the model ends some docstrings, and Hugging Face runs on past <|endoftext|> too.
    cached = list(generate(model, ids, 20, stop_at_eot=False))
    assert len(cached) == 20
    assert cached == list(generate(model, ids, 20, stop_at_eot=False, use_cache=False))
    assert cached == hf_greedy(reference, ids, 20)


def test_greedy_text_is_pinned(demo, capsys):
    """The exact continuation the shipped model gives, through the command line the model card shows."""
    model, _ = demo
    assert decode(generate(model, encode(GOLDEN_PROMPT), 20)) == GOLDEN_TEXT
    assert main([GOLDEN_PROMPT, "-n", "20", "--model", str(MODEL)]) == 0
    assert capsys.readouterr().out == GOLDEN_TEXT + "\n"


def log_numbers():
    """(train loss, val loss) of the log's final line and of the last evaluation of the step it names (the
    last one, or the one --keep chose), and the corpus sizes."""
    text = LOG.read_text(encoding="utf-8")
    final = re.findall(r"^final: step (\d+), train loss ([\d.]+), val loss ([\d.]+)", text, re.M)
    assert final, f"{LOG} lacks its final line"
    final_step, *final_losses = final[-1]
    before = text.rsplit("\nfinal: ", 1)[0]
    steps = re.findall(rf"^step +{final_step} \|.*\| train loss ([\d.]+) \| val loss ([\d.]+) \|", before, re.M)
    corpus = re.search(r"split: train \d+ documents, (\d+) tokens; held out \d+ documents, (\d+) tokens", text)
    assert steps and corpus, f"{LOG} lacks the evaluation of step {final_step} or its corpus line"
    return tuple(final_losses), steps[-1], (int(corpus[1]), int(corpus[2]))


def test_model_card_numbers_are_the_training_logs():
    final, last_step, (train_tokens, val_tokens) = log_numbers()
    assert final == last_step  # the final line reports the evaluation whose weights were written
    card = CARD.read_text(encoding="utf-8")
    card_train = re.search(r"final training loss\D*(\d+\.\d+)", card, re.I)
    card_val = re.search(r"final validation loss\D*(\d+\.\d+)", card, re.I)
    assert card_train and card_val, f"{CARD} does not state the final training and validation losses"
    assert (card_train[1], card_val[1]) == final
    assert f"{train_tokens:,}" in card and f"{val_tokens:,}" in card


def test_model_card_quotes_the_held_out_perplexities_and_samples():
    """The old and new model's perplexity on the same held-out text, and the greedy samples, as logged
    after the log's last final line (a run continued from a checkpoint logs the earlier model's too)."""
    text = LOG.read_text(encoding="utf-8").rsplit("\nfinal: ", 1)[1]
    card = CARD.read_text(encoding="utf-8")
    perplexities = re.findall(r"^held-out perplexity \(picogpt, [^)]*\): ([\d.]+) for (\S+)", text, re.M)
    assert len(perplexities) == 2, f"{LOG} lacks the held-out perplexity of the new and the old model"
    for value, _ in perplexities:
        assert value in card
    samples = re.findall(r"^sample: ('.*') -> ('.*?')(?: \((?:repeats .*?)?(?:; )?(?:no complete sentence)?\))?$",
                         text, re.M)
    assert len(samples) >= 13
    for prompt, continuation in samples:
        assert f"{prompt} -> {continuation}" in card


def test_model_card_stages_are_the_training_logs():
    """Each row of the loss table of stage 1 is an evaluation in the log, and each run of stage 2 its kept
    evaluation: the final line, the perplexity of the file that line wrote, and the loops at that step."""
    text, card = LOG.read_text(encoding="utf-8"), CARD.read_text(encoding="utf-8")
    losses = re.findall(r"^\| (\d+) \| (\d\.\d{4}) \| (\d\.\d{4}) \|$", card, re.M)
    assert len(losses) == 17
    for step, train, val in losses:
        assert re.search(rf"^step +{step} \|.*\| train loss {train} \| val loss {val} \|", text, re.M), step
    runs = re.findall(r"^\| \d\. [^|]+ \| `[^|]+` \| (\d+) \((\d+)\) \| (\d+) s \| (\d\.\d{4}) \| (\d\.\d{4}) \| "
                      r"([\d.]+) \| (\d+) \|$", card, re.M)
    assert len(runs) == 6
    for last, kept, seconds, train, val, perplexity, loops in runs:
        assert re.search(rf"^step +{last} \|.*\| loops \d+/96 \|", text, re.M), last
        evaluation = rf"^step +{kept} \|.*\| train loss {train} \| val loss {val} \| loops {loops}/96 \|"
        assert re.search(evaluation, text, re.M), (kept, train)
        final = (rf"^final: step {kept}, train loss {train}, val loss {val}, training {seconds} s; wrote (\S+) .*\n"
                 rf"held-out perplexity \(picogpt, [^)]*\): {perplexity} for \1$")
        assert re.search(final, text, re.M), (kept, train)


def test_model_card_commands_are_the_trainers():
    """The commands under "Reproducing" are accepted by the trainer as written (parsed, not run)."""
    sys.path.insert(0, str(REPO))
    from tools.demo_model.__main__ import parser

    card = CARD.read_text(encoding="utf-8").replace("\\\n", " ")
    commands = re.findall(r"^    \.venv/bin/python -m tools\.demo_model (.*)$", card, re.M)
    assert len(commands) == 9  # stage 1 in two, the six runs of stage 2, the judge
    for command in commands:
        parser().parse_args(shlex.split(command))


@pytest.mark.parametrize("page", [CARD, HISTORY])
def test_the_card_and_the_historys_links_lead_to_files(page):
    links = re.findall(r"\]\(([^)#:]+)\)", page.read_text(encoding="utf-8"))
    assert links
    for link in links:
        assert (page.parent / link).exists(), link
