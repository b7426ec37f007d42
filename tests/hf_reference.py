"""The parity reference: Hugging Face's GPT2LMHeadModel (PyTorch, CPU, float32) on picogpt's weights.

transformers builds the model from a GPT2Config with no download. Its Conv1D layers keep weights as
[n_in, n_out], the layout model.dat uses, so OpenAI's names map one to one:
model.dat `h{i}/attn/c_attn/w` is `transformer.h.{i}.attn.c_attn.weight`, `g`/`b` are `weight`/`bias`,
and `lm_head.weight` is tied to `transformer.wte.weight`.
"""

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from picogpt.convert_hf import model_dat_to_hf_name
from picogpt.modelfile import ModelFileWriter
from tf_fixture import random_weights, to_model_dat_names

torch.set_num_threads(2)


def hf_model(hparams, tensors):
    """A GPT2LMHeadModel in eval mode (no dropout) holding exactly `tensors` (model.dat names)."""
    config = GPT2Config(vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
                        n_layer=hparams["n_layer"], n_head=hparams["n_head"],
                        layer_norm_epsilon=hparams.get("layer_norm_epsilon", 1e-5), activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    state = {model_dat_to_hf_name(name): torch.from_numpy(np.array(array, dtype=np.float32)) for name, array in tensors.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, buffer in list(model.named_buffers()):  # causal-mask buffers (older transformers) are not weights
        if buffer.is_meta:
            raise AssertionError(f"buffer {name} left uninitialised")
    return model.eval()


def random_tensors(hparams, seed=0):
    """Random float32 weights of GPT-2's scale for every model.dat tensor (gains and biases not trivial)."""
    return to_model_dat_names(random_weights(hparams, seed))


def write_model_dat(path, hparams, tensors):
    with ModelFileWriter(path, hparams) as out:
        for name, array in tensors.items():
            out.write(name, array)
    return path
