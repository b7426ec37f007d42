"""picogpt: GPT-2 inference in plain NumPy.

    import picogpt
    from picogpt.generate import generate
    model = picogpt.load("124M")                     # or "demo", or a path to a model.dat
    tokenizer = picogpt.load_tokenizer()
    ids = tokenizer.encode("Alan Turing theorized that")
    new_ids = list(generate(model, ids, n_tokens=20))
    print(tokenizer.decode(new_ids))

The modules, bottom to top (each imports only modules above it in this list):

    errors, hints       the one exception type; commands quoted in messages, spelled to work as printed
    shipped, outputs    where the shipped data lies (vocabulary, demo model); outputs written atomically
    bfloat16            bfloat16 weights as uint16 bit patterns: rounding, widening, BFloat16Matrix
    int8                int8 weights with a scale per output unit; the activations' quantization; Int8Matrix
    tensors             GPT-2's hyper-parameters and tensor names (model.dat's, OpenAI's, Hugging Face's)
    modelfile           the model.dat format: write, map, validate
    blas, precision     backends (NumPy, CBLAS libraries, oneDNN); the backend a file's weights get (auto), and
                        bfloat16 and int8 weights multiplied natively or widened, chosen at load
    tokenizer           GPT-2's BPE tokenizer and its vocabulary files
    model               the math: layer_norm, gelu, softmax, attention, mha, mlp, block, gpt2; KV cache
    trace               a tracer of the model's steps; collects hidden states and attention weights
    memory, sampling    the memory a batch needs; the next-token pipeline (logits processors, the choice)
    generate, scoring   the decode loop (greedy, sampling, stop strings, batches); log-probabilities of a text
    beam                beam search with Hugging Face's rules
    download            OpenAI's release (sizes, URL, files) and the resumable download
    convert_tf, convert_hf    checkpoints -> model.dat
    store               model names -> files; load, fetch (download + convert)
    attention_plot      pictures of attention weights
    hf                  a drop-in for Hugging Face's GPT2LMHeadModel (from_pretrained, forward, generate)
    corpus, corpus_ray  whole corpora, in process or on Ray
    scheduler           continuous batching: concurrent completions decoded as one batch, joining and leaving
    serve, serve_ray    `picogpt serve`, OpenAI's completions API (FastAPI, imported only there); on Ray Serve
    explain, explain_page     the data of a forward pass for a learner, and its web page
    reference, parity, bench  the PyTorch reference; the layer-by-layer check and the benchmark against it
    bench_corpus, bench_serve the benchmark's corpus rows; the server's concurrency benchmark
    cli, commands/      `picogpt` and its subcommands (__main__ runs cli; cli imports a subcommand's module
                        only when it runs)

__version__ (the installed package's version too: setup.cfg reads it from here) is the only name
defined up front. The names below are imported on first use, so that `import picogpt` itself costs
nothing and `picogpt -v` can time the imports the command line makes.
"""

__version__ = "0.2.0"

import importlib

_HOMES = {"GPT2": "model", "PicogptError": "errors", "load": "store", "load_tokenizer": "tokenizer"}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'picogpt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
