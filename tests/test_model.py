"""Parity with Hugging Face GPT-2 (PyTorch, float32) on the same weights, and the model's own invariants.

Tolerance: logits and hidden states agree within 1e-4 absolute, attention weights within 1e-6 (they
differ by ~1e-6 and ~1e-8 in practice: float32 sums in a different order), and greedy decoding picks
identical tokens.
"""

import numpy as np
import pytest
import torch

import picogpt.model as M
from conftest import GPT2_124M_SHAPE
from hf_reference import hf_model, random_tensors, write_model_dat
from picogpt.errors import PicogptError
from picogpt.generate import generate
from picogpt.store import load
from picogpt.reference import hf_greedy
from picogpt.trace import collect

LOGITS_TOLERANCE = 1e-4
HIDDEN_TOLERANCE = 1e-4  # hidden states are of the order of 1-10 here (the residual stream grows with depth)
ATTENTION_TOLERANCE = 1e-6  # probabilities in [0, 1]
PROMPT = [36235, 39141, 18765, 1143, 326, 9061, 561, 530, 1110, 1716, 845, 3665, 11, 475, 772, 339, 714, 407, 5967]

# The four released sizes' widths and head counts, with 2 layers and a smaller vocabulary and context
# to keep the suite fast; the full 124M shape is checked once below.
FAMILIES = {
    "124M": dict(n_embd=768, n_head=12),
    "355M": dict(n_embd=1024, n_head=16),
    "774M": dict(n_embd=1280, n_head=20),
    "1558M": dict(n_embd=1600, n_head=25),
}


def hf_logits(reference, ids):
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].numpy()


def check_parity(model, reference, prompt, n_tokens=20):
    ours = model(prompt, all_logits=True)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, hf_logits(reference, prompt), atol=LOGITS_TOLERANCE, rtol=0)

    # The cache gives the same logits: prefill half the prompt, then decode the rest one token at a time.
    cache = model.new_cache()
    half = len(prompt) // 2
    cached = [model(prompt[:half], cache=cache, all_logits=True)]
    cached += [model([t], cache=cache) for t in prompt[half:]]
    np.testing.assert_allclose(np.concatenate(cached), ours, atol=1e-5, rtol=0)

    greedy = list(generate(model, prompt, n_tokens, stop_at_eot=False))
    assert greedy == list(generate(model, prompt, n_tokens, stop_at_eot=False, use_cache=False))
    assert greedy == hf_greedy(reference, prompt, n_tokens)

    # Hidden states (each block's input, then the final layer norm's output) and attention weights.
    out = collect(model, prompt)
    with torch.no_grad():
        theirs = reference(torch.tensor([prompt]), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(theirs.hidden_states) == model.hparams["n_layer"] + 1
    for ours_h, theirs_h in zip(out.hidden_states, theirs.hidden_states):
        np.testing.assert_allclose(ours_h, theirs_h[0].numpy(), atol=HIDDEN_TOLERANCE, rtol=0)
    assert len(out.attentions) == len(theirs.attentions) == model.hparams["n_layer"]
    for ours_a, theirs_a in zip(out.attentions, theirs.attentions):
        np.testing.assert_allclose(ours_a, theirs_a[0].numpy(), atol=ATTENTION_TOLERANCE, rtol=0)
    np.testing.assert_allclose(out.logits, ours[-1:], atol=1e-5, rtol=0)  # the last row, as a product of its own


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hugging_face_for_each_size_family(tmp_path, family):
    hparams = dict(n_vocab=8192, n_ctx=128, n_layer=2, **FAMILIES[family])
    tensors = random_tensors(hparams, seed=sum(map(ord, family)))
    model = load(write_model_dat(tmp_path / "model.dat", hparams, tensors))
    check_parity(model, hf_model(model.hparams, tensors), [i % 8192 for i in PROMPT])


def test_matches_hugging_face_at_the_full_124m_shape(model_124m_shape):
    path, tensors = model_124m_shape
    model = load(path)
    assert model.n_params == 124_439_808
    check_parity(model, hf_model(model.hparams, tensors), PROMPT)


@pytest.fixture
def small_model(tmp_path):
    hparams = dict(n_vocab=300, n_ctx=32, n_embd=48, n_head=6, n_layer=3)
    return load(write_model_dat(tmp_path / "model.dat", hparams, random_tensors(hparams, seed=3)))


def test_every_step_stays_float32(small_model, monkeypatch):
    """No silent float64 promotion anywhere: masks, constants and scalars keep the arrays at float32."""
    names = ["gelu", "softmax", "layer_norm", "linear", "attention", "mha", "mlp", "block", "gpt2"]  # the mask: below
    seen = []
    for name in names:
        original = getattr(M, name)

        def checked(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            for array in out if isinstance(out, tuple) else (out,):
                assert array.dtype == np.float32, f"{_name} returned {array.dtype}"
            seen.append(_name)
            return out
        monkeypatch.setattr(M, name, checked)
    cache = small_model.new_cache()
    small_model([1, 2, 3], cache=cache)
    small_model([4], cache=cache)
    assert set(names) == set(seen)


def test_only_the_last_position_gets_logits_unless_asked(small_model):
    last = small_model([5, 6, 7])
    every = small_model([5, 6, 7], all_logits=True)
    assert last.shape == (1, 300) and every.shape == (3, 300)
    np.testing.assert_allclose(last[0], every[-1], atol=1e-6)


def test_the_cache_fills_in_place(small_model):
    cache = small_model.new_cache()
    keys = cache.keys  # [n_layer, n_batch, n_head, n_positions, head_dim]
    small_model([1, 2, 3, 4], cache=cache)
    small_model([5], cache=cache)
    assert cache.length == 5
    assert cache.keys is keys and np.any(keys[:, 0, :, 4] != 0) and not np.any(keys[:, 0, :, 5:])


def test_attention_mask_is_causal_and_hides_left_padding():
    positions, mask = M.positions_and_mask(2, 3, n_pad=[0])  # 2 new tokens at indices 3 and 4, after 3 cached ones
    assert positions.tolist() == [[3, 4]]
    assert mask.dtype == np.float32 and mask.shape == (1, 1, 2, 5)
    assert np.isneginf(mask[0, 0]).tolist() == [[False] * 4 + [True], [False] * 5]
    positions, mask = M.positions_and_mask(3, 0, n_pad=[0, 2])
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]  # padding does not count; pads sit at position 0
    padded = np.isneginf(mask[1, 0])  # row 1 starts with 2 pads
    assert padded.tolist() == [[False, True, True],  # a pad sees only itself, so no row is all -inf
                               [True, False, True],
                               [True, True, False]]  # the first real token sees no pad


def test_context_and_vocabulary_limits_are_clear_errors(small_model):
    with pytest.raises(PicogptError, match="exceed the model's context of 32"):
        small_model(list(range(33)))
    cache = small_model.new_cache()
    small_model(list(range(32)), cache=cache)
    with pytest.raises(PicogptError, match="context"):
        small_model([1], cache=cache)
    with pytest.raises(PicogptError, match="outside this model's vocabulary of 300"):
        small_model([300])
    with pytest.raises(PicogptError, match="prompt .30 tokens. plus 3 new tokens exceed"):
        next(generate(small_model, list(range(30)), 3))


def test_model_dat_names_map_to_the_nested_parameters(small_model):
    p = small_model.params
    assert p["blocks"][2]["attn"]["c_attn"]["w"].shape == (48, 144)
    assert p["blocks"][0]["mlp"]["c_proj"]["b"].shape == (48,)
    assert set(p) == {"wte", "wpe", "blocks", "ln_f"} and len(p["blocks"]) == 3
    assert GPT2_124M_SHAPE["n_layer"] == 12


def test_a_cache_can_be_sized_to_the_positions_it_will_hold(small_model):
    cache = small_model.new_cache(n_batch=2, n_positions=5)
    assert cache.keys.shape == (3, 2, 6, 5, 8)  # [n_layer, n_batch, n_head, n_positions, head_dim]
    small_model([[1, 2, 3], [4, 5, 6]], cache=cache)
    with pytest.raises(ValueError, match="6 positions exceed the 5 this cache was made for"):
        small_model([[1, 2, 3], [4, 5, 6]], cache=cache)
    assert small_model.new_cache(n_positions=10_000).n_positions == 32  # never beyond n_ctx
