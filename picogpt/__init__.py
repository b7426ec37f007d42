"""picogpt: GPT-2 inference in plain NumPy.

    import picogpt
    model = picogpt.load("124M")                     # or a path to a model.dat
    tokenizer = picogpt.load_tokenizer()
    ids = tokenizer.encode("Alan Turing theorized that")
    new_ids = list(picogpt.generate(model, ids, n_tokens=20))
    print(tokenizer.decode(new_ids))

The model's math is in picogpt.model; the file format in picogpt.modelfile.
"""

from .errors import PicogptError
from .generate import generate
from .model import GPT2
from .store import load
from .tokenizer import load_tokenizer

__all__ = ["GPT2", "PicogptError", "generate", "load", "load_tokenizer"]
