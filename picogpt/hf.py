"""A drop-in for Hugging Face transformers' GPT2LMHeadModel, computed by picogpt, with no PyTorch needed.

    from picogpt.hf import GPT2LMHeadModel        # instead of: from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("path/to/hf-folder")   # or a model.dat, "124M", "demo"
    out = model(input_ids, attention_mask=mask, use_cache=True)   # .logits, .past_key_values, ...
    loss = model(input_ids, labels=input_ids).loss                # the causal-LM loss, as in transformers
    ids = model.generate(input_ids, max_new_tokens=20, num_beams=4, length_penalty=0.5)

The rules followed are transformers 5.25's (TRANSFORMERS_VERSION): GPT2LMHeadModel.forward, and
GenerationMixin.generate with GenerationConfig's defaults, for the arguments listed in `generate`; any
other argument is refused in one sentence, never ignored. As there: without max_new_tokens or
max_length, generate makes up to 20 *new* tokens (fewer where the model's context ends first); an
argument passed as None takes its default, except top_k=None, which keeps every token; top_k=0,
top_p >= 1, no_repeat_ngram_size <= 0 and min_new_tokens <= 0 mean none; top_p=0 keeps only the
likeliest token; sampling-only arguments are checked only when sampling, length_penalty only with beams.
Every argument, the inputs, the context and the memory are checked before any work, each fault in one
sentence (PicogptError), where transformers would raise a TypeError from deep inside, run out of the
context after the work, or compute on NaN.

Inputs may be lists, NumPy arrays or torch tensors; outputs are NumPy arrays, or torch tensors when a
torch tensor came in (torch is imported only then). Padding is on the left, as Hugging Face wants for
generation. Greedy search and sampling are picogpt.generate's decoding loop, beam search is
picogpt.beam's, both with picogpt.sampling's processors, and the loss is picogpt.scoring's
log-probabilities: this module maps arguments and shapes, with no decoding or math of its own.
"""

import json
import math
import numbers
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import bfloat16, store
from .beam import beam_search
from .errors import PicogptError, plural
from .generate import check_fits, decode_padded
from .hints import picogpt_command
from .memory import check_memory
from .scoring import token_log_probs
from .tensors import hf_to_model_dat_name, is_matrix
from .tokenizer import EOT
from .trace import collect

TRANSFORMERS_VERSION = "5.25"  # the transformers whose rules and defaults this module follows
DEFAULT_NEW_TOKENS = 20  # GenerationConfig's max_length 20, which transformers 5.25 counts after the prompt
IGNORE_INDEX = -100  # a label the loss skips, as in transformers (PyTorch's cross_entropy's ignore_index)


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


# ---------------------------------------------------------------------------------------------------
# Inputs: arrays of token ids and masks, checked

def _shown(value):
    return repr(value) if isinstance(value, str) else str(value)


def _array(x, name, remedy):
    """(x as a NumPy array, whether it was a torch tensor); ragged rows refused in one sentence."""
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy(), True
    try:
        return np.asarray(x), False
    except ValueError:  # NumPy refuses rows of different lengths
        rows = x if hasattr(x, "__iter__") else []
        lengths = sorted({len(row) for row in rows if hasattr(row, "__len__")}, reverse=True)
        rows = f"rows of {' and '.join(map(str, lengths))} values" if len(lengths) > 1 else "rows of different lengths"
        raise PicogptError(f"{name} has {rows}; {remedy}") from None


PAD_REMEDY = ("pad them on the left to one length and give attention_mask 0 for the padding (a tokenizer does "
              "both with padding=True, padding_side='left')")


def _token_ids(x, name="input_ids", remedy=PAD_REMEDY):
    """Token ids [batch, length] int64 (one row may come as [length]) and whether they came as torch."""
    ids, as_torch = _array(x, name, remedy)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise PicogptError(f"{name} must be token ids [batch, length] (or one row [length]), not of shape "
                           f"{list(ids.shape)}")
    if ids.size == 0:
        raise PicogptError(f"{name} holds no token ids (shape {list(ids.shape)}); every row needs at least one "
                           f"(GPT-2 starts a text with <|endoftext|>, id {EOT})")
    if ids.dtype.kind not in "iu":
        raise PicogptError(f"{name} must hold integer token ids, not {ids.dtype} values (a torch tensor: .long())")
    return ids.astype(np.int64), as_torch


def _left_padding(attention_mask, shape, n_past=0):
    """n_pad [n_batch] from a mask [batch, n_past + length] of 0s then 1s (left padding); any other mask,
    or one of another shape, is refused."""
    if attention_mask is None:
        return np.zeros(shape[0], np.int64)
    mask, _ = _array(attention_mask, "attention_mask", "give one 1 or 0 for every position of input_ids")
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != tuple(shape):
        cached = f" and the {plural(n_past, 'cached position')} before them" if n_past else ""
        raise PicogptError(f"attention_mask has shape {list(mask.shape)}, not {list(shape)}: it needs a 1 (a "
                           f"token) or 0 (padding) for every position of input_ids{cached}")
    if mask.dtype.kind not in "biuf" or not np.isin(mask, (0, 1)).all():
        odd = mask.reshape(-1)[~np.isin(mask.reshape(-1), (0, 1))][0] if mask.dtype.kind in "biuf" else mask.dtype
        raise PicogptError(f"attention_mask must hold 1 (a token) and 0 (padding) only, not {_shown(odd)}")
    mask = mask.astype(bool)
    n_pad = np.where(mask.any(axis=1), mask.argmax(axis=1), mask.shape[1])
    if not np.array_equal(mask, np.arange(mask.shape[1])[None, :] >= n_pad[:, None]):
        raise PicogptError("attention_mask must be left padding (0s, then 1s, in every row): picogpt masks no other "
                           "positions")
    return n_pad.astype(np.int64)


def _out(array, as_torch):
    if array is None or not as_torch:
        return array
    import torch
    array = np.asarray(array)  # (np.ascontiguousarray would make a 0-d loss 1-d)
    return torch.from_numpy(array if array.flags.c_contiguous else np.ascontiguousarray(array))


def _causal_lm_loss(logits, labels):
    """transformers' loss for GPT2LMHeadModel (ForCausalLMLoss): the mean, over every position whose next
    label is not IGNORE_INDEX, of -log p(next label); NaN where every label is ignored, as there.
    logits [batch, length, n_vocab], labels [batch, length] (labels[:, 0] predicts nothing)."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    if not scored.any():
        return np.array(np.nan, np.float32)
    # logits[:, :-1][scored] is a copy, which token_log_probs may overwrite
    log_probs = token_log_probs(logits[:, :-1][scored], targets[scored])
    return np.array(-log_probs.mean(), np.float32)


# ---------------------------------------------------------------------------------------------------
# Arguments: transformers' names, values and defaults -> picogpt's options

def _is_whole(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def _whole(name, value, minimum, meaning=""):
    """value, refused in one sentence unless a whole number >= minimum."""
    if not (_is_whole(value) and value >= minimum):
        raise PicogptError(f"{name} must be a whole number >= {minimum}{meaning}, not {_shown(value)}")
    return int(value)


def _token_id(name, value, n_vocab):
    if value is None:
        return None
    if np.ndim(value) != 0:
        raise PicogptError(f"{name} must be one token id; picogpt.hf takes no lists of them")
    if not (_is_whole(value) and 0 <= value < n_vocab):
        raise PicogptError(f"{name} must be a token id from 0 to {n_vocab - 1}, not {_shown(value)}")
    return int(value)


def _sampling_options(temperature, top_k, top_p):
    """picogpt.sampling's temperature, top_k and top_p for transformers' warpers (TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper with min_tokens_to_keep 1), checked as they are only when sampling."""
    temperature = 1.0 if temperature is None else temperature
    if not (_is_number(temperature) and 0 < temperature < math.inf):
        raise PicogptError(f"temperature must be a finite number > 0 when sampling (do_sample=False is greedy), "
                           f"not {_shown(temperature)}")
    if top_k is not None:  # None (given as such) and 0 filter nothing, as in transformers
        top_k = _whole("top_k", top_k, 0, " (0 keeps every token)") or None
    top_p = 1.0 if top_p is None else top_p
    if not (_is_number(top_p) and top_p >= 0):
        raise PicogptError(f"top_p must be a number from 0 to 1 (1 keeps every token), not {_shown(top_p)}")
    if top_p == 0:  # transformers' TopPLogitsWarper still keeps min_tokens_to_keep = 1: the likeliest token
        top_k, top_p = 1, None
    elif top_p >= 1:  # transformers adds no TopPLogitsWarper
        top_p = None
    return dict(temperature=float(temperature), top_k=top_k, top_p=top_p)


def _new_tokens(max_new_tokens, max_length, prompt_len, n_ctx):
    """How many tokens generate makes, by transformers 5.25's rules (_prepare_generated_length and
    _validate_generated_length): max_new_tokens; else max_length less the prompt (padding included);
    else 20 after the prompt, ending at the context (max_position_embeddings) if it ends first."""
    if max_new_tokens is not None:
        return _whole("max_new_tokens", max_new_tokens, 1)
    if max_length is not None:
        max_length = _whole("max_length", max_length, 1, " (it counts the prompt's tokens too)")
        if prompt_len >= max_length:
            raise PicogptError(f"the prompt has {prompt_len} tokens and max_length, which counts them too, is "
                               f"{max_length}: nothing is left to generate; raise max_length or give max_new_tokens")
        return max_length - prompt_len
    if prompt_len >= n_ctx:
        raise PicogptError(f"the prompt has {prompt_len} tokens, the model's whole context of {n_ctx}, so nothing "
                           f"can be generated after it; shorten the prompt")
    return min(prompt_len + DEFAULT_NEW_TOKENS, n_ctx) - prompt_len


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders: converted once to a model.dat cached beside the weights

def _cache_differs(folder, cached):
    """Why the model.dat cached in a Hugging Face folder does not hold the folder's weights, or None where
    it does: "stale" (older than the weights, damaged, or other hyper-parameters or values: convert
    again), "bf16" (values rounded to bfloat16, as `picogpt convert-hf --dtype bf16` writes them) or "int8"
    (quantized, as `--dtype int8` writes them).

    The values compared are a sample read in milliseconds: every bias, gain and the position embedding
    whole, and the first row of every weight matrix, each widened to float32 on both sides."""
    from .convert_hf import Shard, read_config, weight_files
    from .modelfile import open_model_file
    if any(p.stat().st_mtime > cached.stat().st_mtime for p in folder.glob("*.safetensors*")):
        return "stale"
    try:
        cache = open_model_file(cached)
    except PicogptError:
        return "stale"
    if cache.hparams != read_config(folder)[0]:
        return "stale"
    if cache.weight_dtype == "int8":  # the user's quantized copy: never compared value by value, never replaced
        return "int8"
    with ExitStack() as stack:
        for path in weight_files(folder)[0]:
            shard = Shard(path, stack)
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
    if why == "int8":
        raise PicogptError(
            f"{cached} holds {folder}'s weights quantized to int8 (as picogpt convert-hf --dtype int8 writes "
            f"them), so its logits would differ from transformers' on the folder; load that file as it is with "
            f"from_pretrained('{cached}'), or replace it with the folder's own weights: "
            f"{picogpt_command('convert-hf', folder)}")
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


# ---------------------------------------------------------------------------------------------------
# The model

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
                                 max_position_embeddings=h["n_ctx"], layer_norm_epsilon=h["layer_norm_epsilon"],
                                 **tokens)

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
                output_hidden_states=False, output_attentions=False, position_ids=None, return_dict=True,
                labels=None):
        """Logits [batch, seq, vocab] of every position (and, as asked, past_key_values, hidden_states:
        n_layer + 1 arrays [batch, seq, n_embd], attentions: n_layer arrays [batch, n_head, seq, past + seq]);
        with labels [batch, seq], .loss first, as transformers computes it (the next token's cross-entropy,
        labels of -100 skipped, the mean over the rest).

        At left padding (attention_mask 0) the values are not transformers': there a padding position
        attends to itself alone, while transformers' rows of padding attend evenly to every position
        (eager attention) or otherwise (sdpa); real positions agree, and padding's values mean nothing."""
        ids, as_torch = _token_ids(input_ids)
        past = past_key_values
        if past is not None and not isinstance(past, PastKeyValues):
            raise PicogptError("past_key_values must be what this model returned with use_cache=True")
        if past is not None and attention_mask is None and past.n_pad.any():
            raise PicogptError("the cached rows have left padding: pass the attention_mask (padding and all "
                               "positions since) with past_key_values")
        n_past = past.cache.length if past is not None else 0
        n_pad = _left_padding(attention_mask, (ids.shape[0], n_past + ids.shape[1]), n_past)
        if past is not None and attention_mask is not None and not np.array_equal(n_pad, past.n_pad):
            raise PicogptError("attention_mask must keep the padding the cached positions had")
        n_pad = past.n_pad if past is not None else n_pad
        if labels is not None:
            labels, _ = _token_ids(labels, "labels", "pad them to input_ids' length with -100, which the loss skips")
            if labels.shape != ids.shape:
                raise PicogptError(f"labels has shape {list(labels.shape)}, not input_ids' {list(ids.shape)}: one "
                                   f"label per token (-100 where the loss should skip it)")
            n_vocab = self.config.vocab_size
            bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n_vocab))]
            if bad.size:
                raise PicogptError(f"labels must be token ids from 0 to {n_vocab - 1}, or {IGNORE_INDEX} for a "
                                   f"position the loss skips, not {bad[0]}")
        # Before any work, as every path: the logits of every position are [batch, seq, n_vocab] float32 (kept
        # scores, in memory.py's terms), besides the cache and the activations.
        check_memory(self.model.hparams, len(ids), n_past + ids.shape[1], 0, use_cache or past is not None,
                     kept_scores=ids.shape[1], remedy="give fewer rows or a shorter input at once")
        cache = past.cache if past is not None else (self.model.new_cache(len(ids)) if use_cache else None)
        # As in Hugging Face: positions count from the first token of the row, padding included, unless given.
        if position_ids is None:
            positions = (n_past + np.arange(ids.shape[1]))[None]
        else:
            positions = _token_ids(position_ids, "position_ids", "give one position per token")[0]
        if output_hidden_states or output_attentions:
            got = collect(self.model, ids, n_pad=n_pad, all_logits=True, cache=cache, positions=positions)
            logits, hidden, attentions = got.logits, got.hidden_states, got.attentions
        else:
            logits = self.model(ids, cache=cache, n_pad=n_pad, all_logits=True, positions=positions)
            hidden = attentions = None
        output = ModelOutput(
            loss=_out(_causal_lm_loss(logits, labels), as_torch) if labels is not None else None,
            logits=_out(logits, as_torch),
            past_key_values=PastKeyValues(cache, n_pad) if use_cache or past is not None else None,
            hidden_states=tuple(_out(h, as_torch) for h in hidden) if output_hidden_states else None,
            attentions=tuple(_out(a, as_torch) for a in attentions) if output_attentions else None)
        return output if return_dict else output.to_tuple()

    __call__ = forward

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, max_length=None, min_new_tokens=None,
                 do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
                 no_repeat_ngram_size=0, num_beams=1, length_penalty=1.0, early_stopping=False,
                 num_return_sequences=1, eos_token_id=None, pad_token_id=None, output_scores=False,
                 return_dict_in_generate=False, seed=None, **unsupported):
        """Hugging Face's generate for these arguments, with transformers 5.25's defaults and rules (see the
        module's docstring; seed: picogpt's sampling seed, which torch's random numbers cannot be). Returns
        the prompts (as given, padding included) followed by the new tokens, rows that ended early filled
        with pad_token_id (Hugging Face's `pad_token_id or eos_token_id`); with return_dict_in_generate,
        .sequences, .scores (output_scores: the processed scores of each step) and .sequences_scores
        (beam search). Everything is checked before any work: the arguments, the context, the memory."""
        if unsupported:
            name = sorted(unsupported)[0]
            raise PicogptError(f"generate() argument {name!r} is not supported by picogpt.hf; it takes "
                               f"{', '.join(GENERATE_ARGUMENTS)}")
        ids, as_torch = _token_ids(input_ids)
        n_vocab, n_ctx = self.config.vocab_size, self.config.n_positions

        # The arguments, as transformers takes them (None: the default), before anything else.
        if do_sample not in (None, True, False):
            raise PicogptError(f"do_sample must be True or False, not {_shown(do_sample)}")
        do_sample = bool(do_sample)
        num_beams = _whole("num_beams", 1 if num_beams is None else num_beams, 1)
        num_return_sequences = _whole("num_return_sequences", 1 if num_return_sequences is None
                                      else num_return_sequences, 1)
        if early_stopping not in (None, True, False, "never"):
            raise PicogptError(f"early_stopping must be True, False or 'never', not {_shown(early_stopping)}")
        early_stopping = early_stopping or False
        repetition_penalty = 1.0 if repetition_penalty is None else repetition_penalty
        if not (_is_number(repetition_penalty) and 0 < repetition_penalty < math.inf):
            raise PicogptError(f"repetition_penalty must be a finite number > 0 (1.0 is none), not "
                               f"{_shown(repetition_penalty)}")
        rules = {}
        for name, value in (("no_repeat_ngram_size", no_repeat_ngram_size), ("min_new_tokens", min_new_tokens)):
            if value is not None and not _is_whole(value):
                raise PicogptError(f"{name} must be a whole number (0 is none), not {_shown(value)}")
            rules[name] = max(int(value or 0), 0)  # transformers adds no processor for 0 or less
        if num_beams > 1:
            if do_sample:
                raise PicogptError("beam sampling (num_beams > 1 with do_sample=True) is not supported by picogpt.hf")
            length_penalty = 1.0 if length_penalty is None else length_penalty
            if not (_is_number(length_penalty) and math.isfinite(length_penalty)):
                raise PicogptError(f"length_penalty must be a finite number (1.0 divides a beam's score by its "
                                   f"length), not {_shown(length_penalty)}")
            if num_return_sequences > num_beams:
                raise PicogptError(f"num_return_sequences ({num_return_sequences}) must be at most num_beams "
                                   f"({num_beams})")
        elif num_return_sequences > 1 and not do_sample:
            raise PicogptError("num_return_sequences > 1 needs do_sample=True or num_beams >= num_return_sequences")
        sampling = _sampling_options(temperature, top_k, top_p) if do_sample else {}
        eos = _token_id("eos_token_id", eos_token_id, n_vocab)
        pad = _token_id("pad_token_id", pad_token_id, n_vocab)
        eos = self.config.eos_token_id if eos is None else eos
        pad = eos if pad is None else pad
        if seed is not None and not hasattr(seed, "random"):
            _whole("seed", seed, 0)

        # The inputs and the lengths, then the context: all before any work.
        if attention_mask is None and pad != eos and (ids == pad).any():  # Hugging Face's guess: pads are padding
            attention_mask = (ids != pad).astype(np.int64)
        n_pad = _left_padding(attention_mask, ids.shape)
        prompt_len = ids.shape[1]
        n_new = _new_tokens(max_new_tokens, max_length, prompt_len, n_ctx)
        check_fits(self.model, prompt_len, n_new, remedy="shorten the prompt or ask for fewer new tokens")

        if num_beams > 1:
            fill = pad or eos  # Hugging Face's beam search fills with `pad or eos`: a pad id of 0 counts as none
            prompts = [row[p:].tolist() for row, p in zip(ids, n_pad)]
            beams = beam_search(self.model, prompts, n_new, num_beams, length_penalty, early_stopping,
                                num_return_sequences, eos, repetition_penalty, pad_token_id=pad,
                                ngrams_count_padding=True, output_scores=output_scores, **rules)
            new = [seq for per_prompt in beams.sequences for seq in per_prompt]
            rows = np.repeat(ids, num_return_sequences, axis=0)
            scores, sequences_scores = beams.step_scores, beams.scores.reshape(-1)
        else:
            fill, sequences_scores = pad, None
            rows, n_pad = np.repeat(ids, num_return_sequences, axis=0), np.repeat(n_pad, num_return_sequences)
            if output_scores:  # every step's scores kept to the end: more than the loop itself checks for
                check_memory(self.model.hparams, len(rows), prompt_len, n_new, kept_scores=n_new)
            # Hugging Face's `_sample`: its processors, then (sampling) its warpers, in picogpt's one loop; its
            # n-gram ban sees the caller's padding. A row that produced EOS gets `pad` after it.
            new, scores = [[] for _ in rows], []
            for step in decode_padded(self.model, rows, n_pad, n_new, eos_token_id=eos, pad_token_id=pad,
                                      seed=seed, repetition_penalty=repetition_penalty, ngrams_count_padding=True,
                                      **rules, **sampling):
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
