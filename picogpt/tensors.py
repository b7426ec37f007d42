"""GPT-2's hyper-parameters and tensors: their names and shapes in model.dat, and what OpenAI's and
Hugging Face's checkpoints call them. The one place that knows them; the file format, both converters
and the PyTorch reference import them from here.

model.dat's names are OpenAI's checkpoint names without the "model/" prefix: `wte`, `wpe`,
`h0/ln_1/g`, `h0/attn/c_attn/w`, ..., `ln_f/b`. Linear weights are [n_in, n_out] everywhere (OpenAI's
conv1d kernels add a leading 1; Hugging Face's Conv1D stores [n_in, n_out] too), so values map unchanged.
"""

import re

from .errors import PicogptError

HPARAM_NAMES = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
DEFAULT_LAYER_NORM_EPSILON = 1e-5


def check_hparams(hparams, where, fix, names=None):
    """Validate a hyper-parameter dict; return a clean copy (the five sizes and layer_norm_epsilon).

    where: the file they came from, for the message; fix: what the user should do about a bad value;
    names: how the source spells each of HPARAM_NAMES, if not so (e.g. Hugging Face's "vocab_size").
    """
    names = names or {}
    if not isinstance(hparams, dict):
        raise PicogptError(f"{where}: hyper-parameters are not a JSON object; {fix}")
    clean = {}
    for name in HPARAM_NAMES:
        value = hparams.get(name)
        if type(value) is not int or value <= 0:
            raise PicogptError(f"{where}: {names.get(name, 'hyper-parameter ' + name)} is {value!r}, not a "
                               f"positive whole number; {fix}")
        clean[name] = value
    eps = hparams.get("layer_norm_epsilon", DEFAULT_LAYER_NORM_EPSILON)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise PicogptError(f"{where}: layer_norm_epsilon is {eps!r}, not a small positive number; {fix}")
    clean["layer_norm_epsilon"] = float(eps)
    if clean["n_embd"] % clean["n_head"]:
        raise PicogptError(f"{where}: n_embd {clean['n_embd']} is not a multiple of n_head "
                           f"{clean['n_head']}; {fix}")
    return clean


def is_matrix(name):
    """Whether a model.dat tensor is a weight matrix the model multiplies by (`wte`, every `.../w`):
    the tensors a bfloat16 model.dat stores in bfloat16. Layer norms, biases and `wpe` stay float32."""
    return name == "wte" or name.endswith("/w")


def output_axis(name):
    """The axis of a weight matrix's output units: a linear layer's [n_in, n_out] columns (1), `wte`'s rows (0,
    one per token: the output projection multiplies by wte.T). An int8 matrix's scales run along it."""
    return 0 if name == "wte" else 1


def gpt2_tensor_specs(hparams):
    """{name: (shape, order)} of every tensor a GPT-2 model.dat holds, in file order.

    order is the layout on disk: "C" (row-major) for all but `wte`, which is kept column-major so that
    the output projection `x @ wte.T` reads a contiguous [n_embd, n_vocab] matrix (see modelfile.py).
    """
    V, C, E = hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"]
    specs = {"wte": ((V, E), "F"), "wpe": ((C, E), "C")}
    for i in range(hparams["n_layer"]):
        for name, shape in [
            ("ln_1/g", (E,)), ("ln_1/b", (E,)),
            ("attn/c_attn/w", (E, 3 * E)), ("attn/c_attn/b", (3 * E,)),
            ("attn/c_proj/w", (E, E)), ("attn/c_proj/b", (E,)),
            ("ln_2/g", (E,)), ("ln_2/b", (E,)),
            ("mlp/c_fc/w", (E, 4 * E)), ("mlp/c_fc/b", (4 * E,)),
            ("mlp/c_proj/w", (4 * E, E)), ("mlp/c_proj/b", (E,)),
        ]:
            specs[f"h{i}/{name}"] = (shape, "C")
    specs["ln_f/g"] = ((E,), "C")
    specs["ln_f/b"] = ((E,), "C")
    return specs


# ---------------------------------------------------------------------------------------------------
# OpenAI's TensorFlow checkpoints: "model/" + the model.dat name; linear weights are conv1d kernels.

TF_PREFIX = "model/"


def tf_shape(name, shape):
    """The shape a tensor has in OpenAI's checkpoint: linear weights ("/w") carry a leading 1."""
    return (1, *shape) if name.endswith("/w") else tuple(shape)


# ---------------------------------------------------------------------------------------------------
# Hugging Face's state dicts: `transformer.h.3.attn.c_attn.weight` (GPT2LMHeadModel) or
# `h.3.attn.c_attn.weight` (GPT2Model, older hub files) is model.dat's `h3/attn/c_attn/w`.

HF_PREFIX = "transformer."
HF_LM_HEAD = "lm_head.weight"  # the output layer, tied to (the same values as) the token embedding
_HF_TOP_LEVEL = {"wte.weight": "wte", "wpe.weight": "wpe", "ln_f.weight": "ln_f/g", "ln_f.bias": "ln_f/b"}
_HF_PER_LAYER = {
    "ln_1.weight": "ln_1/g", "ln_1.bias": "ln_1/b",
    "attn.c_attn.weight": "attn/c_attn/w", "attn.c_attn.bias": "attn/c_attn/b",
    "attn.c_proj.weight": "attn/c_proj/w", "attn.c_proj.bias": "attn/c_proj/b",
    "ln_2.weight": "ln_2/g", "ln_2.bias": "ln_2/b",
    "mlp.c_fc.weight": "mlp/c_fc/w", "mlp.c_fc.bias": "mlp/c_fc/b",
    "mlp.c_proj.weight": "mlp/c_proj/w", "mlp.c_proj.bias": "mlp/c_proj/b",
}
_HF_MASK_BUFFERS = ("attn.bias", "attn.masked_bias")  # older transformers saved the causal mask with the weights
_HF_LAYER_NAME = re.compile(r"h\.(0|[1-9][0-9]*)\.(.+)")


def hf_to_model_dat_name(name):
    """A Hugging Face GPT-2 state-dict name -> its model.dat name, or None if it is not one of GPT-2's weights.

    `transformer.h.3.attn.c_attn.weight` and `h.3.attn.c_attn.weight` -> `h3/attn/c_attn/w`,
    `transformer.wte.weight` -> `wte`, `ln_f.bias` -> `ln_f/b`. `lm_head.weight` (the tied output
    projection), the attention-mask buffers and every other name give None.
    """
    bare = name.removeprefix(HF_PREFIX)
    if bare in _HF_TOP_LEVEL:
        return _HF_TOP_LEVEL[bare]
    match = _HF_LAYER_NAME.fullmatch(bare)
    if match and match[2] in _HF_PER_LAYER:
        return f"h{match[1]}/{_HF_PER_LAYER[match[2]]}"
    return None


def model_dat_to_hf_name(name, prefix=HF_PREFIX):
    """The inverse of hf_to_model_dat_name: `h3/attn/c_attn/w` -> `transformer.h.3.attn.c_attn.weight`
    (GPT2LMHeadModel's names; prefix="" gives GPT2Model's)."""
    for hf, ours in _HF_TOP_LEVEL.items():
        if ours == name:
            return prefix + hf
    layer, _, rest = name.partition("/")
    for hf, ours in _HF_PER_LAYER.items():
        if ours == rest and layer[:1] == "h" and layer[1:].isdigit():
            return f"{prefix}h.{int(layer[1:])}.{hf}"
    raise ValueError(f"{name!r} is not a model.dat tensor name")


def is_hf_mask_buffer(name):
    """Whether a Hugging Face state-dict name is an older file's causal-mask buffer (not a weight)."""
    match = _HF_LAYER_NAME.fullmatch(name.removeprefix(HF_PREFIX))
    return bool(match) and match[2] in _HF_MASK_BUFFERS
