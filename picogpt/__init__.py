"""picogpt: GPT-2 inference in plain NumPy.

    import picogpt
    model = picogpt.load("124M")                     # or a path to a model.dat
    tokenizer = picogpt.load_tokenizer()
    ids = tokenizer.encode("Alan Turing theorized that")
    new_ids = list(picogpt.generate(model, ids, n_tokens=20))
    print(tokenizer.decode(new_ids))

The model's math is in picogpt.model; the file format in picogpt.modelfile.
"""

import time as _time

_import_started = _time.perf_counter()  # for `python -m picogpt -v`: how long importing picogpt took

from .errors import PicogptError  # noqa: E402
from .generate import generate  # noqa: E402
from .model import GPT2  # noqa: E402
from .store import load  # noqa: E402
from .tokenizer import load_tokenizer  # noqa: E402

__all__ = ["GPT2", "PicogptError", "generate", "load", "load_tokenizer"]
