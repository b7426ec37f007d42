"""A drop-in for Hugging Face transformers' GPT2LMHeadModel, computed by picogpt, with no PyTorch needed.

    from picogpt.hf import GPT2LMHeadModel        # instead of: from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("path/to/hf-folder")   # or a model.dat, "124M", "demo"
    out = model(input_ids, attention_mask=mask, use_cache=True)   # .logits, .past_key_values, ...
    ids = model.generate(input_ids, max_new_tokens=20, num_beams=4, length_penalty=0.5)

The arguments and defaults are those of transformers 5.24's GPT2LMHeadModel.forward and
GenerationMixin.generate (GenerationConfig's defaults: max_length 20, top_k 50, ...), for the
arguments listed in `generate`; any other is refused in one sentence, never ignored. Inputs may be
lists, NumPy arrays or torch tensors; outputs are NumPy arrays, or torch tensors when a torch tensor
came in (torch is imported only then). Padding is on the left, as Hugging Face wants for generation.
Greedy search and sampling are picogpt.generate's decoding loop, beam search is picogpt.beam's, and
both take picogpt.sampling's processors with these options: no decoding of its own here.
"""

import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import bfloat16, store
from .beam import beam_search
from .errors import PicogptError
from .generate import check_fits, decode_padded
from .hints import picogpt_command
from .memory import check_memory
from .tensors import hf_to_model_dat_name, is_matrix
from .tokenizer import EOT
from .trace import collect


class ModelOutput(SimpleNamespace):
    """Hugging Face's output objects: attributes, `out["logits"]`, and `out[0]` (the fields that are set,
    in order, as `to_tuple()` gives them)."""

    def __getitem__(self, key):
        return self.to_tuple()[key] if isinstance(key, (int, slice)) else getattr(self, key)

    def to_tuple(self):
        return tuple(value for value in vars(self).values() if value is not None)


class PastKeyValues:
    """What `model(..., use_cache=True)` returns as past_key_values, to pass back in: picogpt's KVCache
    and the left padding of its rows."""

    def __init__(self, cache, n_pad):
        self.cache, self.n_pad = cache, n_pad

    def get_seq_length(self):
        return self.cache.length


class GPT2Config(SimpleNamespace):
    """The GPT2Config fields a script reads."""


def _numpy(x, dtype=np.int64):
    """(array, came_from_torch)."""
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy().astype(dtype), True
    return np.asarray(x, dtype=dtype), False


def _out(array, as_torch):
    if array is None or not as_torch:
        return array
    import torch
    return torch.from_numpy(np.ascontiguousarray(array))


def _left_padding(attention_mask, shape):
    """n_pad [n_batch] from a mask of 1s after 0s (left padding); any other mask is refused."""
    if attention_mask is None:
        return np.zeros(shape[0], np.int64)
    mask, _ = _numpy(attention_mask)
    if mask.shape[0] != shape[0] or mask.ndim != 2:
        raise PicogptError(f"attention_mask has shape {list(mask.shape)}; it must be [batch, length] like input_ids")
    n_pad = (mask == 0).argmin(axis=1) if mask.size else np.zeros(shape[0], np.int64)
    n_pad = np.where(mask.all(axis=1), 0, np.where(mask.any(axis=1), n_pad, mask.shape[1]))
    expected = np.arange(mask.shape[1])[None, :] >= n_pad[:, None]
    if not np.array_equal(mask.astype(bool), expected):
        raise PicogptError("attention_mask must be left padding (0s, then 1s, in every row): picogpt masks no other "
                           "positions")
    return n_pad.astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders: converted once to a model.dat cached beside the weights

def _cache_differs(folder, cached):
    """Why the model.dat cached in a Hugging Face folder does not hold the folder's weights, or None where
    it does: "stale" (older than the weights, damaged, or other hyper-parameters or values: convert
    again) or "bf16" (values rounded to bfloat16, as `picogpt convert-hf --dtype bf16` writes them).

    The values compared are a sample read in milliseconds: every bias, gain and the position embedding
    whole, and the first row of every weight matrix, each widened to float32 on both sides."""
    from .convert_hf import _Shard, _weight_files, read_config
    from .modelfile import open_model_file
    if any(p.stat().st_mtime > cached.stat().st_mtime for p in folder.glob("*.safetensors*")):
        return "stale"
    try:
        cache = open_model_file(cached)
    except PicogptError:
        return "stale"
    if cache.hparams != read_config(folder)[0]:
        return "stale"
    with ExitStack() as stack:
        for path in _weight_files(folder)[0]:
            shard = _Shard(path, stack)
            for name in shard.names:
                ours = hf_to_model_dat_name(name)
                if ours not in cache.tensors:  # lm_head (the tied wte), old causal-mask buffers
                    continue
                mine = cache.tensors[ours][:1] if is_matrix(ours) else cache.tensors[ours]
                mine = bfloat16.widen(mine) if mine.dtype == np.uint16 else mine
                if not np.array_equal(mine, shard.read(name, (0, 1) if is_matrix(ours) else None)):
                    return "bf16" if cache.weight_dtype == "bf16" else "stale"
    return None


def _load_folder(folder):
    """A loaded model of a Hugging Face folder's own weights: its cached model.dat where that holds them,
    else converted again (into the folder, or, where it is read-only, into a file that lives only as long
    as its mapping); a bfloat16 copy the user wrote there is refused rather than replaced or used."""
    from .convert_hf import convert_hf_checkpoint
    cached = folder / "model.dat"
    why = _cache_differs(folder, cached) if cached.is_file() else "absent"
    if why == "bf16":
        raise PicogptError(
            f"{cached} holds {folder}'s weights rounded to bfloat16 (as picogpt convert-hf --dtype bf16 writes "
            f"them), so its logits would differ from transformers' on the folder (by about 1e-2 on GPT-2); load "
            f"that file as it is with from_pretrained('{cached}'), or replace it with the folder's own weights: "
            f"{picogpt_command('convert-hf', folder)}")
    if why is None:
        return store.load(cached)
    if os.access(folder, os.W_OK):
        convert_hf_checkpoint(folder, cached)
        return store.load(cached)
    with tempfile.TemporaryDirectory() as tmp:  # the mapping keeps the file's data after it is removed
        convert_hf_checkpoint(folder, Path(tmp) / "model.dat")
        return store.load(Path(tmp) / "model.dat")


class GPT2LMHeadModel:
    """GPT-2 with transformers' GPT2LMHeadModel interface; the numbers are picogpt's (model.GPT2)."""

    def __init__(self, model, folder=None):
        self.model = model
        h = model.hparams
        tokens = dict(eos_token_id=EOT, bos_token_id=EOT, pad_token_id=None)
        if folder is not None:  # a Hugging Face folder's own special tokens
            config = json.loads((Path(folder) / "config.json").read_text())
            tokens.update({k: config[k] for k in tokens if isinstance(config.get(k), int)})
        self.config = GPT2Config(model_type="gpt2", n_embd=h["n_embd"], n_layer=h["n_layer"], n_head=h["n_head"],
                                 vocab_size=h["n_vocab"], n_positions=h["n_ctx"], n_ctx=h["n_ctx"],
                                 layer_norm_epsilon=h["layer_norm_epsilon"], **tokens)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A Hugging Face model folder (config.json + safetensors: converted once to a model.dat cached
        beside them, checked to hold the folder's weights each time, or kept in memory where the folder
        cannot be written), a model.dat, a folder holding one, a size name ("124M", looked up as
        picogpt.load does) or "demo"."""
        if kwargs:
            raise PicogptError(f"from_pretrained() argument {sorted(kwargs)[0]!r} is not supported by picogpt.hf; "
                               f"it loads float32 (or bfloat16 model.dat) weights on the CPU")
        name = str(pretrained_model_name_or_path)
        folder = Path(name)
        if folder.is_dir() and (folder / "config.json").is_file():
            return cls(_load_folder(folder), folder)
        return cls(store.load(name))

    # transformers scripts call these; picogpt is always in inference mode on the CPU
    def eval(self):
        return self

    def to(self, device):
        if str(device) != "cpu":
            raise PicogptError(f"picogpt runs on the CPU, not {device}")
        return self

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False,
                output_hidden_states=False, output_attentions=False, position_ids=None, return_dict=True):
        """Logits [batch, seq, vocab] of every position (and, as asked, past_key_values, hidden_states:
        n_layer + 1 arrays [batch, seq, n_embd], attentions: n_layer arrays [batch, n_head, seq, past + seq])."""
        ids, as_torch = _numpy(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        past = past_key_values
        if past is not None and attention_mask is None and past.n_pad.any():
            raise PicogptError("the cached rows have left padding: pass the attention_mask (padding and all "
                               "positions since) with past_key_values")
        if past is not None and not isinstance(past, PastKeyValues):
            raise PicogptError("past_key_values must be what this model returned with use_cache=True")
        n_past = past.cache.length if past is not None else 0
        if past is not None:
            n_pad = past.n_pad
            if attention_mask is not None:
                check = _left_padding(attention_mask, (ids.shape[0], n_past + ids.shape[1]))
                if not np.array_equal(check, n_pad):
                    raise PicogptError("attention_mask must keep the padding the cached positions had")
        else:
            n_pad = _left_padding(attention_mask, ids.shape)
        cache = past.cache if past is not None else (self.model.new_cache(len(ids)) if use_cache else None)
        # As in Hugging Face: positions count from the first token of the row, padding included, unless given.
        positions = (n_past + np.arange(ids.shape[1]))[None] if position_ids is None else _numpy(position_ids)[0]
        if output_hidden_states or output_attentions:
            got = collect(self.model, ids, n_pad=n_pad, all_logits=True, cache=cache, positions=positions)
            logits, hidden, attentions = got.logits, got.hidden_states, got.attentions
        else:
            logits = self.model(ids, cache=cache, n_pad=n_pad, all_logits=True, positions=positions)
            hidden = attentions = None
        output = ModelOutput(
            logits=_out(logits, as_torch),
            past_key_values=PastKeyValues(cache, n_pad) if use_cache or past is not None else None,
            hidden_states=tuple(_out(h, as_torch) for h in hidden) if output_hidden_states else None,
            attentions=tuple(_out(a, as_torch) for a in attentions) if output_attentions else None)
        return output if return_dict else output.to_tuple()

    __call__ = forward

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, max_length=None, min_new_tokens=0,
                 do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
                 no_repeat_ngram_size=0, num_beams=1, length_penalty=1.0, early_stopping=False,
                 num_return_sequences=1, eos_token_id=None, pad_token_id=None, output_scores=False,
                 return_dict_in_generate=False, seed=None, **unsupported):
        """Hugging Face's generate for these arguments, with its defaults (seed: picogpt's sampling seed,
        which torch's random numbers cannot be). Returns the prompts (as given, padding included) followed
        by the new tokens, rows that ended early filled with pad_token_id (Hugging Face's
        `pad_token_id or eos_token_id`); with return_dict_in_generate, .sequences, .scores (output_scores:
        the processed scores of each step) and .sequences_scores (beam search)."""
        if unsupported:
            name = sorted(unsupported)[0]
            raise PicogptError(f"generate() argument {name!r} is not supported by picogpt.hf; it takes "
                               f"{', '.join(GENERATE_ARGUMENTS)}")
        ids, as_torch = _numpy(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if value is not None and np.ndim(value) != 0:
                raise PicogptError(f"{name} must be one token id; picogpt.hf takes no lists of them")
        if do_sample and not temperature > 0:
            raise PicogptError(f"temperature must be > 0 when sampling, not {temperature}")
        eos = self.config.eos_token_id if eos_token_id is None else int(eos_token_id)
        pad = eos if pad_token_id is None else int(pad_token_id)
        if attention_mask is None and pad != eos and (ids == pad).any():  # Hugging Face's guess: pads are padding
            attention_mask = (ids != pad).astype(np.int64)
        n_pad = _left_padding(attention_mask, ids.shape)
        prompt_len = ids.shape[1]
        if max_new_tokens is None:
            max_new_tokens = (20 if max_length is None else max_length) - prompt_len
        if max_new_tokens < 1:
            raise PicogptError(f"nothing to generate: the prompt has {prompt_len} tokens and max_length is "
                               f"{max_length or 20}; give max_new_tokens")
        if num_beams > 1:
            fill = pad or eos  # Hugging Face's beam search fills with `pad or eos`: a pad id of 0 counts as none
            if do_sample:
                raise PicogptError("beam sampling (num_beams > 1 with do_sample=True) is not supported by picogpt.hf")
            prompts = [row[p:].tolist() for row, p in zip(ids, n_pad)]
            beams = beam_search(self.model, prompts, max_new_tokens, num_beams, length_penalty, early_stopping,
                                num_return_sequences, eos, repetition_penalty, no_repeat_ngram_size, min_new_tokens,
                                pad_token_id=pad, ngrams_count_padding=True, output_scores=output_scores)
            new = [seq for per_prompt in beams.sequences for seq in per_prompt]
            rows = np.repeat(ids, num_return_sequences, axis=0)
            scores, sequences_scores = beams.step_scores, beams.scores.reshape(-1)
        else:
            if num_return_sequences > 1 and not do_sample:
                raise PicogptError("num_return_sequences > 1 needs do_sample=True or num_beams >= "
                                   "num_return_sequences")
            fill, sequences_scores = pad, None
            rows, n_pad = np.repeat(ids, num_return_sequences, axis=0), np.repeat(n_pad, num_return_sequences)
            check_fits(self.model, prompt_len, max_new_tokens, remedy="shorten the prompt or lower max_new_tokens")
            if output_scores:  # every step's scores kept to the end: more than the loop itself checks for
                check_memory(self.model.hparams, len(rows), prompt_len, max_new_tokens, kept_scores=max_new_tokens)
            # Hugging Face's `_sample`: its processors, then (sampling) its warpers, in picogpt's one loop; its
            # n-gram ban sees the caller's padding. A row that produced EOS gets `pad` after it.
            sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p) if do_sample else {}
            new, scores = [[] for _ in rows], []
            for step in decode_padded(self.model, rows, n_pad, max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                      seed=seed, repetition_penalty=repetition_penalty,
                                      no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens,
                                      ngrams_count_padding=True, **sampling):
                for row, token in zip(new, step.ids.tolist()):
                    row.append(token)
                if output_scores:
                    scores.append(step.scores)
        width = max(len(seq) for seq in new)
        sequences = np.concatenate([rows, np.array([seq + [fill] * (width - len(seq)) for seq in new],
                                                   dtype=np.int64).reshape(len(new), width)], axis=1)
        if not return_dict_in_generate:
            return _out(sequences, as_torch)
        return ModelOutput(sequences=_out(sequences, as_torch),
                           scores=tuple(_out(s, as_torch) for s in scores) if output_scores else None,
                           sequences_scores=_out(sequences_scores, as_torch) if output_scores else None)


GENERATE_ARGUMENTS = ("input_ids", "attention_mask", "max_new_tokens", "max_length", "min_new_tokens", "do_sample",
                      "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
                      "length_penalty", "early_stopping", "num_return_sequences", "eos_token_id", "pad_token_id",
                      "output_scores", "return_dict_in_generate", "seed")
