"""Train picogpt's demo model, a tiny GPT-2 that ships in data/demo/ so picogpt runs with no download.

    .venv/bin/python tools/train_demo_model.py     # about 30 minutes on 2 CPU cores (1810 s here)

The architecture and tokenizer are GPT-2's exactly (transformers' GPT2LMHeadModel with a tied output
layer, GPT-2's 50257-token BPE from picogpt's own tokenizer); only the sizes are small, so that the
weights fit in 30 MB: the token embedding alone is 50257 x n_embd float32s (25.7 MB at n_embd 128).

The corpus is collected here, offline: the docstrings of the Python standard library this script runs
on (module, class and function docstrings read with `ast`, PSF licence), in sorted path order, each
after an <|endoftext|> token, laid out by `reflow`: a line per paragraph or list entry (wrapped lines
joined), no blank lines, and no code blocks. Every 20th docstring is held out for validation.

Training is in PyTorch on the CPU, seeded, on 2 threads and in a fixed data order, so the same
command on the same machine and Python writes the same model.dat. Progress goes to stdout and to
data/demo/train_log.txt, the source of the model card's numbers (data/demo/README.md). The weights
are written with picogpt's ModelFileWriter, then reloaded by picogpt for the sample continuations.
"""

import argparse
import ast
import hashlib
import math
import platform
import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import picogpt
from picogpt.generate import generate
from picogpt.modelfile import ModelFileWriter
from picogpt.tensors import gpt2_tensor_specs, hf_to_model_dat_name
from picogpt.tokenizer import EOT, N_VOCAB, load_tokenizer

HPARAMS = dict(n_vocab=N_VOCAB, n_ctx=256, n_embd=128, n_head=4, n_layer=4, layer_norm_epsilon=1e-5)
MAX_FILE_BYTES = 30_000_000
# Sequences per step and tokens per sequence (= n_ctx, so every position trains). Small batches learned
# more per token here: at 300K tokens, val loss 5.53 at 2 x 256, 5.63 at 4 x 256, 5.75 at 8 x 256 (measured
# on an earlier layout of the corpus, with blank lines and code blocks).
BATCH_SIZE, BLOCK_SIZE = 2, 256
LR, MIN_LR, WARMUP, WEIGHT_DECAY, DROPOUT = 2e-3, 2e-4, 100, 0.1, 0.0
EVAL_EVERY, EVAL_WINDOWS = 250, 32  # steps between evaluations; windows of BLOCK_SIZE tokens evaluated
VAL_EVERY = 20  # docstring i is held out when i % VAL_EVERY == VAL_EVERY - 1
MIN_DOC_CHARS = 20
# The corpus layout (see reflow). A line that starts an entry of its own rather than continuing the one
# above: a list item, a doctest line, a table row or rule, a "name -- text" or "name: text" definition.
ENTRY = re.compile(r"\s*(?:(?:[-*+\u2022]|\d+[.)]|\([a-z0-9]\)) |>>> |\.\.\. |[|=]|[-+]{3}|\S+ --? |\w+ ?: )")
TABLE = re.compile(r"\S(?: {3,}|(?<![.?!:;,]) {2,})\S")  # columns aligned with runs of spaces
ITEM_MARKER = re.compile(r"\s*(?:(?:[-*+\u2022]|\d+[.)]|\([a-z0-9]\)) +)?")  # indent and list marker
WRAP_WIDTH = 50  # a line this long, continued at the same indent, was wrapped
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "turtledemo",
             "ensurepip", "pydoc_data", "__phello__", "__pycache__"}
SAMPLE_PROMPTS = ["Return the number of", "This module provides", "The default value is"]


def stdlib_files():
    """The standard library's .py files, without tests, tools, bundled packages; sorted, so fixed."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not SKIP_DIRS & set(parts[:-1]) and not parts[0].startswith("config-") \
                and not path.name.startswith("test_"):
            yield path


def reflow(doc):
    """Lay a docstring out as the corpus has it: one line per paragraph, or per entry of a list.

    A plain prose paragraph becomes one line with single spaces: no line breaks where the source wrapped
    at 72 columns, no double space after a full stop. A paragraph with structure (a list, definitions, a
    table) keeps a line per entry, with the lines an entry was wrapped over joined. Literal blocks, the
    paragraphs that start indented or with a doctest, are code, not prose, and are left out.

    Paragraphs are separated by one newline, not by a blank line. GPT-2's tokenizer makes a blank line
    two newline tokens, and with one between every two paragraphs and a newline at every wrap, a newline
    was the safest guess after anything, a second one the likeliest after the first, and a small model's
    greedy continuations collapsed into runs of newlines.
    """
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = [line.rstrip() for line in paragraph.splitlines()]
        if not any(line[:1].isspace() or ENTRY.match(line) or TABLE.search(line) for line in lines):
            paragraphs.append(" ".join(paragraph.split()))  # plain prose
        elif not (lines[0][:1].isspace() or lines[0].startswith(">>>")):  # else a literal block: dropped
            entries, last, indent = [], "", -1
            for line in lines:  # join a line to the entry above when it continues a wrapped line
                if (len(last) >= WRAP_WIDTH and not last.endswith(":") and not TABLE.search(last)
                        and not ENTRY.match(line) and not TABLE.search(line)
                        and len(line) - len(line.lstrip()) == indent):
                    entries[-1] += " " + line.strip()
                else:
                    entries.append(line)
                    indent = ITEM_MARKER.match(line).end()  # where the entry's text starts
                last = line
            paragraphs.append("\n".join(entries))
    return "\n".join(paragraphs)


def docstrings(paths):
    """Cleaned, de-duplicated module/class/function docstrings, in file order then line order."""
    seen = set()
    for path in paths:
        tree = ast.parse(path.read_bytes(), filename=str(path))
        nodes = [n for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(nodes, key=lambda n: getattr(n, "lineno", 0)):
            doc = ast.get_docstring(node, clean=True)  # inspect.cleandoc: dedented, trimmed
            if not doc or len(doc) < MIN_DOC_CHARS or doc in seen:
                continue
            lines = [line.lstrip() for line in doc.splitlines() if line.strip()]
            if sum(line.startswith((">>>", "...")) for line in lines) > len(lines) / 4:
                continue  # mostly doctest: code, not prose
            seen.add(doc)
            text = reflow(doc).strip()
            if len(text) >= MIN_DOC_CHARS:
                yield text


def token_stream(docs, encoding):
    """One int64 tensor: each docstring's tokens after an <|endoftext|>, as GPT-2 separated documents."""
    ids = []
    for doc in docs:
        ids.append(EOT)
        ids.extend(encoding.encode_ordinary(doc))
    return torch.tensor(ids, dtype=torch.long)


def fixed_windows(stream, n):
    """n windows of BLOCK_SIZE + 1 tokens spread evenly over a stream: the fixed sample a loss is measured on."""
    starts = np.linspace(0, len(stream) - BLOCK_SIZE - 1, n).astype(int).tolist()
    return torch.stack([stream[s:s + BLOCK_SIZE + 1] for s in starts])


def lm_loss(model, windows):
    """Mean cross-entropy of each next token given those before it, over windows [batch, BLOCK_SIZE + 1].

    The same as GPT2LMHeadModel(x, labels=x).loss, without its shifted copy of the [batch, BLOCK_SIZE,
    n_vocab] logits (the output layer is most of the work with a 50257-token vocabulary).
    """
    hidden = model.transformer(windows[:, :-1]).last_hidden_state
    return F.cross_entropy(model.lm_head(hidden).flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, windows):
    """Mean next-token cross-entropy (nats per token) over the windows, without dropout."""
    model.eval()
    total = 0.0
    for chunk in windows.split(16):
        total += lm_loss(model, chunk).item() * len(chunk)
    model.train()
    return total / len(windows)


def lr_at(step, steps):
    """Linear warm-up to LR, then cosine decay to MIN_LR at the last step."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * progress))


def write_model(model, path):
    """Write the weights through picogpt's ModelFileWriter (Conv1D weights are already [n_in, n_out])."""
    state = model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight, "the output layer must be tied to wte"
    # hf_to_model_dat_name gives None for lm_head.weight (the tied wte) and anything that is not a weight.
    tensors = {name: v.detach().numpy() for k, v in state.items() if (name := hf_to_model_dat_name(k))}
    assert set(tensors) == set(gpt2_tensor_specs(HPARAMS)), "state dict does not map onto model.dat"
    with ModelFileWriter(path, HPARAMS) as out:
        for name, array in tensors.items():
            out.write(name, array)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps (default: 2500)")
    p.add_argument("--out", default="data/demo/model.dat", help="model file to write")
    p.add_argument("--seed", type=int, default=1234, help="seeds initialisation, dropout and batch order")
    p.add_argument("--log", default="data/demo/train_log.txt", help="log file (overwritten)")
    args = p.parse_args()

    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    log_file = open(args.log, "w", encoding="utf-8")

    def log(message=""):
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    file_size = ModelFileWriter(args.out, HPARAMS).file_size  # computes the layout; opens nothing
    assert file_size <= MAX_FILE_BYTES, f"{file_size} bytes is over the {MAX_FILE_BYTES} byte limit"

    docs = list(docstrings(stdlib_files()))
    train_docs = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    val_docs = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    encoding = load_tokenizer()
    train, val = token_stream(train_docs, encoding), token_stream(val_docs, encoding)
    digest = hashlib.sha256(train.numpy().tobytes() + val.numpy().tobytes()).hexdigest()
    log(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    log(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}")
    log(f"corpus: {len(docs)} docstrings from {sysconfig.get_paths()['stdlib']}; "
        f"train {len(train_docs)} docstrings, {len(train)} tokens; val {len(val_docs)} docstrings, "
        f"{len(val)} tokens; tokens sha256 {digest[:16]}")

    config = GPT2Config(vocab_size=HPARAMS["n_vocab"], n_positions=HPARAMS["n_ctx"], n_embd=HPARAMS["n_embd"],
                        n_layer=HPARAMS["n_layer"], n_head=HPARAMS["n_head"],
                        layer_norm_epsilon=HPARAMS["layer_norm_epsilon"], activation_function="gelu_new",
                        resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)
    model = GPT2LMHeadModel(config).train()
    n_params = sum(t.numel() for t in model.parameters())  # the tied lm_head counts once
    log(f"model: {HPARAMS}, {n_params} parameters, model.dat {file_size} bytes")

    # Weight decay on matrices only (not on biases and layer-norm gains), as GPT-2 reimplementations do.
    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))
    log(f"training: {args.steps} steps of {BATCH_SIZE} x {BLOCK_SIZE} tokens, AdamW lr {LR} "
        f"(warm-up {WARMUP}, cosine to {MIN_LR}), weight decay {WEIGHT_DECAY}, dropout {DROPOUT}, "
        f"grad clip 1.0, seed {args.seed}")
    train_windows, val_windows = fixed_windows(train, EVAL_WINDOWS), fixed_windows(val, EVAL_WINDOWS)
    batches = torch.Generator().manual_seed(args.seed)  # the data order: random offsets, fixed by the seed
    losses, t_train = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(len(train) - BLOCK_SIZE, (BATCH_SIZE,), generator=batches)
        chunk = torch.stack([train[s:s + BLOCK_SIZE + 1] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, args.steps)
        loss = lm_loss(model, chunk)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % EVAL_EVERY == 0 or step == args.steps:
            train_loss, val_loss = evaluate(model, train_windows), evaluate(model, val_windows)
            elapsed = time.perf_counter() - t_train
            log(f"step {step:5d} | lr {lr_at(step - 1, args.steps):.2e} | batch loss {np.mean(losses):.4f} "
                f"| train loss {train_loss:.4f} | val loss {val_loss:.4f} | {elapsed:6.0f} s")
            losses = []

    write_model(model, args.out)
    log(f"final: step {args.steps}, train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
        f"training {elapsed:.0f} s, total {time.perf_counter() - started:.0f} s; "
        f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")

    demo = picogpt.load(args.out)  # the samples come from picogpt itself, reading the file just written
    for prompt in SAMPLE_PROMPTS:
        ids = encoding.encode(prompt)
        log(f"sample: {prompt!r} -> {encoding.decode(list(generate(demo, ids, 30)))!r}")
    log_file.close()


if __name__ == "__main__":
    main()
