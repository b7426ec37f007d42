"""Hugging Face GPT-2 checkpoints (config.json + safetensors) -> model.dat, with numpy and safetensors only.

A Hugging Face model folder (gpt2, gpt2-medium/large/xl, distilgpt2, or a fine-tune of one) holds
config.json, the weights as model.safetensors (or shards named by model.safetensors.index.json) and
usually the tokenizer. The state-dict names are OpenAI's with dots: `transformer.h.3.attn.c_attn.weight`
(or `h.3.attn.c_attn.weight`, as GPT2Model and the older hub files save them) is model.dat's
`h3/attn/c_attn/w`. HF's Conv1D keeps linear weights as [n_in, n_out], model.dat's layout, so values are
copied unchanged; `lm_head.weight`, where saved at all, is the token embedding again (tied); the
`attn.bias` / `attn.masked_bias` causal-mask buffers of older files are not weights and are skipped.

Only a model picogpt computes exactly is converted: config.json must describe plain GPT-2 (no
cross-attention, no per-layer attention scaling, the tanh GELU, GPT-2's vocabulary of 50257 tokens)
and any tokenizer files in the folder must be GPT-2's, since picogpt's tokenizer is GPT-2's. Anything
else is refused with one sentence, before model.dat is created: never a silently different model.

Tensors are read one at a time through safetensors' NumPy API and written straight into model.dat.
float16 and bfloat16 weights are widened to float32 exactly. (safetensors' NumPy API cannot return
bfloat16, which NumPy lacks, so those tensors are read from the file directly: a bfloat16 is the high
half of a float32.) PyTorch pickles (pytorch_model.bin) are never opened: unpickling runs code.
"""

import hashlib
import json
import math
import struct
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .errors import PicogptError, first_line
from .hints import install_command, picogpt_command
from .modelfile import ModelFileWriter
from .tensors import HF_LM_HEAD as LM_HEAD
from .tensors import HF_PREFIX as PREFIX
from .tensors import check_hparams, gpt2_tensor_specs, hf_to_model_dat_name, is_hf_mask_buffer, model_dat_to_hf_name
from .tokenizer import EOT, N_VOCAB, VOCABULARY_SHA256, vocabulary_file

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TO_SAFETENSORS = ("python -c \"from transformers import GPT2LMHeadModel as M; "
                  "M.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)\"")

# ---------------------------------------------------------------------------------------------------
# config.json -> hparams

# GPT2Config's defaults, which transformers uses for a key config.json leaves out.
_CONFIG_DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
    "add_cross_attention": False, "tie_word_embeddings": True,
}
# GPT2Config.attribute_map: config.json may use the generic name instead.
_CONFIG_ALIASES = {"n_embd": "hidden_size", "n_positions": "max_position_embeddings",
                   "n_head": "num_attention_heads", "n_layer": "num_hidden_layers"}
# transformers' names for GELU's tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))), the
# function picogpt's `gelu` computes and GPT-2 was trained with. They are one formula written in
# different orders (gelu_pytorch_tanh is PyTorch's fused kernel): in float32 each differs from picogpt's
# gelu by at most 4.8e-7 on [-12, 12], a rounding or two, exactly as much as gelu_new itself does, while
# the erf GELU ("gelu") differs by up to 4.7e-4 and is refused, as are relu, silu, quick_gelu, ...
TANH_GELU = frozenset({"gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast", "gelu_accurate"})
# Flags that change the computation, with the only value picogpt computes, and what the other value does.
_EXACT_FLAGS = {
    "scale_attn_weights": (True, "attention scores not divided by sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "attention scores also divided by the layer's number"),
    "reorder_and_upcast_attn": (False, "attention computed in a different order and precision"),
    "add_cross_attention": (False, "cross-attention layers, as in an encoder-decoder's decoder"),
}


def _config_value(config, key):
    if key in config:
        return config[key]
    alias = _CONFIG_ALIASES.get(key)
    if alias in config:
        return config[alias]
    return _CONFIG_DEFAULTS[key]


def read_config(folder):
    """config.json -> (model.dat hparams, config dict), refusing any model picogpt cannot run exactly."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PicogptError(f"{folder} has no config.json; a Hugging Face model folder holds it beside "
                           f"model.safetensors, download it too") from None
    except (OSError, ValueError) as e:
        raise PicogptError(f"cannot read {path}: {e}; download it again") from None
    if not isinstance(config, dict):
        raise PicogptError(f"{path} is not a JSON object; download it again")

    cannot = "picogpt computes GPT-2 only and cannot run this model exactly"
    if config.get("model_type") != "gpt2":
        raise PicogptError(f"{path}: model_type is {config.get('model_type')!r}, not 'gpt2'; {cannot}")
    if "quantization_config" in config:
        raise PicogptError(f"{path}: the weights are quantized (quantization_config); picogpt imports float32, "
                           f"float16 and bfloat16 weights only")
    activation = _config_value(config, "activation_function")
    if activation not in TANH_GELU:
        raise PicogptError(f"{path}: activation_function is {activation!r}, not GPT-2's tanh GELU "
                           f"('gelu_new'); {cannot}")
    for flag, (expected, meaning) in _EXACT_FLAGS.items():
        value = _config_value(config, flag)
        if value is not expected:
            raise PicogptError(f"{path}: {flag} is {json.dumps(value)} ({meaning}); {cannot}")

    spelled = {"n_vocab": "vocab_size", "n_ctx": "n_positions", "n_embd": "n_embd", "n_head": "n_head",
               "n_layer": "n_layer"}
    hparams = {ours: _config_value(config, key) for ours, key in spelled.items()}
    hparams["layer_norm_epsilon"] = _config_value(config, "layer_norm_epsilon")
    hparams = check_hparams(hparams, str(path), "download it again", names=spelled)
    if hparams["n_vocab"] != N_VOCAB:
        raise PicogptError(f"{path}: vocab_size is {hparams['n_vocab']}, not GPT-2's {N_VOCAB}; picogpt's "
                           f"tokenizer is GPT-2's, so it cannot run a model with another vocabulary")
    n_inner = _config_value(config, "n_inner")
    if n_inner is not None and n_inner != 4 * hparams["n_embd"]:
        raise PicogptError(f"{path}: n_inner is {n_inner!r}, not 4 * n_embd = {4 * hparams['n_embd']} "
                           f"(GPT-2's MLP width); {cannot}")
    return hparams, config


# ---------------------------------------------------------------------------------------------------
# Tokenizer files: picogpt's tokenizer is GPT-2's, so the model's must be too.

EOT_TOKEN = ("<|endoftext|>", EOT)


def _parse_merges(text):
    """merges.txt / vocab.bpe -> [(left, right), ...]; a "#version" first line and empty lines are skipped."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split(" ")) for line in lines if line]


def _load_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PicogptError(f"cannot read {path}: {first_line(e)}; download it again or delete it") from None


class _GPT2Tokenizer:
    """GPT-2's vocabulary and merges, read from data/gpt2 only when a folder's tokenizer must be compared."""

    def __init__(self):
        self._vocab = self._merges = None

    def check_vocab(self, path, theirs):
        if self._vocab is None:
            self._vocab = json.loads(vocabulary_file("encoder.json"))
        if theirs != self._vocab:
            size = len(theirs) if isinstance(theirs, (dict, list)) else "no"
            raise _not_gpt2s(path, f"the vocabulary ({size} tokens) differs from GPT-2's ({N_VOCAB})")

    def check_merges(self, path, theirs):
        if self._merges is None:
            self._merges = _parse_merges(vocabulary_file("vocab.bpe").decode("utf-8"))
        if theirs != self._merges:
            raise _not_gpt2s(path, f"the BPE merges ({len(theirs)}) differ from GPT-2's ({len(self._merges)})")


def _not_gpt2s(path, what):
    return PicogptError(f"{path}: {what}, so this model's tokenizer is not GPT-2's; picogpt tokenizes with "
                        f"GPT-2's vocabulary only and would feed this model the wrong token ids")


def check_tokenizer(folder):
    """Refuse a folder whose vocab.json, merges.txt, tokenizer.json or added_tokens.json is not GPT-2's.

    vocab.json is compared with data/gpt2/encoder.json as a parsed mapping (HF's copy is formatted
    differently), merges.txt with vocab.bpe line by line, and tokenizer.json's model.vocab and
    model.merges ("a b" strings or [a, b] pairs) with both. Added tokens other than <|endoftext|> (50256)
    are refused: picogpt's tokenizer would split them into ordinary text.
    """
    folder = Path(folder)
    gpt2 = _GPT2Tokenizer()
    if (path := folder / "vocab.json").is_file():
        gpt2.check_vocab(path, _load_json(path))
    if (path := folder / "merges.txt").is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != VOCABULARY_SHA256["vocab.bpe"]:  # byte-identical to vocab.bpe is the usual case
            try:
                gpt2.check_merges(path, _parse_merges(data.decode("utf-8")))
            except UnicodeDecodeError:
                raise _not_gpt2s(path, "it is not UTF-8 text") from None
    if (path := folder / "tokenizer.json").is_file():
        tokenizer = _load_json(path)
        model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("merges"), list):
            raise _not_gpt2s(path, "it does not describe a BPE tokenizer")
        gpt2.check_vocab(path, model.get("vocab"))
        gpt2.check_merges(path, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]])
        for token in tokenizer.get("added_tokens") or []:
            content = token.get("content") if isinstance(token, dict) else token
            if not isinstance(token, dict) or (content, token.get("id")) != EOT_TOKEN:
                raise _not_gpt2s(path, f"it adds the token {content!r}")
    if (path := folder / "added_tokens.json").is_file():
        added = _load_json(path)
        extra = [k for k, v in added.items() if (k, v) != EOT_TOKEN] if isinstance(added, dict) else [added]
        if extra:
            raise _not_gpt2s(path, f"it adds the token {extra[0]!r}")


# ---------------------------------------------------------------------------------------------------
# Weights

def _import_safetensors():
    try:
        from safetensors import safe_open
    except ImportError:
        raise PicogptError(f"reading Hugging Face checkpoints needs safetensors, which is not installed: "
                           f"{install_command('hf')}") from None
    return safe_open


class Shard:
    """One open .safetensors file: safetensors' NumPy reader, plus our own read of bfloat16 tensors."""

    def __init__(self, path, stack):
        self.path = path
        try:
            self.reader = stack.enter_context(_import_safetensors()(str(path), framework="np"))
            self.names = list(self.reader.keys())
        except Exception as e:  # SafetensorError, OSError: a damaged, truncated or foreign file
            raise PicogptError(f"cannot read {path}: {first_line(e)}; the file is damaged or incomplete, "
                               f"download it again") from None
        self._header = None

    def dtype_and_shape(self, name):
        piece = self.reader.get_slice(name)
        return piece.get_dtype(), tuple(piece.get_shape())

    def read(self, name, rows=None):
        """The tensor (or rows start:stop of it) as float32; float16 and bfloat16 are widened exactly."""
        dtype, shape = self.dtype_and_shape(name)
        if dtype == "BF16":
            return self._read_bfloat16(name, shape, rows)
        array = self.reader.get_tensor(name) if rows is None else self.reader.get_slice(name)[slice(*rows)]
        return array if array.dtype == np.float32 else array.astype(np.float32)

    def _read_bfloat16(self, name, shape, rows):
        # safetensors' NumPy API refuses bfloat16 ("data type 'bfloat16' not understood"), so read the bytes
        # ourselves. The format: an 8-byte little-endian header length N, N bytes of JSON giving each
        # tensor's dtype, shape and [begin, end) byte offsets counted from the end of the header, the data.
        if self._header is None:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._header = (8 + n, json.loads(f.read(n)))
        data_start, header = self._header
        begin, end = header[name]["data_offsets"]
        if end - begin != 2 * math.prod(shape):
            raise PicogptError(f"{self.path}: tensor {name} has {end - begin} bytes, not {2 * math.prod(shape)} for "
                               f"bfloat16 {list(shape)}; the file is damaged, download it again")
        start, stop = rows if rows is not None else (0, shape[0])
        row = math.prod(shape[1:])
        raw = np.fromfile(self.path, dtype="<u2", count=(stop - start) * row,
                          offset=data_start + begin + 2 * start * row)
        # A bfloat16 is the top 16 bits of the float32 with the same value: widening is exact.
        return (raw.astype("<u4") << 16).view("<f4").reshape(stop - start, *shape[1:])


def weight_files(folder):
    """The safetensors files to read and the index's {tensor name: file name} (None for one file)."""
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS], None
    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise PicogptError(f"cannot read {index_path}: {first_line(e)}; download it again") from None
        for name in files:
            if not isinstance(name, str) or Path(name).name != name:
                raise PicogptError(f"{index_path} names the shard {name!r}, which is not a file name in the folder; "
                                   f"download it again")
            if not (folder / name).is_file():
                raise PicogptError(f"{folder} lacks {name}, a shard listed in {SAFETENSORS_INDEX}; download it")
        return [folder / name for name in files], weight_map

    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    shards = [n for n in present if n.endswith(".safetensors")]
    pickles = [n for n in present if n.endswith(PICKLE_SUFFIXES)]
    if shards:
        raise PicogptError(f"{folder} holds {shards[0]} but neither {SAFETENSORS} nor {SAFETENSORS_INDEX}; "
                           f"download the index file that lists the shards")
    if pickles:
        raise PicogptError(f"{folder} holds PyTorch pickle weights ({pickles[0]}), which picogpt never opens "
                           f"(unpickling runs code); convert them to safetensors first: "
                           f"{TO_SAFETENSORS.format(folder=folder)}")
    if (folder / "hparams.json").is_file() and any(n.endswith(".ckpt.index") for n in present):
        raise PicogptError(f"{folder} holds an OpenAI TensorFlow checkpoint, not a Hugging Face model; "
                           f"convert it with: {picogpt_command('convert-tf', '--checkpoint-dir', folder)}")
    others = [n for n in present if n.endswith((".h5", ".msgpack", ".gguf", ".onnx"))]
    raise PicogptError(f"{folder} has no {SAFETENSORS}" + (f" (only {others[0]}, which picogpt does not read)"
                       if others else "") + "; download the model's config.json and model.safetensors into it")


def convert_hf_checkpoint(folder, out_path, weight_dtype="f32"):
    """Convert the Hugging Face GPT-2 model folder `folder` to model.dat at `out_path`; return its hparams.

    Everything is checked before model.dat is created: config.json, the tokenizer files, and every
    tensor's name, dtype and shape. A refused folder raises PicogptError and leaves no file.
    """
    folder = Path(folder)
    _import_safetensors()
    if not folder.is_dir():
        raise PicogptError(f"{folder} is not a folder; give the Hugging Face model folder that holds "
                           f"config.json and model.safetensors")
    files, weight_map = weight_files(folder)
    hparams, config = read_config(folder)
    check_tokenizer(folder)
    specs = gpt2_tensor_specs(hparams)
    config_says = (f"config.json (n_layer {hparams['n_layer']}, n_embd {hparams['n_embd']}, "
                   f"n_positions {hparams['n_ctx']})")

    with ExitStack() as stack:
        found = {}  # model.dat name -> (shard, HF name)
        lm_head = None
        seen = set()
        for path in files:
            shard = Shard(path, stack)
            seen.update(shard.names)
            for name in shard.names:
                if weight_map is not None and weight_map.get(name) != path.name:
                    raise PicogptError(f"{path.name} holds {name}, which {SAFETENSORS_INDEX} does not list there; "
                                       f"the shards and the index are from different downloads")
                ours = hf_to_model_dat_name(name)
                if name == LM_HEAD:
                    lm_head = (shard, name)
                elif is_hf_mask_buffer(name):
                    continue
                elif ours is None:
                    raise PicogptError(f"{path} holds the tensor {name}, which is not part of a GPT-2 language model; "
                                       f"picogpt cannot run this model exactly")
                elif ours not in specs:
                    raise PicogptError(f"{path} holds {name}, which {config_says} does not account for; "
                                       f"the weights and config.json do not belong together")
                elif ours in found:
                    raise PicogptError(f"{folder} holds both {found[ours][1]} and {name}, two copies of one "
                                       f"weight; the checkpoint is inconsistent")
                else:
                    found[ours] = (shard, name)
        if weight_map is not None and set(weight_map) - seen:
            name = sorted(set(weight_map) - seen)[0]
            raise PicogptError(f"{SAFETENSORS_INDEX} lists {name} in {weight_map[name]}, which does not hold it; "
                               f"download the shards again")

        # Names, dtypes and shapes, all before anything is written.
        prefix = PREFIX if any(name.startswith(PREFIX) for _, name in found.values()) else ""
        for ours, (shape, _) in specs.items():
            if ours not in found:
                raise PicogptError(f"{folder} has no tensor {model_dat_to_hf_name(ours, prefix)}, which {config_says} "
                                   f"needs; the checkpoint is incomplete or does not match its config.json")
            _check_tensor(*found[ours], shape, config_says)
        if lm_head is not None:
            _check_tensor(*lm_head, specs["wte"][0], config_says)
            _check_tied(*lm_head, *found["wte"], hparams["n_vocab"])
        elif _config_value(config, "tie_word_embeddings") is not True:
            raise PicogptError(f"{folder}/config.json sets tie_word_embeddings false but the checkpoint has no "
                               f"{LM_HEAD}; the output layer is missing, download the complete model")

        with ModelFileWriter(out_path, hparams, weight_dtype) as out:
            for ours in specs:
                shard, name = found[ours]
                out.write(ours, shard.read(name))
    return hparams


FLOAT_DTYPES = {"F32", "F16", "BF16"}


def _check_tensor(shard, name, shape, config_says):
    dtype, stored = shard.dtype_and_shape(name)
    if dtype not in FLOAT_DTYPES:
        hint = ("float32 cannot hold float64 exactly; save the model in float32" if dtype == "F64"
                else "quantized or foreign weights are not GPT-2's")
        raise PicogptError(f"{shard.path}: tensor {name} is stored as {dtype}, and picogpt imports float32, "
                           f"float16 and bfloat16 weights only ({hint})")
    if stored != shape:
        raise PicogptError(f"{shard.path}: tensor {name} is {list(stored)} but {config_says} says {list(shape)}; "
                           f"the weights and config.json do not belong together")


def _check_tied(head_shard, head_name, wte_shard, wte_name, n_vocab, rows=8192):
    """Refuse an lm_head.weight that is not exactly the token embedding, comparing a few MB at a time."""
    for start in range(0, n_vocab, rows):
        span = (start, min(start + rows, n_vocab))
        if not np.array_equal(head_shard.read(head_name, span), wte_shard.read(wte_name, span), equal_nan=True):
            raise PicogptError(f"{head_shard.path}: {head_name} differs from the token embedding {wte_name}; "
                               f"picogpt's output layer is the token embedding (tied, as in GPT-2), so it "
                               f"cannot run a model with a separate output layer exactly")
