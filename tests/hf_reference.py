"""The parity reference for the tests: Hugging Face's GPT2LMHeadModel (PyTorch, CPU, float32) on picogpt's
weights, and random weights to give it.

hf_model is picogpt.reference.hf_model (the reference tools/parity.py uses too): transformers builds
the model from a GPT2Config with no download, and model.dat's names map one to one onto its state dict.
"""

import torch

from picogpt.modelfile import ModelFileWriter
from picogpt.reference import hf_model
from tf_fixture import random_weights, to_model_dat_names

torch.set_num_threads(2)
__all__ = ["hf_model", "random_tensors", "write_model_dat"]


def random_tensors(hparams, seed=0):
    """Random float32 weights of GPT-2's scale for every model.dat tensor (gains and biases not trivial)."""
    return to_model_dat_names(random_weights(hparams, seed))


def write_model_dat(path, hparams, tensors):
    with ModelFileWriter(path, hparams) as out:
        for name, array in tensors.items():
            out.write(name, array)
    return path
