"""The demo model's trainer (tools/demo_model/), in parts: the HTML documentation turned into documents,
the split by document, the learning-rate schedule that decays on the held-out loss, checkpoints that
resume to exactly where training was, the losses of the sequence-level steps computed by hand, the
prefixes they continue, the count of greedy continuations that loop, and the command line's errors."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from picogpt.tokenizer import EOT, N_VOCAB, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tools.demo_model, as `python -m tools.demo_model` finds it from the checkout
from tools.demo_model import corpus, judging, training  # noqa: E402
from tools.demo_model import prefixes as prefix_kinds  # noqa: E402
from tools.demo_model import sequence_level as steps  # noqa: E402
from tools.demo_model.__main__ import main  # noqa: E402

DEMO_MODEL = REPO / "data" / "demo" / "model.dat"

PAGE = """<html><head><title>json — JSON encoder and decoder</title></head><body>
<div class="related" role="navigation"><ul><li><a href="index.html">Python documentation</a></li></ul></div>
<div class="body" role="main">
<section id="module-json"><h1>json — JSON encoder<a class="headerlink" href="#x">¶</a></h1>
<p><strong>Source code:</strong> Lib/json/__init__.py</p>
<p>JSON is a lightweight data
interchange format &amp; more.</p>
<div class="highlight-python3"><div class="highlight"><pre>&gt;&gt;&gt; import json</pre></div></div>
<div class="admonition warning"><p class="admonition-title">Warning</p><p>Be cautious with untrusted data.</p></div>
<section id="basic-usage"><h2>Basic Usage</h2>
<dl class="py function"><dt class="sig"><span>json.dump</span>(obj, fp)</dt>
<dd><p>Serialize <em>obj</em> as a JSON formatted stream.</p>
<ul><li><p>The first item.</p></li><li>A bare item<br/>over two lines.</li></ul>
<table><tr><td>a table cell</td></tr></table>
<section id="deeper"><h3>Deeper</h3><p>Still the Basic Usage document.</p></section>
</dd></dl></section>
<section id="decoders"><h2>Decoders</h2><p>A second document.</p></section>
</section></div>
<div class="sphinxsidebar"><p>Not the body.</p></div>
</body></html>"""


def test_html_becomes_documents_of_paragraph_lines():
    page = corpus.DocsPage()
    page.feed(PAGE)
    page.close()
    documents = ["\n".join(d) for d in page.documents if d]
    assert documents == [
        "json — JSON encoder\nJSON is a lightweight data interchange format & more.\nBe cautious with untrusted data.",
        "Basic Usage\nSerialize obj as a JSON formatted stream.\nThe first item.\nA bare item over two lines.\n"
        "Deeper\nStill the Basic Usage document.",
        "Decoders\nA second document.",
    ]


def test_documents_are_held_out_by_their_text():
    docs = [f"Document number {i} says something." for i in range(2000)]
    held_out = [d for d in docs if corpus.is_held_out(d)]
    assert 0.03 < len(held_out) / len(docs) < 0.07  # about 1 in VAL_EVERY = 20
    assert held_out == [d for d in reversed(docs) if corpus.is_held_out(d)][::-1]  # order-free: by text alone


def test_schedule_warms_up_holds_and_decays_on_a_plateau():
    schedule = training.Schedule(max_steps=100_000)
    assert schedule.lr(0) == pytest.approx(training.LR / training.WARMUP)
    assert schedule.lr(training.WARMUP) == training.LR
    for step, loss in [(250, 6.0), (500, 5.5), (750, 5.2), (1000, 5.1), (1250, 5.095), (1500, 5.093)]:
        assert schedule.evaluated(step, loss) is None
    why = schedule.evaluated(1750, 5.092)  # 5.1 -> 5.092 over the last three evaluations: under PLATEAU
    assert why and "improved by less than" in why
    assert (schedule.decay_start, schedule.decay_steps) == (1750, 350)
    assert schedule.lr(1749) == training.LR and schedule.lr(2099) == pytest.approx(training.MIN_LR)
    assert schedule.end == 2100


def test_schedule_decays_in_time_for_max_steps():
    schedule = training.Schedule(max_steps=3000)
    assert schedule.evaluated(2250, 5.0) is None
    assert "--max-steps 3000" in schedule.evaluated(2500, 4.0)
    assert schedule.end == 3000


def test_a_checkpoint_resumes_exactly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def fresh():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2), torch.Generator().manual_seed(1)

    def steps(model, optimizer, batches, n):
        for _ in range(n):
            x = torch.randint(64, (2, 9), generator=batches)
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    straight = fresh()
    steps(*straight, 5)
    first = fresh()
    steps(*first, 3)
    training.save_checkpoint(tmp_path / "c.safetensors", *first, {"step": 3})
    second = fresh()
    assert training.load_checkpoint(tmp_path / "c.safetensors", *second) == {"step": 3}
    steps(*second, 2)
    for a, b in zip(straight[0].parameters(), second[0].parameters()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.partial"))


def test_greedy_loops_counts_a_repeated_phrase_within_30_tokens_and_within_make_runs_20_early_ends_and_distinct():
    # The shipped model: "Run the examples in the Python source.\nThe first line is a single line. The second line
    # is a single line." repeats within 20 tokens and ends at <|endoftext|>; "Format function arguments and return a
    # list of strings.\nThe format is used for format strings, which are used for format strings." after 20;
    # "Remove an element. If the element is empty, the element will be returned." ends after a sentence;
    # "Deprecated, use `source'." ends at once, with no sentence. The first prompt given twice: 5
    # continuations, 4 of them distinct.
    prompts = ["Run the examples in", "Format function arguments and", "Remove an element. If",
               "Deprecated, use `source'.", "Run the examples in"]
    assert judging.greedy_loops(DEMO_MODEL, prompts, load_tokenizer()) == (3, 2, 5, 1, 4)


class UniformReference:
    """A reference model that gives every token the same logit: p = 1/50257 < RARE_P for each."""
    hparams = {"n_ctx": 256}

    def __call__(self, ids, all_logits=False):
        return np.zeros((len(ids), 50257), dtype=np.float32)


def test_judging_against_a_reference_counts_its_unlikely_tokens():
    import picogpt
    prompts = ["Run the examples in", "Remove an element. If"]  # loops and ends early; ends early
    encoding = load_tokenizer()
    *loops, rare, nll = judging.greedy_loops(DEMO_MODEL, prompts, encoding, UniformReference())
    assert loops == [1, 1, 2, 0, 2] and rare == 2 and nll == pytest.approx(math.log(50257))
    *_, rare, nll = judging.greedy_loops(DEMO_MODEL, prompts, encoding, picogpt.load(str(DEMO_MODEL), quiet=True))
    assert rare == 0 and 0 < nll < 5  # its own greedy choices are its likeliest


def test_judge_names_a_missing_model_file(tmp_path):  # through `python -m tools.demo_model`, as the card runs it
    done = subprocess.run([sys.executable, "-m", "tools.demo_model", "--judge", str(DEMO_MODEL),
                           str(tmp_path / "none.dat")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    missing = tmp_path / "none.dat"
    assert done.stderr == f"error: no model file {missing}; name a model.dat (such as data/demo/model.dat)\n"


def test_repeating_positions_are_the_tokens_of_a_phrase_seen_before():
    ids = [1, 2, 3, 4, 9, 1, 2, 3, 4, 5]
    assert judging.repeating_positions(ids, start=0) == [5, 6, 7, 8]
    assert judging.repeating_positions(ids, start=7) == [7, 8]  # only the continuation's part counts
    assert judging.repeating_positions(ids, start=9) == []
    assert judging.repeating_positions([7, 7, 7, 7, 7], start=0) == [1, 2, 3, 4]


def a_model_that_loops():
    """A one-layer GPT-2 over 16 tokens trained on 0 1 2 3 4 0 1 2 3 4 ..., its optimizer, two prefixes of that,
    its greedy continuations of them, and the (row, position) of each continuation token that repeats a phrase."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    n_seq = prefix_kinds.UL_PREFIX + steps.UL_CONTINUATION
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=n_seq, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=None, eos_token_id=None)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    periodic = torch.arange(n_seq).remainder(5).repeat(4, 1)
    for _ in range(40):
        loss = training.lm_loss(model, periodic, bf16=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prefixes = periodic[:2, :prefix_kinds.UL_PREFIX]
    seq = torch.cat([prefixes, steps.greedy_torch(model, prefixes, steps.UL_CONTINUATION, False)], 1)
    marked = [(row, i - 1) for row, ids in enumerate(seq.tolist())
              for i in judging.repeating_positions(ids, prefix_kinds.UL_PREFIX)]
    assert len(marked) > steps.UL_CONTINUATION  # it does loop
    return model, optimizer, prefixes, seq, marked


def loop_probability(model, seq, marked):
    """The mean probability the model gives the tokens of its loop (the continuation it wrote first)."""
    with torch.no_grad():
        p = torch.softmax(model.eval()(seq[:, :-1]).logits, -1).gather(-1, seq[:, 1:, None])[..., 0]
    model.train()
    return torch.stack([p[row, i] for row, i in marked]).mean().item()


def test_unlikelihood_steps_make_a_models_own_loop_less_likely():
    model, optimizer, prefixes, seq, marked = a_model_that_loops()
    before = loop_probability(model, seq, marked)
    for _ in range(5):
        loss = steps.unlikelihood_loss(model, prefixes, bf16=False)
        assert loss.item() > 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 0.9 and loop_probability(model, seq, marked) < 0.5 * before


def hinge_by_hand(logits, seq, positions, margin=1.0):
    """The margin loss computed one position at a time: at each (row, i), max(0, margin + the logit of the
    next token seq[row, i + 1] - the best other logit), averaged."""
    hinge = []
    for row, i in positions:
        token = seq[row, i + 1].item()
        best_other = torch.cat([logits[row, i, :token], logits[row, i, token + 1:]]).max()
        hinge.append(max(0.0, margin + (logits[row, i, token] - best_other).item()))
    return torch.tensor(sum(hinge) / len(hinge))


def test_margin_unlikelihood_is_a_hinge_that_breaks_the_loop():
    model, optimizer, prefixes, seq, marked = a_model_that_loops()
    for module in model.modules():  # no dropout, so that the loss sees the logits computed here
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():  # the hinge by hand, over the loop's tokens
        hinge = hinge_by_hand(model(seq[:, :-1]).logits, seq, marked)
        loss = steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0)
    torch.testing.assert_close(loss, hinge)
    before = loop_probability(model, seq, marked)
    for _ in range(15):
        loss = steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 0.9 and loop_probability(model, seq, marked) < 0.5 * before
    with torch.no_grad():  # and greedy no longer writes the loop
        chosen = model.eval()(seq[:, :-1]).logits.argmax(-1)
    assert not all(chosen[row, i] == seq[row, i + 1] for row, i in marked)
    # a repeat already `margin` below the model's next choice gives nothing to push
    assert steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=-1e9).item() == 0


def an_untrained_model():
    """A one-layer GPT-2 over 64 tokens, untrained and without dropout, and two random prefixes: its greedy
    continuations repeat some phrases, not all."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=prefix_kinds.UL_PREFIX + steps.UL_CONTINUATION,
                                       n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))
    return model, torch.randint(64, (2, prefix_kinds.UL_PREFIX))


def a_moved_copy(model):
    """A frozen copy of the model with every weight moved at random: a reference whose likeliest tokens and
    probabilities are not the model's."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    for param in reference.parameters():
        param.data.add_(0.5 * torch.randn_like(param))
    return reference


def test_a_margin_among_the_references_likeliest_tokens_takes_its_other_token_from_them():
    model, prefixes = an_untrained_model()
    seq, repeats, _ = steps.own_continuations(model, prefixes)
    reference = a_moved_copy(model)
    with torch.no_grad():  # the hinge by hand: the other token is the best of the reference's 3 likeliest
        logits, reference_logits = model(seq[:, :-1]).logits, reference(seq[:, :-1]).logits
        hinge = []
        for row, i in repeats.nonzero().tolist():
            repeat = seq[row, i + 1].item()
            candidates = [v for v in reference_logits[row, i].topk(3).indices.tolist() if v != repeat]
            hinge.append(max(0.0, 1.0 + (logits[row, i, repeat] - logits[row, i, candidates].max()).item()))
        among = steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0, reference=reference,
                                                 among=3)
        torch.testing.assert_close(among, torch.tensor(sum(hinge) / len(hinge)))
        # among the whole vocabulary it is the plain hinge; among fewer, the other token is no better
        plain = steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0)
        everything = steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0, reference=reference,
                                                      among=64)
    torch.testing.assert_close(everything, plain)
    assert among > plain
    with pytest.raises(ValueError, match="needs that reference"):  # no reference to take the tokens from
        steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0, among=3)


def test_a_margin_on_nonsense_pushes_down_the_tokens_the_reference_finds_unlikely_too():
    model, prefixes = an_untrained_model()
    seq, repeats, others = steps.own_continuations(model, prefixes)
    reference = a_moved_copy(model)
    with torch.no_grad():
        logits, reference_p = model(seq[:, :-1]).logits, torch.softmax(reference(seq[:, :-1]).logits, -1)
        others_p = reference_p.gather(-1, seq[:, 1:, None])[..., 0][others]  # the continuation's other tokens'
        threshold = others_p.sort().values[len(others_p) // 2].item()  # about half of them below it
        pushed = [(row, i) for row, i in (repeats | others).nonzero().tolist()  # the repeating tokens and the
                  if repeats[row, i] or reference_p[row, i, seq[row, i + 1]] < threshold]  # others below it
        loss = steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0, reference=reference,
                                                nonsense=threshold)
        torch.testing.assert_close(loss, hinge_by_hand(logits, seq, pushed))
        assert int(repeats.sum()) < len(pushed) < int((repeats | others).sum())  # some of the others were pushed
        none_rare = steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0, reference=reference,
                                                     nonsense=1e-30)
        plain = steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0)
        torch.testing.assert_close(none_rare, plain)
    with pytest.raises(ValueError, match="needs that reference"):
        steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0, nonsense=1e-4)


@pytest.mark.parametrize("text, complete", [
    (" items in the queue.", True), ("\nThe following functions are:", False), ("", False),
    (" the version 3.3:", False), (' as "spam!"\nThe', True), (" (see above.)", True), (" Why? Because", True),
])
def test_a_sentence_is_complete_at_a_full_stop_or_mark_before_a_space_or_the_end(text, complete):
    assert judging.holds_a_sentence(text) == complete


# An <|endoftext|> for the untrained models below: a token the moved copy samples now and then, after some
# continuations that write a four-token phrase twice (which best-of must pass over).
EOT_SAMPLED = 28


class Text:
    """A stand-in tokenizer whose every decoded text is the same."""

    def __init__(self, text):
        self.text = text

    def decode(self, ids):
        return self.text


def test_an_early_end_is_pushed_down_with_the_repeating_tokens(monkeypatch):
    model, prefixes = an_untrained_model()
    n_prefix = prefixes.shape[1]
    seq, repeats, _ = steps.own_continuations(model, prefixes)
    monkeypatch.setattr(steps, "EOT", seq[0, n_prefix].item())  # row 0's first new token ends it at once
    seq, repeats, others = steps.own_continuations(model, prefixes)  # the same greedy text, ended at it
    _, unfinished, _ = steps.own_continuations(model, prefixes, Text(" the version 3.3:"))
    _, finished, _ = steps.own_continuations(model, prefixes, Text(" Done."))
    assert torch.equal(finished, repeats)  # a continuation that completes a sentence may end
    expected = repeats.clone()  # and one that does not has its <|endoftext|> pushed down: the target at eot - 1
    for row, ids in enumerate(seq[:, n_prefix:].tolist()):
        if steps.EOT in ids:
            expected[row, n_prefix + ids.index(steps.EOT) - 1] = True
    assert expected[0, n_prefix - 1] and torch.equal(unfinished, expected)
    with torch.no_grad():  # and the hinge takes it as it takes a repeating token
        hinge = hinge_by_hand(model(seq[:, :-1]).logits, seq, unfinished.nonzero().tolist())
        loss = steps.margin_unlikelihood_loss(model, prefixes, bf16=False, margin=1.0,
                                                encoding=Text(" the version 3.3:"))
    torch.testing.assert_close(loss, hinge)


def best_of_candidates(reference, prefixes, k, batches):
    """best_sampled_continuations' samples drawn again from a copy of its generator, with the reference's
    mean log-probability of each one's continuation and <|endoftext|>, by hand, after the prefix and after
    <|endoftext|> alone: {row: [(after the prefix, alone, ids)]} over the samples that end without writing
    a four-token phrase a second time."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=batches))
    with torch.random.fork_rng(devices=[]):  # (and leave the global generator as it was for other tests)
        torch.manual_seed(seed)
        samples = reference.generate(prefixes.repeat_interleave(k, 0), do_sample=True, top_k=steps.BEST_OF_TOP_K,
                                     temperature=steps.BEST_OF_TEMPERATURE, max_new_tokens=steps.UL_CONTINUATION,
                                     eos_token_id=steps.EOT, pad_token_id=steps.EOT,
                                     attention_mask=torch.ones_like(prefixes).repeat_interleave(k, 0))
    n_prefix, candidates = prefixes.shape[1], {}
    for j, ids in enumerate(samples.tolist()):
        if steps.EOT in ids[n_prefix:]:
            ids = ids[:ids.index(steps.EOT, n_prefix) + 1]
            grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 4)]  # the <|endoftext|> left out
            if any(grams[i] in grams[:i] for i in range(n_prefix - 3, len(grams))):
                continue
            alone = [steps.EOT] + ids[n_prefix:]
            with torch.no_grad():
                log_probs = torch.log_softmax(reference(torch.tensor([ids[:-1]])).logits[0], -1)
                alone_log_probs = torch.log_softmax(reference(torch.tensor([alone[:-1]])).logits[0], -1)
            after_prefix = np.mean([log_probs[i - 1, ids[i]].item() for i in range(n_prefix, len(ids))])
            by_itself = np.mean([alone_log_probs[i - 1, alone[i]].item() for i in range(1, len(alone))])
            candidates.setdefault(j // k, []).append((after_prefix, by_itself, ids))
    return candidates


def cross_entropy_by_hand(model, seq, targets):
    """The model's mean negative log-probability of the next tokens of seq [m, n] that targets [m, n - 1]
    marks, one position at a time."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(seq[:, :-1]).logits, -1)
    return -np.mean([log_probs[row, i, seq[row, i + 1]].item() for row, i in targets.nonzero().tolist()])


def test_best_of_k_takes_the_sample_the_reference_scores_best_that_ends_after_a_sentence(monkeypatch):
    model, prefixes = an_untrained_model()
    monkeypatch.setattr(steps, "EOT", EOT_SAMPLED)
    monkeypatch.setattr(steps, "BEST_OF_GENERIC", 1.0)  # where, for these samples, it changes which is best
    reference = a_moved_copy(model)
    batches = torch.Generator().manual_seed(1)
    again = torch.Generator().set_state(batches.get_state())
    seq, targets = steps.best_sampled_continuations(reference, prefixes, 8, Text(" Done."), batches, bf16=False)
    candidates = best_of_candidates(reference, prefixes, 8, again)
    assert len(candidates) == len(seq) == 2
    n_prefix, likeliest = prefixes.shape[1], []
    for index, (row, chosen) in enumerate(zip(sorted(candidates), seq.tolist())):
        _, best = max((after_prefix - by_itself, ids) for after_prefix, by_itself, ids in candidates[row])
        likeliest.append(max(candidates[row])[2] == best)  # whether likelihood alone would take it too
        end = len(best) - 1  # where its <|endoftext|> is
        assert chosen[:end + 1] == best and set(chosen[end:]) == {steps.EOT}  # then padding
        assert targets[index].nonzero().flatten().tolist() == list(range(n_prefix - 1, end))  # and it is trained
    assert not all(likeliest)
    # a continuation that ends before completing a sentence is never taken
    none, none_targets = steps.best_sampled_continuations(reference, prefixes, 4, Text(" the version 3.3:"),
                                                          torch.Generator().manual_seed(1), bf16=False)
    assert len(none) == 0 and not none_targets.any()
    loss = steps.best_sample_loss(model, reference, prefixes, False, 4, Text(" the version 3.3:"),
                                  torch.Generator().manual_seed(1))
    assert loss.item() == 0 and loss.requires_grad
    # nor is one that holds a token the reference gives less than `nonsense`: all do under 1.0, none under 1e-30
    everything_rare = steps.best_sampled_continuations(reference, prefixes, 8, Text(" Done."),
                                                       torch.Generator().manual_seed(1), bf16=False, nonsense=1.0)
    nothing_rare = steps.best_sampled_continuations(reference, prefixes, 8, Text(" Done."),
                                                    torch.Generator().manual_seed(1), bf16=False, nonsense=1e-30)
    assert len(everything_rare[0]) == 0 and torch.equal(nothing_rare[0], seq)


def test_best_of_k_is_the_models_cross_entropy_on_the_references_samples_and_raises_them(monkeypatch):
    model, prefixes = an_untrained_model()
    monkeypatch.setattr(steps, "EOT", EOT_SAMPLED)
    reference = a_moved_copy(model)
    seq, targets = steps.best_sampled_continuations(reference, prefixes, 4, Text(" Done."),
                                                    torch.Generator().manual_seed(1), bf16=False)
    assert len(seq) == 2
    loss = steps.best_sample_loss(model, reference, prefixes, False, 4, Text(" Done."),
                                  torch.Generator().manual_seed(1))
    by_hand = cross_entropy_by_hand(model, seq, targets)
    torch.testing.assert_close(loss, torch.tensor(by_hand, dtype=torch.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        steps.best_sample_loss(model, reference, prefixes, False, 4, Text(" Done."),
                               torch.Generator().manual_seed(1)).backward()
        optimizer.step()
    after = cross_entropy_by_hand(model, seq, targets)
    assert after < by_hand - 0.5
    # the samples are still the reference's, not those of the model it has become
    loss = steps.best_sample_loss(model, reference, prefixes, False, 4, Text(" Done."),
                                  torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, torch.tensor(after, dtype=torch.float32))


def test_token_unlikelihood_lowers_the_windows_earlier_tokens_but_not_the_next_one():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 9, generator=generator)  # [batch, n, n_vocab]
    windows = torch.tensor([[3, 1, 3, 4, 1, 1, 2], [0, 0, 0, 5, 8, 0, 7]])  # [batch, n + 1]
    p = torch.softmax(logits, -1)
    expected = 0.0
    for b, ids in enumerate(windows.tolist()):
        for t in range(6):  # predicting ids[t + 1] from ids[:t + 1]
            expected -= sum(math.log(1 - p[b, t, v]) for v in set(ids[:t + 1]) - {ids[t + 1]})
    got = training.previous_token_unlikelihood(torch.log_softmax(logits, -1), windows)
    torch.testing.assert_close(got, torch.tensor(expected / 12))
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=9, n_positions=8, n_embd=8, n_layer=1, n_head=2)).eval()
    plain = training.lm_loss(model, windows, bf16=False)
    torch.testing.assert_close(training.lm_loss(model, windows, bf16=False, token_unlikelihood=0.0), plain)
    assert training.lm_loss(model, windows, bf16=False, token_unlikelihood=1.0) > plain


def test_unlikelihood_prefixes_can_be_the_openings_of_documents():
    eot, n = EOT, prefix_kinds.UL_OPENING
    stream = np.array([eot, *range(1, n + 3), eot, 7, 8, eot, eot, *range(20, 20 + n)])  # long, short, empty, exact
    openings = prefix_kinds.document_openings(stream)
    assert openings.tolist() == [1, n + 8]
    prefixes = prefix_kinds.random_openings(stream, openings, torch.Generator().manual_seed(0))
    assert prefixes.shape == (training.BATCH_SIZE, n)
    assert {tuple(row) for row in prefixes.tolist()} == {tuple(range(1, n + 1)), tuple(range(20, 20 + n))}


def test_unlikelihood_prefixes_can_be_documents_first_sentences_one_length_to_a_batch():
    eot, stop, space = EOT, 13, 11  # "." ends a sentence where a token that begins with a space follows
    ends_sentence, starts_space = np.zeros(N_VOCAB, bool), np.zeros(N_VOCAB, bool)
    ends_sentence[stop], starts_space[space] = True, True
    stream = np.array([eot, 5, 6, stop, space, 7, stop, eot,  # "5 6." ends before " 7."
                       8, stop, 9, stop, eot,  # "8.9" goes on: the sentence ends at <|endoftext|>
                       3, 4, eot,  # no sentence end before the document's
                       5, stop, eot, 8, stop, eot])  # "5." and "8."
    sentences = prefix_kinds.document_sentences(stream, ends_sentence, starts_space)
    assert {n: offsets.tolist() for n, offsets in sentences.items()} == {2: [16, 19], 3: [1], 4: [8]}
    assert list(prefix_kinds.document_sentences(stream, ends_sentence, starts_space, longest=3)) == [2, 3]
    # a token stream ends without <|endoftext|>: its last document's sentence may end the stream, or not be
    ends_the_stream = prefix_kinds.document_sentences(np.append(stream, [9, 9, stop]), ends_sentence, starts_space)
    assert ends_the_stream[3].tolist() == [1, 22]
    unfinished = prefix_kinds.document_sentences(np.append(stream, [9, 9]), ends_sentence, starts_space)
    assert {n: offsets.tolist() for n, offsets in unfinished.items()} == {2: [16, 19], 3: [1], 4: [8]}
    batches = torch.Generator().manual_seed(0)
    lengths = set()
    for _ in range(20):
        prefixes = prefix_kinds.random_sentences(stream, sentences, batches)
        assert prefixes.shape[0] == training.BATCH_SIZE
        n = prefixes.shape[1]
        lengths.add(n)
        assert {tuple(row) for row in prefixes.tolist()} <= {tuple(stream[i:i + n]) for i in sentences[n]}
    assert lengths == {2, 3, 4}


def test_sentence_ends_are_read_off_the_gpt2_vocabulary():
    encoding = load_tokenizer()
    ends_sentence, starts_space = prefix_kinds.sentence_ends(encoding)
    assert ends_sentence.shape == starts_space.shape == (N_VOCAB,)
    [stop], [queue], [newline], [called] = (encoding.encode(text) for text in [".", " queue", "\n", "called"])
    assert ends_sentence[stop] and not ends_sentence[queue] and not ends_sentence[EOT]
    assert starts_space[queue] and starts_space[newline] and not starts_space[called]


def test_unlikelihood_training_stops_when_the_loops_stop_falling():
    schedule = steps.UnlikelihoodSchedule(max_steps=10_000)
    for step, loops in zip(range(250, 2000, 250), [90, 70, 60, 55, 58, 59]):
        assert schedule.evaluated(step, loops) is None and schedule.end == 10_000  # 60 -> 55 is still 5
    assert schedule.evaluated(1750, 57) and schedule.end == 1750  # the best of the last three is not 3 below 55


def test_keeping_the_fewest_loops_names_the_first_evaluation_with_the_fewest():
    schedule = steps.UnlikelihoodSchedule(max_steps=10_000)
    for step, loops in zip(range(250, 2000, 250), [22, 15, 12, 7, 19, 7, 18]):
        schedule.evaluated(step, loops)
    assert schedule.fewest_loops_step == 1000
    ended = steps.UnlikelihoodSchedule(max_steps=600, loop_counts=[30, 20, 10])  # the last, at --max-steps
    assert ended.fewest_loops_step == 600


def error_of(*argv):
    """The one-line error that the command line exits with, given these arguments."""
    with pytest.raises(SystemExit) as exit:
        main(list(argv))
    return exit.value.code


@pytest.mark.parametrize("flag, what", [
    (["--keep", "fewest-loops"], "--keep chooses among the evaluations of unlikelihood steps"),
    (["--unlikelihood-margin", "1"], "--unlikelihood-margin shapes unlikelihood steps"),
    (["--unlikelihood-margin-among", "8"], "--unlikelihood-margin-among shapes unlikelihood steps"),
    (["--unlikelihood-nonsense", "1e-4"], "--unlikelihood-nonsense shapes unlikelihood steps"),
    (["--unlikelihood-early-end"], "--unlikelihood-early-end shapes unlikelihood steps"),
    (["--unlikelihood-best-of", "4"], "--unlikelihood-best-of adds to unlikelihood steps"),
    (["--unlikelihood-reference", "x.dat"], "--unlikelihood-reference holds unlikelihood steps"),
    (["--unlikelihood-prefixes", "openings"], "--unlikelihood-prefixes chooses what unlikelihood steps continue"),
])
def test_an_unlikelihood_flag_without_unlikelihood_steps_is_one_line(flag, what):
    assert error_of(*flag) == f"error: {what}; give --unlikelihood-from MODEL_DAT as well"


@pytest.mark.parametrize("flags, message", [
    (["--unlikelihood-margin-among", "8"],
     "--unlikelihood-margin-among chooses the margin's other token; give --unlikelihood-margin NATS as well"),
    (["--unlikelihood-margin", "1", "--unlikelihood-margin-among", "1"],
     "--unlikelihood-margin-among needs K from 2 (the repeating token may be one of them) to 50257 (the vocabulary)"),
    (["--unlikelihood-margin", "1", "--unlikelihood-margin-among", "50258"],
     "--unlikelihood-margin-among needs K from 2 (the repeating token may be one of them) to 50257 (the vocabulary)"),
    (["--unlikelihood-nonsense", "1e-4"],
     "--unlikelihood-nonsense pushes tokens down with the margin; give --unlikelihood-margin NATS as well"),
    (["--unlikelihood-early-end"],
     "--unlikelihood-early-end pushes <|endoftext|> down with the margin; give --unlikelihood-margin NATS as well"),
    (["--unlikelihood-margin", "1", "--unlikelihood-nonsense", "1"],
     "--unlikelihood-nonsense needs a probability P between 0 and 1 (the shipped model used 1e-4)"),
    (["--unlikelihood-best-of", "0"],
     "--unlikelihood-best-of needs K of 1 or more samples a prefix (the shipped model used 4)"),
    (["--unlikelihood-margin", "1", "--unlikelihood-reference", "{tmp}/ref.dat"],
     "no model file {tmp}/ref.dat to hold unlikelihood steps to"),
])
def test_a_margin_flag_without_a_margin_or_out_of_range_is_one_line(tmp_path, flags, message):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    error = error_of("--unlikelihood-from", str(tmp_path / "none.dat"), *flags)
    assert error == f"error: {message.format(tmp=tmp_path)}"


def test_unlikelihood_from_a_missing_model_file_is_one_line(tmp_path):
    assert error_of("--unlikelihood-from", str(tmp_path / "none.dat")) == (
        f"error: no model file {tmp_path / 'none.dat'} to train on with unlikelihood steps")


def test_the_docs_folder_must_hold_the_manual(tmp_path):
    assert error_of("--docs", str(tmp_path)) == (
        f"error: no Python documentation in {tmp_path}; install it with `apt-get install python3.11-doc` "
        f"or name its HTML folder with --docs")
