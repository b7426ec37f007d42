"""The PyTorch reference: Hugging Face's GPT2LMHeadModel (CPU, float32) holding a model.dat's weights.

picogpt is checked against it in the test suite and by tools/parity.py (`make parity`). Nothing is
downloaded: transformers builds the model from a GPT2Config made from the model.dat's hyper-parameters,
and the weights are the model.dat's own. Hugging Face's Conv1D layers keep weights as [n_in, n_out],
the layout model.dat uses, so the names map one to one (picogpt.tensors.model_dat_to_hf_name):
`h{i}/attn/c_attn/w` is `transformer.h.{i}.attn.c_attn.weight`, `g`/`b` are `weight`/`bias`, and
`lm_head.weight` is tied to `transformer.wte.weight`.

PyTorch and transformers are an optional extra (picogpt's `parity`, which `make parity` installs); this module imports
them only inside its functions, and their absence is one PicogptError sentence.
"""

import numpy as np

from . import bfloat16
from .errors import PicogptError
from .hints import install_command
from .tensors import HF_LM_HEAD, model_dat_to_hf_name
from .tokenizer import EOT



def require_torch():
    """(torch, transformers), or PicogptError saying how to install them."""
    try:
        import torch
        import transformers
    except ImportError as e:
        missing = e.name or "one of them"
        raise PicogptError(f"the parity check needs PyTorch and transformers, and {missing} is not installed: "
                           f"{install_command('parity')}") from None
    return torch, transformers


def hf_config(hparams, attn_implementation="eager"):
    """GPT2Config for model.dat hyper-parameters: GPT-2's tanh GELU, no dropout, eager attention."""
    _, transformers = require_torch()
    eot = EOT if hparams["n_vocab"] > EOT else None  # <|endoftext|>, if the vocabulary has it
    return transformers.GPT2Config(
        vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
        n_layer=hparams["n_layer"], n_head=hparams["n_head"],
        layer_norm_epsilon=hparams.get("layer_norm_epsilon", 1e-5), activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot,
        # "eager" is the plain matmul-softmax-matmul, which can also return attention weights; None is
        # transformers' own default (its fused scaled-dot-product attention), what the benchmark times.
        **({"attn_implementation": attn_implementation} if attn_implementation else {}))


def as_float32(array):
    """A model.dat tensor as float32: bfloat16 matrices (uint16 bit patterns) widened exactly."""
    return bfloat16.widen(array) if array.dtype == np.uint16 else array


def hf_model(hparams, tensors, attn_implementation="eager"):
    """A GPT2LMHeadModel in eval mode (no dropout) holding exactly `tensors` (model.dat names -> arrays;
    bfloat16 ones widened to float32, so PyTorch computes in float32 on the same rounded weights).

    The arrays are copied into memory PyTorch owns (torch.from_numpy cannot share a read-only memory
    map without a warning, and PyTorch would be free to write it): the model's size in RAM again,
    e.g. 0.5 GB for 124M and 6.4 GB for 1558M.
    """
    torch, transformers = require_torch()
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once
        model = transformers.GPT2LMHeadModel(hf_config(hparams, attn_implementation))
    state = {model_dat_to_hf_name(name): torch.from_numpy(np.array(as_float32(array), dtype=np.float32, order="C"))
             for name, array in tensors.items()}
    state[HF_LM_HEAD] = state[model_dat_to_hf_name("wte")]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [name for name in missing if not name.endswith((".attn.bias", ".attn.masked_bias"))]:
        raise AssertionError(f"weights do not fit GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    for name, buffer in list(model.named_buffers()):  # causal-mask buffers (older transformers) are not weights
        if buffer.is_meta:
            raise AssertionError(f"buffer {name} left uninitialised")
    return model.eval()


def hf_forward(model, ids):
    """Run token ids [n_seq] through the reference: (logits [n_seq, n_vocab], hidden states), NumPy float32.

    The hidden states follow the convention picogpt.trace.collect shares with
    Hugging Face: n_layer + 1 arrays [n_seq, n_embd], the input of each block (the first is the
    embeddings), then the final layer norm's output.
    """
    torch, _ = require_torch()
    with torch.inference_mode():
        out = model(torch.tensor([list(ids)]), output_hidden_states=True, use_cache=False)
    return out.logits[0].numpy(), [h[0].numpy() for h in out.hidden_states]


def hf_greedy(model, ids, n_tokens, use_cache=True):
    """Hugging Face's greedy generate of exactly n_tokens after ids (<|endoftext|> does not stop it)."""
    torch, _ = require_torch()
    prompt = torch.tensor([list(ids)])
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1,
                             use_cache=use_cache, max_new_tokens=n_tokens, min_new_tokens=n_tokens, eos_token_id=None,
                             pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()
