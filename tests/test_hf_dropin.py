"""picogpt.hf.GPT2LMHeadModel against transformers' own GPT2LMHeadModel on the same random weights:
from_pretrained, forward (logits, past_key_values, hidden states, attentions, left-padded batches) and
generate (greedy, beam search, the logits processors, early ends), identical tokens and scores within
1e-4; sampling's filtered distribution against Hugging Face's warpers."""

import os
import stat

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from hf_reference import hf_model, random_tensors, write_model_dat
from picogpt import hf
from picogpt.errors import PicogptError
from picogpt.reference import hf_config
from picogpt.tensors import model_dat_to_hf_name
from picogpt.tokenizer import encode

HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2, layer_norm_epsilon=1e-5)
PROMPTS = [encode("The quick brown fox"), encode("Hello"), encode("Alan Turing theorized that computers")]
ATOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(picogpt's drop-in, Hugging Face's model) on the same weights, the drop-in from a Hugging Face folder."""
    tensors = random_tensors(HPARAMS, seed=20)
    folder = tmp_path_factory.mktemp("hf")
    hf_config(HPARAMS).save_pretrained(folder)
    save_file({model_dat_to_hf_name(n): np.ascontiguousarray(t) for n, t in tensors.items()},
              str(folder / "model.safetensors"))
    ours = hf.GPT2LMHeadModel.from_pretrained(folder)
    assert (folder / "model.dat").is_file()  # converted once, cached beside
    return ours, hf_model(HPARAMS, tensors)


def padded(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_config_and_loading(pair, tmp_path):
    ours, theirs = pair
    for field in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions", "eos_token_id", "bos_token_id"):
        assert getattr(ours.config, field) == getattr(theirs.config, field), field
    path = write_model_dat(tmp_path / "model.dat", HPARAMS, random_tensors(HPARAMS, seed=20))
    assert hf.GPT2LMHeadModel.from_pretrained(path).config.n_layer == 2
    assert hf.GPT2LMHeadModel.from_pretrained("demo").config.n_layer == 8
    with pytest.raises(PicogptError, match="argument 'torch_dtype' is not supported"):
        hf.GPT2LMHeadModel.from_pretrained(path, torch_dtype="float16")


def test_a_read_only_folder_is_converted_in_memory(pair, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    hf_config(HPARAMS).save_pretrained(folder)
    tensors = random_tensors(HPARAMS, seed=20)
    save_file({model_dat_to_hf_name(n): np.ascontiguousarray(t) for n, t in tensors.items()},
              str(folder / "model.safetensors"))
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user may write into a read-only folder (root)")
        model = hf.GPT2LMHeadModel.from_pretrained(folder)
        assert not (folder / "model.dat").exists()
        ids = torch.tensor([PROMPTS[0]])
        np.testing.assert_allclose(model(ids).logits, pair[1](ids).logits.detach(), atol=ATOL)
    finally:
        folder.chmod(stat.S_IRWXU)


def test_forward_matches_on_a_left_padded_batch(pair):
    ours, theirs = pair
    ids, mask = padded(PROMPTS)
    mine = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ref = theirs(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert isinstance(mine.logits, torch.Tensor) and mine.logits.shape == ref.logits.shape
    real = mask.bool()
    np.testing.assert_allclose(mine.logits[real], ref.logits[real], atol=ATOL)
    assert len(mine.hidden_states) == len(ref.hidden_states) and len(mine.attentions) == len(ref.attentions)
    for a, b in zip(mine.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(a[real], b[real], atol=ATOL)
    for a, b in zip(mine.attentions, ref.attentions):
        np.testing.assert_allclose(a.permute(0, 2, 1, 3)[real], b.permute(0, 2, 1, 3)[real], atol=1e-5)
    as_lists = ours(ids.tolist(), attention_mask=mask.tolist())
    assert isinstance(as_lists.logits, np.ndarray)  # no torch in, no torch out


def test_past_key_values_continue_as_in_hugging_face(pair):
    ours, theirs = pair
    ids, mask = padded(PROMPTS)
    first = ours(ids, attention_mask=mask, use_cache=True)
    step = torch.tensor([[11], [13], [262]])
    longer = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    second = ours(step, attention_mask=longer, past_key_values=first.past_key_values, use_cache=True)
    with torch.no_grad():
        ref = theirs(torch.cat([ids, step], dim=1), attention_mask=longer)
    np.testing.assert_allclose(second.logits[:, -1], ref.logits[:, -1], atol=ATOL)
    assert second.past_key_values.get_seq_length() == ids.shape[1] + 1


GENERATE = {
    "greedy": dict(),
    "greedy, max_length": dict(max_length=16, max_new_tokens=None),
    "min_new_tokens": dict(min_new_tokens=9),
    "no_repeat_ngram 2": dict(no_repeat_ngram_size=2),
    "no_repeat_ngram 3": dict(no_repeat_ngram_size=3),
    "repetition 1.3": dict(repetition_penalty=1.3),
    "beams 2": dict(num_beams=2),
    "beams 4, lp 0.5": dict(num_beams=4, length_penalty=0.5),
    "beams 4, lp 2, early": dict(num_beams=4, length_penalty=2.0, early_stopping=True),
    "beams 3, never": dict(num_beams=3, early_stopping="never"),
    "beams 4, return 4": dict(num_beams=4, num_return_sequences=4),
    "beams 3, no_repeat 2, min 5": dict(num_beams=3, no_repeat_ngram_size=2, min_new_tokens=5),
}


@pytest.fixture(scope="module")
def early_eos(pair):
    """A token greedy search reaches after a few steps for the first prompt."""
    ours, _ = pair
    return int(ours.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6, eos_token_id=50256)[0, -2])


@pytest.mark.parametrize("case", GENERATE)
@pytest.mark.parametrize("eos", ["reached early", "<|endoftext|>"])
@pytest.mark.parametrize("pad", [0, 50256])
def test_generate_gives_hugging_faces_tokens(pair, early_eos, case, eos, pad):
    ours, theirs = pair
    ids, mask = padded(PROMPTS, pad)
    options = dict(dict(max_new_tokens=10), **GENERATE[case])
    options = {k: v for k, v in options.items() if v is not None}
    eos_id = early_eos if eos == "reached early" else 50256
    kwargs = dict(attention_mask=mask, eos_token_id=eos_id, pad_token_id=pad, return_dict_in_generate=True,
                  output_scores=True, **options)
    mine = ours.generate(ids, **kwargs)
    with torch.no_grad():
        ref = theirs.generate(ids, do_sample=False, **kwargs)
    assert mine.sequences.tolist() == ref.sequences.tolist()
    assert len(mine.scores) == len(ref.scores)
    for a, b in zip(mine.scores, ref.scores):
        a, b = a.numpy(), b.numpy()
        assert np.array_equal(np.isneginf(a), np.isneginf(b))
        np.testing.assert_allclose(a[np.isfinite(b)], b[np.isfinite(b)], atol=ATOL)
    if options.get("num_beams", 1) > 1:
        np.testing.assert_allclose(mine.sequences_scores, ref.sequences_scores, atol=ATOL)


def test_plain_generate_returns_what_hugging_face_returns(pair):
    ours, theirs = pair
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=50256)
    assert torch.equal(ours.generate(ids, max_new_tokens=8), expected)
    assert isinstance(ours.generate(PROMPTS[2:], max_new_tokens=3), np.ndarray)


def test_sampling_draws_from_hugging_faces_filtered_distribution(pair):
    """Torch's random numbers cannot be had: the scores sampled from must equal Hugging Face's warpers'."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    ours, theirs = pair
    ids = torch.tensor([PROMPTS[0]])
    out = ours.generate(ids, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=1, seed=3,
                        return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        logits = theirs(ids).logits[:, -1]
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    expected = warpers(ids, logits).numpy()
    mine = out.scores[0].numpy()
    assert np.array_equal(np.isneginf(mine), np.isneginf(expected))
    np.testing.assert_allclose(mine[np.isfinite(expected)], expected[np.isfinite(expected)], atol=ATOL)
    assert np.isfinite(mine[0, int(out.sequences[0, -1])])  # the token drawn survived the filters


def test_unsupported_arguments_are_refused(pair):
    ours, _ = pair
    with pytest.raises(PicogptError, match="generate\\(\\) argument 'typical_p' is not supported by picogpt.hf"):
        ours.generate(torch.tensor([PROMPTS[0]]), typical_p=0.5)
    with pytest.raises(PicogptError, match="beam sampling"):
        ours.generate(torch.tensor([PROMPTS[0]]), num_beams=2, do_sample=True)
    with pytest.raises(PicogptError, match="left padding"):
        ours(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 0, 1]]))


def test_the_readmes_script_prints_the_same_with_either_import(tmp_path):
    """The transformers script of docs/huggingface.md (once the README's), run as written and with its
    import changed, on a Hugging Face copy of the demo model: the same lines, and the ones the page shows."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    from picogpt.modelfile import open_model_file
    repo = Path(__file__).resolve().parent.parent
    page = (repo / "docs" / "huggingface.md").read_text()
    section = page.split("## A transformers script, changed by one import", 1)[1].split("\n## ", 1)[0]
    script = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.findall(r"```\n('.*?)```", section, re.S)[0]
    demo = open_model_file(repo / "data" / "demo" / "model.dat")
    hf_model(demo.hparams, demo.tensors).save_pretrained(tmp_path / "demo-hf")
    (tmp_path / "data").symlink_to(repo / "data")
    changed = script.replace("from transformers import GPT2LMHeadModel, GPT2Tokenizer",
                             "from picogpt.hf import GPT2LMHeadModel\nfrom transformers import GPT2Tokenizer")
    outputs = [subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300).stdout for code in (script, changed)]
    assert outputs[0] == outputs[1] == shown


def test_outputs_index_like_hugging_faces(pair):
    ours, theirs = pair
    ids = torch.tensor([PROMPTS[0]])
    out = ours(ids, use_cache=True)
    assert out[0] is out.logits and out["logits"] is out.logits and out.to_tuple()[1] is out.past_key_values
    as_tuple = ours(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)


def test_without_a_mask_padding_is_found_as_hugging_face_finds_it(pair):
    ours, theirs = pair
    ids, _ = padded(PROMPTS, pad=5)
    with torch.no_grad():
        expected = theirs.generate(ids, max_new_tokens=6, pad_token_id=5, eos_token_id=50256, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, pad_token_id=5, eos_token_id=50256), expected)


def test_more_refusals(pair, capsys, tmp_path):
    ours, _ = pair
    ids, mask = padded(PROMPTS)
    past = ours(ids, attention_mask=mask, use_cache=True).past_key_values
    with pytest.raises(PicogptError, match="pass the attention_mask"):
        ours(torch.tensor([[1], [2], [3]]), past_key_values=past)
    with pytest.raises(PicogptError, match="eos_token_id must be one token id"):
        ours.generate(ids, attention_mask=mask, eos_token_id=[50256, 13])
    with pytest.raises(PicogptError, match="temperature must be a finite number > 0 when sampling"):
        ours.generate(ids, attention_mask=mask, do_sample=True, temperature=0)
    from picogpt import cli
    assert cli.main(["Hi", "--model", "demo", "--num-beams", "2", "--trace"]) == 2
    assert "does not take --trace" in capsys.readouterr().err
    assert cli.main(["Hi", "--model", "demo", "--length-penalty", "2"]) == 2
    assert "--length-penalty ranks the beams of --num-beams" in capsys.readouterr().err


def test_the_cached_model_dat_follows_the_folder(tmp_path):
    import json
    import time
    folder = tmp_path / "hf"
    folder.mkdir()
    config = hf_config(HPARAMS)
    config.eos_token_id = 13
    config.save_pretrained(folder)
    for seed in (1, 2):
        tensors = random_tensors(HPARAMS, seed=seed)
        time.sleep(0.01)
        save_file({model_dat_to_hf_name(n): np.ascontiguousarray(t) for n, t in tensors.items()},
                  str(folder / "model.safetensors"))
        os.utime(folder / "model.safetensors", (time.time() + seed, time.time() + seed))  # newer than the cache
        model = hf.GPT2LMHeadModel.from_pretrained(folder)
        np.testing.assert_array_equal(model.model.params["wte"], tensors["wte"])  # the new weights, not stale ones
    assert model.config.eos_token_id == 13 and json.loads((folder / "config.json").read_text())["eos_token_id"] == 13


# ---------------------------------------------------------------------------------------------------
# transformers 5.25's rules at the edges (issue 35): lengths, arguments, inputs, the loss, the cache

class NoWork:
    """Stands in for the drop-in's picogpt model: any forward pass fails the test (a check came too late)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        raise AssertionError("the model ran before the request was refused")


@pytest.fixture
def no_work(pair, monkeypatch):
    ours, _ = pair
    monkeypatch.setattr(ours, "model", NoWork(ours.model))
    return ours


def hf_generate(model, ids, **kwargs):
    """transformers' generate, its warnings about defaults and ignored flags silenced."""
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model.generate(ids, **kwargs)


@pytest.mark.parametrize("n_prompt", [3, 20, 50])
def test_without_a_length_generate_makes_20_new_tokens_as_transformers_does(pair, n_prompt):
    """transformers 5.25 counts its default max_length (20) after the prompt, and ends at the context (64)."""
    ours, theirs = pair
    ids = torch.tensor([(PROMPTS[2] * 20)[:n_prompt]])
    expected = hf_generate(theirs, ids, attention_mask=torch.ones_like(ids), pad_token_id=50256, do_sample=False)
    assert expected.shape[1] == min(n_prompt + 20, HPARAMS["n_ctx"])
    assert torch.equal(ours.generate(ids), expected)


def test_lengths_that_leave_nothing_to_generate_are_refused_as_in_transformers(pair, no_work):
    ours, theirs = pair
    whole_context = torch.tensor([(PROMPTS[2] * 20)[:HPARAMS["n_ctx"]]])
    for ids, options, message in ((whole_context, {}, "the prompt has 64 tokens, the model's whole context of 64"),
                                  (torch.tensor([PROMPTS[2]]), dict(max_length=len(PROMPTS[2])),
                                   "max_length, which counts them too, is 6: nothing is left to generate")):
        with pytest.raises(ValueError, match="Input length of input_ids is"):
            hf_generate(theirs, ids, pad_token_id=50256, **options)
        with pytest.raises(PicogptError, match=message):
            no_work.generate(ids, **options)


@pytest.mark.parametrize("options", [dict(max_new_tokens=100), dict(max_length=100), dict(do_sample=True,
                                     max_new_tokens=100, num_return_sequences=2), dict(num_beams=3, max_new_tokens=100)],
                         ids=["greedy", "max_length", "sampling", "beams"])
def test_the_context_is_checked_before_any_work_on_every_path(no_work, options):
    """(generate([[1, 2, 3]], max_new_tokens=1100) once ran 23.7 s on the 124M shape before failing.)"""
    with pytest.raises(PicogptError, match="exceed the model's context of 64 tokens"):
        no_work.generate([[1, 2, 3]], **options)


def assert_same_scores(mine, expected):
    mine, expected = np.asarray(mine), np.asarray(expected)
    assert np.array_equal(np.isneginf(mine), np.isneginf(expected))
    np.testing.assert_allclose(mine[np.isfinite(expected)], expected[np.isfinite(expected)], atol=ATOL)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 50, 0.0), (0.7, 0, 0.0), (1.3, None, 0.0),
                                                       (0.7, 20, 1.5), (1.0, None, 1.0), (0.5, 0, 0.9)])
def test_sampling_arguments_mean_what_they_mean_in_transformers(pair, temperature, top_k, top_p):
    """top_p=0 keeps the likeliest token (transformers' min_tokens_to_keep), top_p >= 1 and top_k=0 or
    None filter nothing: the scores sampled from equal transformers' warpers', and no token drawn is
    outside the vocabulary."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    ours, theirs = pair
    ids, mask = padded(PROMPTS)
    out = ours.generate(ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=top_k,
                        top_p=top_p, max_new_tokens=1, seed=5, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():  # positions as generate counts them: from each row's first real token
        logits = theirs(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1 else []
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    assert_same_scores(out.scores[0], LogitsProcessorList(warpers)(ids, logits))
    if top_p == 0:  # the likeliest token, whatever is drawn
        greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=4)
        for seed in range(3):
            drawn = ours.generate(ids, attention_mask=mask, do_sample=True, top_p=0.0, max_new_tokens=4, seed=seed,
                                  temperature=temperature, top_k=top_k)
            assert torch.equal(drawn, greedy)


BAD_ARGUMENTS = {
    "mask of another shape": (dict(attention_mask=[[1, 1, 1, 1]]), "attention_mask has shape \\[1, 4\\], not \\[1, 3\\]"),
    "mask of 2s": (dict(attention_mask=[[1, 2, 1]]), "attention_mask must hold 1 \\(a token\\) and 0 \\(padding\\) "
                   "only, not 2"),
    "top_k -3": (dict(do_sample=True, top_k=-3), "top_k must be a whole number >= 0 \\(0 keeps every token\\), not -3"),
    "top_k 2.5": (dict(do_sample=True, top_k=2.5), "top_k must be a whole number >= 0"),
    "float ids": (dict(input_ids=torch.tensor([[1.0, 2.0, 3.0]])), "input_ids must hold integer token ids, not float32"),
    "ragged lists": (dict(input_ids=[[1, 2, 3], [4, 5]]), "input_ids has rows of 3 and 2 values; pad them on the left"),
    "3-D ids": (dict(input_ids=[[[1, 2, 3]]]), "input_ids must be token ids \\[batch, length\\]"),
    "no ids": (dict(input_ids=[]), "input_ids holds no token ids"),
    "length_penalty nan": (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    "max_new_tokens 3.5": (dict(max_new_tokens=3.5), "max_new_tokens must be a whole number >= 1, not 3.5"),
    "max_new_tokens '5'": (dict(max_new_tokens="5"), "max_new_tokens must be a whole number >= 1, not '5'"),
    "max_new_tokens 0": (dict(max_new_tokens=0), "max_new_tokens must be a whole number >= 1, not 0"),
    "max_length 5.5": (dict(max_length=5.5, max_new_tokens=None), "max_length must be a whole number >= 1"),
    "temperature 0": (dict(do_sample=True, temperature=0.0), "temperature must be a finite number > 0 when sampling"),
    "temperature nan": (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number > 0"),
    "temperature inf": (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number > 0"),
    "top_p -0.1": (dict(do_sample=True, top_p=-0.1), "top_p must be a number from 0 to 1 \\(1 keeps every token\\)"),
    "top_p nan": (dict(do_sample=True, top_p=float("nan")), "top_p must be a number from 0 to 1"),
    "repetition_penalty 0": (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    "repetition_penalty nan": (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number"),
    "no_repeat 1.5": (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size must be a whole number \\(0 is none\\)"),
    "min_new_tokens 2.5": (dict(min_new_tokens=2.5), "min_new_tokens must be a whole number"),
    "num_beams 0": (dict(num_beams=0), "num_beams must be a whole number >= 1, not 0"),
    "num_beams 2.5": (dict(num_beams=2.5), "num_beams must be a whole number >= 1, not 2.5"),
    "num_return_sequences 0": (dict(num_return_sequences=0, do_sample=True), "num_return_sequences must be a whole"),
    "num_return_sequences > num_beams": (dict(num_return_sequences=3, num_beams=2), "must be at most num_beams \\(2\\)"),
    "early_stopping 'x'": (dict(num_beams=2, early_stopping="x"), "early_stopping must be True, False or 'never'"),
    "do_sample 'yes'": (dict(do_sample="yes"), "do_sample must be True or False, not 'yes'"),
    "eos outside": (dict(eos_token_id=50257), "eos_token_id must be a token id from 0 to 50256, not 50257"),
    "pad negative": (dict(pad_token_id=-1), "pad_token_id must be a token id from 0 to 50256, not -1"),
    "seed 'a'": (dict(do_sample=True, seed="a"), "seed must be a whole number >= 0"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_are_one_sentence_before_any_work(no_work, case):
    options, message = BAD_ARGUMENTS[case]
    options = dict(dict(input_ids=[PROMPTS[2][:3]], max_new_tokens=2), **options)
    with pytest.raises(PicogptError, match=message) as refused:
        no_work.generate(**options)
    assert "\n" not in str(refused.value)


def test_values_transformers_takes_as_none_are_taken_so(pair):
    """transformers ignores sampling arguments when greedy and adds no processor for a no-repeat size or
    minimum of 0 or less: the same tokens."""
    ours, theirs = pair
    ids = torch.tensor([PROMPTS[0]])
    options = dict(max_new_tokens=6, temperature=0.0, top_k=-3, top_p=-1.0, no_repeat_ngram_size=-1,
                   min_new_tokens=-5, length_penalty=float("nan"), num_beams=None, repetition_penalty=None)
    expected = hf_generate(theirs, ids, attention_mask=torch.ones_like(ids), pad_token_id=50256, do_sample=False,
                           **{k: v for k, v in options.items() if k not in ("num_beams", "repetition_penalty")})
    assert torch.equal(ours.generate(ids, **options), expected)


def test_labels_give_transformers_loss(pair):
    ours, theirs = pair
    ids, mask = padded(PROMPTS)
    # A row's first token after its padding is predicted from a padding position, whose logits mean
    # nothing (transformers' eager and sdpa attention give two losses); its label is skipped here.
    labels = ids.masked_fill(torch.roll(mask, 1, dims=1) == 0, -100)
    labels[1, -1] = -100  # any label may be skipped
    for given in (dict(labels=labels, attention_mask=mask), dict(labels=ids[2:], input_ids=ids[2:])):
        given = dict(dict(input_ids=ids), **given)
        with torch.no_grad():
            expected = theirs(**given).loss
        mine = ours(**given)
        assert isinstance(mine.loss, torch.Tensor) and mine.loss.shape == () and mine[0] is mine.loss
        np.testing.assert_allclose(mine.loss, expected, rtol=1e-5)
    with torch.no_grad():
        assert torch.isnan(theirs(ids, labels=torch.full_like(ids, -100)).loss)
    assert np.isnan(ours(ids.tolist(), labels=np.full(ids.shape, -100)).loss)  # all skipped: NaN, as there
    for labels, message in ((ids[:, 1:], "labels has shape \\[3, 5\\], not input_ids' \\[3, 6\\]"),
                            (ids + 50257, "labels must be token ids from 0 to 50256, or -100"),
                            (ids.float(), "labels must hold integer token ids")):
        with pytest.raises(PicogptError, match=message):
            ours(ids, labels=labels)


def test_padding_positions_differ_from_transformers_as_the_page_says(pair):
    """docs/huggingface.md: at padding a position attends to itself alone in picogpt; transformers' eager
    attention spreads a row of padding evenly over every position. Real positions agree (checked above)."""
    ours, theirs = pair
    ids, mask = padded(PROMPTS)
    width = ids.shape[1]
    mine = ours(ids, attention_mask=mask, output_attentions=True).attentions
    with torch.no_grad():
        ref = theirs(ids, attention_mask=mask, output_attentions=True).attentions
    for a, b in zip(mine, ref):
        for row in range(len(ids)):
            for q in range(int((mask[row] == 0).sum())):
                np.testing.assert_array_equal(a[row, :, q], np.eye(width)[q][None].repeat(a.shape[1], 0))
                np.testing.assert_allclose(b[row, :, q], 1 / width, atol=1e-7)


def write_hf_folder(folder, tensors, dtype=None):
    """A Hugging Face folder of GPT-2 weights (safetensors, float32 or as torch's dtype given)."""
    from safetensors.torch import save_file as save_torch
    folder.mkdir(exist_ok=True)
    hf_config(HPARAMS).save_pretrained(folder)
    named = {model_dat_to_hf_name(n): torch.from_numpy(np.ascontiguousarray(t)) for n, t in tensors.items()}
    save_torch({n: t.to(dtype) if dtype else t for n, t in named.items()}, str(folder / "model.safetensors"))
    return folder


def test_a_cached_model_dat_that_is_not_the_folders_weights_is_never_used_silently(pair, tmp_path):
    import time
    from picogpt.convert_hf import convert_hf_checkpoint
    from picogpt.modelfile import open_model_file
    tensors = random_tensors(HPARAMS, seed=20)
    folder = write_hf_folder(tmp_path / "hf", tensors)
    cached = folder / "model.dat"
    # What `picogpt convert-hf DIR --dtype bf16` leaves there: refused, and kept as the user made it.
    convert_hf_checkpoint(folder, cached, "bf16")
    before = cached.read_bytes()
    with pytest.raises(PicogptError, match="holds .*'s weights rounded to bfloat16 .* from_pretrained\\('.*model.dat'\\)"):
        hf.GPT2LMHeadModel.from_pretrained(folder)
    assert cached.read_bytes() == before
    # ... and `--dtype int8`'s, likewise (it was taken for a stale file and converted over)
    convert_hf_checkpoint(folder, cached, "int8")
    before = cached.read_bytes()
    with pytest.raises(PicogptError, match="holds .*'s weights quantized to int8 .* from_pretrained\\('.*dat'\\)"):
        hf.GPT2LMHeadModel.from_pretrained(folder)
    assert cached.read_bytes() == before
    # Another model's float32 weights, newer than the folder's: converted again, with the folder's weights.
    write_model_dat(cached, HPARAMS, random_tensors(HPARAMS, seed=7))
    future = time.time() + 100
    os.utime(cached, (future, future))
    model = hf.GPT2LMHeadModel.from_pretrained(folder)
    ids = torch.tensor([PROMPTS[0]])
    np.testing.assert_allclose(model(ids).logits, pair[1](ids).logits.detach(), atol=ATOL)
    # The folder's own weights: used as they are, not converted again.
    stamp = cached.stat().st_mtime_ns
    hf.GPT2LMHeadModel.from_pretrained(folder)
    assert cached.stat().st_mtime_ns == stamp
    # A bfloat16 checkpoint's bfloat16 copy holds exactly its values: used.
    bf16_folder = write_hf_folder(tmp_path / "bf16", tensors, torch.bfloat16)
    convert_hf_checkpoint(bf16_folder, bf16_folder / "model.dat", "bf16")
    stamp = (bf16_folder / "model.dat").stat().st_mtime_ns
    model = hf.GPT2LMHeadModel.from_pretrained(bf16_folder)
    assert (bf16_folder / "model.dat").stat().st_mtime_ns == stamp
    assert open_model_file(bf16_folder / "model.dat").weight_dtype == "bf16"


def test_extreme_sampling_values_give_their_limit_greedy(pair):
    """Numbers at the edges through the drop-in: a temperature towards 0 or a top_p towards 0 is greedy, as
    transformers' own sampling at 1e-30 is, never NaN or a token outside the vocabulary."""
    ours, theirs = pair
    ids, mask = padded(PROMPTS)
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(hf_generate(theirs, ids, attention_mask=mask, do_sample=True, temperature=1e-30,
                                   max_new_tokens=5, pad_token_id=50256), greedy)
    for options in (dict(temperature=1e-30), dict(temperature=1e-40), dict(temperature=5e-324), dict(top_p=1e-300),
                    dict(temperature=1e-40, top_k=0, top_p=0.0), dict(repetition_penalty=1e300, temperature=1e-40)):
        drawn = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, seed=1, **options)
        expected = greedy if "repetition_penalty" not in options else ours.generate(
            ids, attention_mask=mask, max_new_tokens=5, repetition_penalty=1e300)
        assert torch.equal(drawn, expected), options
