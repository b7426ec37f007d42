"""Train picogpt's demo model, a small GPT-2 that ships in data/demo/ so picogpt runs with no download.

    apt-get install python3.11-doc                     # the Python documentation, as HTML (PSF licence)
    .venv/bin/python tools/train_demo_model.py         # checkpoints as it goes; run it again to resume
    .venv/bin/python tools/train_demo_model.py --judge data/demo/model.dat    # how often greedy text loops

The architecture and tokenizer are GPT-2's exactly (transformers' GPT2LMHeadModel with a tied output
layer, GPT-2's 50257-token BPE from picogpt's own tokenizer); only the sizes are small, so that the
weights fit in 30 MB. The token embedding alone is 50257 x n_embd numbers, so the file stores the weight
matrices as bfloat16 (model.dat version 2), which buys a model twice as wide as float32 would.

The corpus is collected here, offline, from two sources under the PSF licence, in a fixed order:
the docstrings of the Python standard library this script runs on (read with `ast`), and the Python
documentation as Debian's python3.11-doc package installs it (HTML turned into plain paragraphs with
the standard library's HTML parser: code blocks, tables, signatures and navigation dropped; a document
per top-level section). Each document follows an <|endoftext|> token, a paragraph per line (`reflow`).
Documents are de-duplicated and split into train and held-out parts by a hash of their text: whole
documents, never lines.

Training is in PyTorch on the CPU (bfloat16 autocast where the CPU has bfloat16 instructions), seeded,
in a fixed data order, so the same command with the same thread count on the same machine writes the
same model.dat. The learning rate warms up, stays constant while the held-out loss still improves, and
decays once it stops improving (a warmup-stable-decay schedule): training stops on the held-out loss,
not on a step count. A checkpoint (safetensors, no pickle) is written at every evaluation; the same
command run again resumes from it, so training can span several sittings. Progress goes to stdout and
to data/demo/train_log.txt, the source of the model card's numbers (data/demo/README.md). The weights
are written with picogpt's ModelFileWriter, then reloaded by picogpt for the held-out perplexity and
the sample continuations.

A trained model that loops under greedy decoding trains on with --unlikelihood-from MODEL_DAT: sequence-
level unlikelihood steps (Welleck et al. 2019) that show the model its own greedy continuations and make
the tokens that repeat a phrase less likely, interleaved with ordinary steps, until the loops in greedy
continuations of training openings stop falling. --token-unlikelihood adds Welleck's token-level loss to
the next-token steps (the window's earlier tokens made less likely), --unlikelihood-margin makes the
unlikelihood steps a hinge on greedy's choice (--unlikelihood-margin-among: the choice the starting model
found plausible; --unlikelihood-nonsense: junk pushed down too), and --unlikelihood-anchor holds them to the
starting model's distributions (or --unlikelihood-reference's). --judge counts such loops over the held-out
openings.
"""

import argparse
import ast
import hashlib
import html.parser
import json
import math
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import picogpt
from picogpt.generate import generate
from picogpt.modelfile import ModelFileWriter, open_model_file
from picogpt.reference import hf_model
from picogpt.scoring import score
from picogpt.tensors import gpt2_tensor_specs, hf_to_model_dat_name
from picogpt.tokenizer import EOT, N_VOCAB, load_tokenizer

# bfloat16 matrices: 50257 x 192 x 2 bytes = 19.3 MB of embedding, 0.9 MB per layer, 26.4 MB in all.
HPARAMS = dict(n_vocab=N_VOCAB, n_ctx=256, n_embd=192, n_head=6, n_layer=8, layer_norm_epsilon=1e-5)
WEIGHT_DTYPE = "bf16"
MAX_FILE_BYTES = 30_000_000
BATCH_SIZE, BLOCK_SIZE = 8, 256  # sequences per step, tokens per sequence (= n_ctx, so every position trains)
LR, MIN_LR, WARMUP, WEIGHT_DECAY, DROPOUT = 1e-3, 1e-5, 200, 0.1, 0.0
# The schedule's stable phase ends when the held-out loss has improved by less than PLATEAU nats over the
# last PATIENCE evaluations (or at --max-steps); the decay then lasts DECAY_FRACTION of the steps before it.
PLATEAU, PATIENCE, DECAY_FRACTION = 0.01, 3, 0.2
EVAL_EVERY, EVAL_WINDOWS = 250, 96  # steps between evaluations; windows of BLOCK_SIZE tokens evaluated
VAL_EVERY = 20  # a document is held out when the hash of its text is 0 modulo VAL_EVERY
MIN_DOC_CHARS = 20
DOCS_DIR = "/usr/share/doc/python3.11/html"
DOCS_PACKAGE = "python3.11-doc"
# The corpus layout (see reflow). A line that starts an entry of its own rather than continuing the one
# above: a list item, a doctest line, a table row or rule, a "name -- text" or "name: text" definition.
ENTRY = re.compile(r"\s*(?:(?:[-*+\u2022]|\d+[.)]|\([a-z0-9]\)) |>>> |\.\.\. |[|=]|[-+]{3}|\S+ --? |\w+ ?: )")
TABLE = re.compile(r"\S(?: {3,}|(?<![.?!:;,]) {2,})\S")  # columns aligned with runs of spaces
ITEM_MARKER = re.compile(r"\s*(?:(?:[-*+\u2022]|\d+[.)]|\([a-z0-9]\)) +)?")  # indent and list marker
WRAP_WIDTH = 50  # a line this long, continued at the same indent, was wrapped
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "turtledemo",
             "ensurepip", "pydoc_data", "__phello__", "__pycache__"}
# Pages of the documentation that are indexes, legal text or release notes by issue number, not prose.
SKIP_PAGES = re.compile(r"^(genindex.*|py-modindex|search|contents|copyright|license|download|"
                        r"whatsnew/changelog)\.html$")
# The greedy samples: the README's prompt, then openings of held-out docstrings (chosen in main).
README_PROMPT = "The optional argument"
N_HELD_OUT_PROMPTS, SAMPLE_TOKENS = 12, 30
MAKE_RUN_TOKENS = 20  # what `make run` prints
# Unlikelihood training (Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training"), from a
# trained model: every UL_EVERY-th step continues UL_PREFIX-token training windows greedily for
# UL_CONTINUATION tokens and lowers the probability of each token that repeats a four-token phrase; the other
# steps are ordinary ones; the rate is a constant UL_LR. It stops when the greedy continuations of
# N_LOOP_OPENINGS training-docstring openings that loop have fallen by fewer than UL_PLATEAU over the last
# PATIENCE evaluations (or at --max-steps): on training text, so the held-out openings still judge it.
UL_LR, UL_PREFIX, UL_CONTINUATION, UL_EVERY, UL_PLATEAU, N_LOOP_OPENINGS = 1e-4, 32, 60, 2, 3, 96
UL_OPENING = 6  # --unlikelihood-prefixes openings: prefixes of a document's first tokens, as short as a prompt
# --unlikelihood-best-of: how its continuations are sampled (as the README's sampling example), and how much a
# continuation's likelihood without the prefix counts against it (Li et al. 2016's MMI-bidi lambda): the
# reference's likeliest continuation alone is boilerplate that fits any prefix ("New in version 3.3.").
BEST_OF_TEMPERATURE, BEST_OF_TOP_K, BEST_OF_GENERIC = 0.8, 40, 0.5
RARE_P = 1e-4  # --judge --reference: a token that model gives less than this is nonsense after the prompt
STOP = r"[.!?][\"')\]]*"  # a full stop, ! or ?, and any closing quotes or brackets
SENTENCE_END = re.compile(STOP + r"(?:\s|$)")  # ... then a space or the end of the text


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


class DocsPage(html.parser.HTMLParser):
    """The prose of one page of the HTML documentation, as documents: lists of paragraphs, one per section
    at the top two levels of the page (a page's introduction, then each of its sections with their
    subsections). Only text inside the page's main part (<div class="body">) counts; code, tables,
    signatures (<dt>), permalinks, tables of contents and admonition titles are dropped; a paragraph, list
    item, definition or heading becomes one line with its whitespace normalised."""

    BLOCKS = {"p", "li", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "caption", "figcaption"}
    SKIP_TAGS = {"pre", "table", "dt", "script", "style", "nav", "footer", "math"}
    SKIP_CLASSES = {"highlight", "headerlink", "toctree-wrapper", "admonition-title", "sphinxsidebar", "related",
                    "footnote", "rubric"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.documents, self.text, self.open = [[]], [], []  # open: (tag, flags) of the elements entered
        self.in_body = self.skipping = self.sections = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if tag == "br":
                self.text.append(" ")
            return
        classes = set((dict(attrs).get("class") or "").split())
        flags = set()
        if not self.in_body:
            if tag == "div" and "body" in classes:
                flags.add("body")
                self.in_body = 1
        else:
            if tag in self.SKIP_TAGS or any(c.startswith("highlight") for c in classes) or classes & self.SKIP_CLASSES:
                flags.add("skip")
                self.skipping += 1
            if tag == "section":
                flags.add("section")
                self.sections += 1
                if self.sections <= 2 and not self.skipping:
                    self.paragraph_end()
                    self.documents.append([])
            if tag in self.BLOCKS and not self.skipping:
                flags.add("block")
                self.paragraph_end()
        self.open.append((tag, flags))

    def handle_endtag(self, tag):
        if tag not in (t for t, _ in self.open):
            return  # a stray end tag
        while self.open:
            name, flags = self.open.pop()
            if "block" in flags:
                self.paragraph_end()
            self.skipping -= "skip" in flags
            self.sections -= "section" in flags
            if "body" in flags:
                self.paragraph_end()
                self.in_body = 0
            if name == tag:
                return

    def handle_data(self, data):
        if self.in_body and not self.skipping:
            self.text.append(data)

    def paragraph_end(self):
        text = " ".join("".join(self.text).split())
        self.text = []
        if text and not text.startswith("Source code:"):
            self.documents[-1].append(text)


def docs_pages(root):
    """The documentation's HTML pages worth reading, in sorted path order, as (relative path, path)."""
    for path in sorted(Path(root).rglob("*.html")):
        relative = path.relative_to(root).as_posix()
        if not relative.startswith("_") and not SKIP_PAGES.match(relative):
            yield relative, path


def docs_documents(root):
    """The documentation's prose as documents: each a paragraph per line, in page order."""
    for _, path in docs_pages(root):
        page = DocsPage()
        page.feed(path.read_text(encoding="utf-8"))
        page.close()
        for paragraphs in page.documents:
            text = "\n".join(paragraphs)
            if len(text) >= MIN_DOC_CHARS:
                yield text


def docs_version(root):
    """Where the documentation came from, for the log: the Debian package and version when dpkg knows it."""
    try:
        version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", DOCS_PACKAGE], capture_output=True,
                                 text=True, check=True).stdout.strip()
        return f"{DOCS_PACKAGE} {version} ({root})"
    except (OSError, subprocess.CalledProcessError):
        title = re.search(r"<title>(.*?)</title>", (Path(root) / "index.html").read_text(encoding="utf-8"))
        return f"{root} ({title.group(1) if title else 'unknown version'})"


def is_held_out(text):
    """A document is held out by a hash of its text, so the split is by whole documents and is stable."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % VAL_EVERY == 0


def token_stream(docs, encoding):
    """One int32 array: each document's tokens after an <|endoftext|>, as GPT-2 separated documents."""
    ids = []
    for doc in docs:
        ids.append(EOT)
        ids.extend(encoding.encode_ordinary(doc))
    return np.array(ids, dtype=np.int32)


def fixed_windows(stream, n):
    """n windows of BLOCK_SIZE + 1 tokens spread evenly over a stream: the fixed sample a loss is measured on."""
    starts = np.linspace(0, len(stream) - BLOCK_SIZE - 1, n).astype(int).tolist()
    return torch.stack([torch.from_numpy(stream[s:s + BLOCK_SIZE + 1]).long() for s in starts])


def lm_loss(model, windows, bf16, token_unlikelihood=0.0):
    """Mean cross-entropy of each next token given those before it, over windows [batch, BLOCK_SIZE + 1].

    The same as GPT2LMHeadModel(x, labels=x).loss, without its shifted copy of the [batch, BLOCK_SIZE,
    n_vocab] logits (the output layer is most of the work with a 50257-token vocabulary). With bf16, the
    products run in bfloat16 (autocast) and the loss in float32; the weights stay float32. A
    token_unlikelihood weight adds that times previous_token_unlikelihood.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.transformer(windows[:, :-1]).last_hidden_state
        logits = model.lm_head(hidden)  # [batch, BLOCK_SIZE, n_vocab]
    if not token_unlikelihood:
        return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return (F.nll_loss(log_probs.flatten(0, 1), windows[:, 1:].flatten())
            + token_unlikelihood * previous_token_unlikelihood(log_probs, windows))


def previous_token_unlikelihood(log_probs, windows):
    """Token-level unlikelihood (Welleck et al. 2019, --token-unlikelihood) on real text: at each position,
    -log(1 - p) summed over the distinct tokens already in the window that are not the next one, averaged
    over positions. log_probs [batch, n, n_vocab] predict windows [batch, n + 1]'s tokens 1..n.

    Cross-entropy raises the right token; this also lowers the wrong ones that copying the context would
    give, the habit a greedy loop grows from, and it does so on human text rather than on the model's own
    (where the freed probability can drift to rare tokens)."""
    batch, n, _ = log_probs.shape
    context, targets = windows[:, :-1], windows[:, 1:]  # [batch, n] each
    same = context[:, :, None] == context[:, None, :]  # [batch, n, n]: token i is token j
    seen_before = (same & torch.ones(n, n, dtype=torch.bool).tril(-1)).any(-1)  # [batch, n]: j repeats an earlier one
    # candidates[b, t, j]: at position t, context token j (once per distinct token) counts against the model
    candidates = (torch.ones(n, n, dtype=torch.bool).tril() & ~seen_before[:, None, :]
                  & (context[:, None, :] != targets[:, :, None]))
    p = log_probs.gather(-1, context[:, None, :].expand(batch, n, n)).exp()  # [batch, n, n]: p(token j) at t
    return -(torch.log(torch.clamp(1 - p, min=1e-5)) * candidates).sum() / (batch * n)


@torch.no_grad()
def evaluate(model, windows, bf16):
    """Mean next-token cross-entropy (nats per token) over the windows, without dropout."""
    model.eval()
    total = 0.0
    for chunk in windows.split(16):
        total += lm_loss(model, chunk, bf16).item() * len(chunk)
    model.train()
    return total / len(windows)


@torch.no_grad()
def greedy_torch(model, windows, n_tokens, stop_at_eot):
    """transformers' greedy generate after each window [batch, n]: the new tokens [batch, <= n_tokens]."""
    model.eval()
    out = model.generate(windows, attention_mask=torch.ones_like(windows), do_sample=False, num_beams=1,
                         max_new_tokens=n_tokens, min_new_tokens=0 if stop_at_eot else n_tokens,
                         eos_token_id=EOT if stop_at_eot else None, pad_token_id=EOT)
    model.train()
    return out[:, windows.shape[1]:]


def repeating_positions(ids, start, n=4):
    """The positions, from `start` on, of tokens in a run of n tokens that occurred earlier in ids."""
    seen, positions = set(), set()
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        if gram in seen:
            positions.update(range(max(i, start), i + n))
        seen.add(gram)
    return sorted(positions)


def random_windows(stream, length, batches, with_next=False):
    """BATCH_SIZE windows of the token stream, at offsets below len(stream) - length drawn from `batches`:
    [BATCH_SIZE, length], or [BATCH_SIZE, length + 1] with each window's next token (a training target)."""
    starts = torch.randint(len(stream) - length, (BATCH_SIZE,), generator=batches)
    n = length + with_next
    return torch.stack([torch.from_numpy(stream[s:s + n]).long() for s in starts.tolist()])


def document_openings(stream):
    """The offsets of the documents in a token stream that have at least UL_OPENING tokens: each just after
    an <|endoftext|>, with none among its first UL_OPENING tokens."""
    starts = np.flatnonzero(stream[:-UL_OPENING] == EOT) + 1
    ends = np.append(np.flatnonzero(stream == EOT)[1:], len(stream))[:len(starts)]  # each document's next EOT
    return starts[ends - starts >= UL_OPENING]


def random_openings(stream, openings, batches):
    """The first UL_OPENING tokens of BATCH_SIZE documents drawn from `batches`: [BATCH_SIZE, UL_OPENING]."""
    picks = torch.randint(len(openings), (BATCH_SIZE,), generator=batches).tolist()
    return torch.stack([torch.from_numpy(stream[openings[i]:openings[i] + UL_OPENING]).long() for i in picks])


def holds_a_sentence(text):
    """Whether text completes a sentence: a full stop, ! or ? (and any closing quotes or brackets) before
    whitespace or the end. "e.g. " counts too: a rule for counting, not a parser."""
    return SENTENCE_END.search(text) is not None


def sentence_ends(encoding):
    """Which token ids [N_VOCAB] end in a full stop, ! or ? (then closing quotes or brackets), and which begin
    with whitespace: a sentence ends at the first kind when the second kind or <|endoftext|> follows (no
    GPT-2 token holds a stop and then whitespace, so this is SENTENCE_END read on tokens)."""
    texts = [encoding.decode([i]) for i in range(N_VOCAB)]
    return (np.array([re.search(STOP + "$", text) is not None for text in texts]),
            np.array([text[:1].isspace() for text in texts]))


def document_sentences(stream, ends_sentence, starts_space, longest=UL_PREFIX):
    """Each document's first sentence, where it ends within `longest` tokens: {length: offsets} of the
    documents (each just after an <|endoftext|>), grouped by the sentence's length in tokens."""
    followed = np.append(starts_space[stream[1:]] | (stream[1:] == EOT), True)  # [len(stream)]
    ends = np.flatnonzero(ends_sentence[stream] & followed & (stream != EOT))  # offsets of sentence ends
    starts = np.flatnonzero(stream[:-1] == EOT) + 1
    next_eot = np.append(np.flatnonzero(stream == EOT)[1:], len(stream))[:len(starts)]
    at = np.searchsorted(ends, starts)
    found = at < len(ends)
    starts, next_eot, first_end = starts[found], next_eot[found], ends[at[found]]
    lengths = first_end - starts + 1
    keep = (first_end < next_eot) & (lengths <= longest)
    return {int(n): starts[keep][lengths[keep] == n] for n in np.unique(lengths[keep])}


def random_sentences(stream, sentences, batches):
    """BATCH_SIZE documents' first sentences, all of one length (so that no batch needs padding), drawn
    from `batches`: the length of a random document's, then BATCH_SIZE documents of that length (with
    replacement, so a rare length repeats some): [BATCH_SIZE, that length]. Lengths come as often as
    documents have them."""
    lengths = np.concatenate([np.full(len(offsets), n) for n, offsets in sentences.items()])
    n = int(lengths[torch.randint(len(lengths), (1,), generator=batches).item()])
    picks = torch.randint(len(sentences[n]), (BATCH_SIZE,), generator=batches).tolist()
    return torch.stack([torch.from_numpy(stream[sentences[n][i]:sentences[n][i] + n]).long() for i in picks])


def own_continuations(model, prefixes, encoding=None):
    """Continue each prefix [batch, n_prefix] greedily for UL_CONTINUATION tokens: the sequences [batch, n],
    and which of their next-token targets [batch, n - 1] (up to the first <|endoftext|>) repeat an earlier
    four-token phrase and which are the continuation's others. Given the tokenizer (--unlikelihood-early-end),
    an <|endoftext|> that ends a continuation holding no complete sentence (empty, or only "\nThe following
    functions are:") counts with the repeating tokens."""
    n_prefix = prefixes.shape[1]
    seq = torch.cat([prefixes, greedy_torch(model, prefixes, UL_CONTINUATION, stop_at_eot=False)], dim=1)
    penalised = torch.zeros(seq.shape, dtype=torch.bool)  # [batch, n_prefix + UL_CONTINUATION]
    continuation = torch.zeros(seq.shape, dtype=torch.bool)
    for row, ids in enumerate(seq.tolist()):
        end = ids.index(EOT, n_prefix) if EOT in ids[n_prefix:] else len(ids)
        continuation[row, n_prefix:end] = True
        penalised[row, repeating_positions(ids[:end], n_prefix)] = True
        if encoding is not None and end < len(ids) and not holds_a_sentence(encoding.decode(ids[n_prefix:end])):
            penalised[row, end] = True  # the <|endoftext|> itself: [:, 1:] below makes it the target at end - 1
    return seq, penalised[:, 1:], continuation[:, 1:] & ~penalised[:, 1:]


def unlikelihood_loss(model, prefixes, bf16):
    """Sequence-level unlikelihood: continue each prefix [batch, UL_PREFIX] greedily, then lower the
    probability p the model gives each continuation token that repeats an earlier four-token phrase
    (-log(1 - p), averaged over those tokens; up to the first <|endoftext|>). Next-token training on good
    text never shows a model its own loops; this shows them and makes them unlikely."""
    seq, repeats, _ = own_continuations(model, prefixes)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(seq[:, :-1]).logits  # [batch, n - 1, n_vocab]: position i predicts token i + 1
    p = F.softmax(logits.float(), dim=-1).gather(-1, seq[:, 1:, None])[..., 0]  # [batch, n - 1]
    return -torch.log(torch.clamp(1 - p[repeats], min=1e-5)).sum() / max(1, int(repeats.sum()))


def kl_divergence(target, logits):
    """KL(target || softmax(logits)) at each position: target [..., n_vocab] probabilities -> [...]."""
    return (target * (torch.log(target.clamp_min(1e-30)) - F.log_softmax(logits.float(), dim=-1))).sum(-1)


def margin_unlikelihood_loss(model, prefixes, bf16, margin, reference=None, anchor=0.0, among=None, nonsense=None,
                             encoding=None):
    """Sequence-level steps as a hinge on greedy's choice (--unlikelihood-margin): continue each prefix
    greedily, then at each token that repeats a four-token phrase, max(0, margin + log p(that token) -
    log p(the best other token)), averaged over those tokens.

    Greedy decoding asks only which token comes first. -log(1 - p) pushes a repeating token with force p,
    which fades as the distribution flattens, while near-ties among small p are where greedy text wanders
    (the prefix trial, see the model card); it also keeps pushing a token that is no longer chosen. This
    pushes with the same force until the token is margin nats below the model's next choice, raises that
    choice alone, and then stops.

    A reference model, the one the steps started from, can hold them in two ways. With `among`
    (--unlikelihood-margin-among K), the other token is the best of the reference's K likeliest there, so
    that what the hinge raises is a token the reference found plausible, not whatever junk happens to come
    second in a flattened distribution. With `anchor` (--unlikelihood-anchor), `anchor` times
    KL(reference || model) averaged over the continuation's other tokens is added: the rest of the text is
    held to the reference. With `nonsense` (--unlikelihood-nonsense P), a continuation token that the
    reference gives p < P is pushed down as a repeating one is: greedy's junk, as well as its loops. Given
    the tokenizer (--unlikelihood-early-end), so is an <|endoftext|> that ends a continuation holding no
    complete sentence: a model pushed off its loops learns that ending is never penalised, and ends right
    after the prompt or after "\nThe following functions are:". Where the document really ends there (a
    one-sentence docstring), this pushes against the data: the trade is a model that always writes on.
    """
    if reference is None and (among is not None or anchor or nonsense is not None):
        raise ValueError("a margin among a reference's likeliest tokens, or held to it, needs that reference")
    seq, repeats, others = own_continuations(model, prefixes, encoding)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(seq[:, :-1]).logits  # [batch, n - 1, n_vocab]: position i predicts token i + 1
        if reference is not None:
            with torch.no_grad():
                reference_logits = reference(seq[:, :-1]).logits.float()
    logits = logits.float()  # a difference of logits is the difference of log-probabilities
    if reference is not None:
        reference_probs = F.softmax(reference_logits, dim=-1)  # [batch, n - 1, n_vocab]
    if nonsense is not None:  # the continuation's tokens the reference finds nonsense join the repeating ones
        reference_p = reference_probs.gather(-1, seq[:, 1:, None])[..., 0]  # [batch, n - 1]
        rare = (repeats | others) & (reference_p < nonsense)
        repeats, others = repeats | rare, others & ~rare
    chosen = logits.gather(-1, seq[:, 1:, None])[..., 0]  # [batch, n - 1]
    candidates = logits
    if among is not None:  # only the reference's `among` likeliest tokens can be the other choice
        top = reference_logits.topk(among).indices  # [batch, n - 1, among]
        likeliest = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, True)
        candidates = logits.masked_fill(~likeliest, float("-inf"))
    runner_up = candidates.scatter(-1, seq[:, 1:, None], float("-inf")).amax(-1)  # [batch, n - 1]
    loss = F.relu(margin + chosen - runner_up)[repeats].sum() / max(1, int(repeats.sum()))
    if not anchor or not others.any():
        return loss
    return loss + anchor * kl_divergence(reference_probs, logits)[others].mean()  # KL at [batch, n - 1]


def token_log_probs(logits, seq):
    """The log-probability logits [batch, n - 1, n_vocab] give each next token of seq [batch, n]: [batch, n - 1]."""
    logits = logits.float()
    return logits.gather(-1, seq[:, 1:, None])[..., 0] - logits.logsumexp(-1)


@torch.no_grad()
def best_sampled_continuations(sampler, reference, prefixes, k, encoding, batches, bf16, nonsense=None):
    """--unlikelihood-best-of K: sample K continuations of each prefix [batch, n_prefix] from `sampler` (the
    model in training, or with --unlikelihood-best-of-sampler reference the reference itself; temperature
    BEST_OF_TEMPERATURE among the BEST_OF_TOP_K likeliest tokens, up to UL_CONTINUATION tokens, seeded from
    `batches`), keep those that end at <|endoftext|> after completing a sentence, without repeating a
    four-token phrase or (given `nonsense`) holding a token the reference gives p < nonsense, and of those
    take the one that scores best: the reference's mean log-probability of its tokens, its <|endoftext|>
    included, after the prefix, less BEST_OF_GENERIC times that after <|endoftext|> alone. Likelihood
    alone picks what fits every prefix: trained on, it made every continuation "New in version 3.3.\n
    Return value: New reference. Part of the Stable ABI.", with no loop and no early end. The second term
    did not stop that while the samples came from the model in training, each step's choice feeding the
    next step's samples; from the reference, which does not change, it made the shipped model.

    Returns the chosen sequences [m, n] (m <= batch: a prefix may have none; padded with <|endoftext|>) and
    which of their next-token targets [m, n - 1] are the continuation and its <|endoftext|>."""
    n_prefix = prefixes.shape[1]
    seed = int(torch.randint(2**31 - 1, (1,), generator=batches))  # so that a resumed run samples the same
    training = sampler.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sampler.eval()
        try:
            samples = sampler.generate(prefixes.repeat_interleave(k, 0), do_sample=True,
                                       attention_mask=torch.ones_like(prefixes).repeat_interleave(k, 0),
                                       temperature=BEST_OF_TEMPERATURE, top_k=BEST_OF_TOP_K,
                                       max_new_tokens=UL_CONTINUATION, eos_token_id=EOT, pad_token_id=EOT)
        finally:
            sampler.train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        reference_logits = reference(samples[:, :-1]).logits
    log_probs = token_log_probs(reference_logits, samples)  # [batch * k, n - 1]
    kept, ends = [], []  # the samples that qualify, and where each one's <|endoftext|> is
    for j, ids in enumerate(samples.tolist()):
        if EOT not in ids[n_prefix:]:
            continue
        end = ids.index(EOT, n_prefix)  # log_probs[j, i] is the reference's for token i + 1
        continuation = log_probs[j, n_prefix - 1:end - 1]
        if (repeating_positions(ids[:end], n_prefix) or not holds_a_sentence(encoding.decode(ids[n_prefix:end]))
                or (nonsense is not None and bool((continuation < math.log(nonsense)).any()))):
            continue
        kept.append(j)
        ends.append(end)
    if not kept:
        return samples[:0, :n_prefix + 1], torch.zeros(0, n_prefix, dtype=torch.bool)
    # the same continuations after <|endoftext|> alone: [len(kept), longest + 1], padded after their end
    alone = torch.full((len(kept), max(ends) - n_prefix + 2), EOT)
    for row, (j, end) in enumerate(zip(kept, ends)):
        alone[row, 1:end - n_prefix + 2] = samples[j, n_prefix:end + 1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        alone_log_probs = token_log_probs(reference(alone[:, :-1]).logits, alone)
    best = {}  # prefix row -> (score, sample, end)
    for row, (j, end) in enumerate(zip(kept, ends)):
        score = (log_probs[j, n_prefix - 1:end].mean()
                 - BEST_OF_GENERIC * alone_log_probs[row, :end - n_prefix + 1].mean()).item()
        best[j // k] = max(best.get(j // k, (-math.inf,)), (score, j, end))
    chosen = [best[row][1] for row in sorted(best)]
    ends = [best[row][2] for row in sorted(best)]
    seq = samples[chosen, :max(ends) + 1]  # [m, n]
    positions = torch.arange(seq.shape[1] - 1)  # target i is token i + 1
    targets = (positions >= n_prefix - 1) & (positions < torch.tensor(ends)[:, None])  # [m, n - 1]
    return seq, targets


def best_sample_loss(model, reference, prefixes, bf16, k, encoding, batches, nonsense=None, sampler=None):
    """Cross-entropy of the model on best_sampled_continuations' continuations and their <|endoftext|>,
    averaged over those tokens (0 when no prefix has one): a push towards text the reference finds likely
    that ends after a sentence, where the hinge only pushes away from what greedy wrote. The samples come
    from the model itself unless `sampler` is given."""
    seq, targets = best_sampled_continuations(model if sampler is None else sampler, reference, prefixes, k, encoding,
                                              batches, bf16, nonsense)
    if not targets.any():
        return torch.zeros((), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(seq[:, :-1]).logits  # [m, n - 1, n_vocab]
    return F.cross_entropy(logits.float()[targets], seq[:, 1:][targets])


def anchored_unlikelihood_loss(model, reference, prefixes, bf16, anchor):
    """Sequence-level unlikelihood held to a reference model (--unlikelihood-anchor): continue each prefix
    greedily, then train the model towards the reference's next-token distribution with the repeating
    token taken out, at each token that repeats a four-token phrase, and towards the reference's own
    distribution, weighted `anchor`, at the continuation's other tokens.

    On a repeating token's logit the push is -log(1 - p)'s (the gradient is p either way); the difference
    is where the probability goes. -log(1 - p) leaves that to the shared weights, and the demo model drifted
    onto rare tokens where it stopped looping ("tolerated tolerated toleratedEss"); here it goes to what
    the reference, the model before these steps, would have written instead. At the reference the loss is
    -log(1 - p) exactly. Returns KL(target || model) averaged over the repeating tokens, plus `anchor` times
    that averaged over the others.
    """
    seq, repeats, others = own_continuations(model, prefixes)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(seq[:, :-1]).logits  # [batch, n - 1, n_vocab]: position i predicts token i + 1
        with torch.no_grad():
            target = F.softmax(reference(seq[:, :-1]).logits.float(), dim=-1)
    without_repeat = target.scatter(-1, seq[:, 1:, None], 0.0)
    without_repeat = without_repeat / without_repeat.sum(-1, keepdim=True).clamp_min(1e-12)
    target = torch.where(repeats[..., None], without_repeat, target)
    kl = kl_divergence(target, logits)  # [batch, n - 1]
    return ((kl[repeats].mean() if repeats.any() else 0 * kl.sum())
            + (anchor * kl[others].mean() if others.any() else 0 * kl.sum()))


def looping_openings(model, prompts_ids, encoding):
    """How many greedy continuations of SAMPLE_TOKENS (ending at <|endoftext|>) repeat a four-token phrase,
    and how many end holding no complete sentence."""
    loops = unfinished = 0
    for ids in prompts_ids:
        new = greedy_torch(model, torch.tensor([ids]), SAMPLE_TOKENS, stop_at_eot=True)[0].tolist()
        ended = EOT in new
        new = new[:new.index(EOT)] if ended else new
        loops += repeated_phrase(new) is not None
        unfinished += ended and not holds_a_sentence(encoding.decode(new))
    return loops, unfinished


class UnlikelihoodSchedule:
    """The constant rate UL_LR until the looping continuations of training openings have fallen by fewer
    than UL_PLATEAU over the last PATIENCE evaluations, or until max_steps."""

    def __init__(self, max_steps, loop_counts=(), stopped_at=None):
        self.max_steps, self.loop_counts, self.stopped_at = max_steps, list(loop_counts), stopped_at

    def lr(self, step):
        return UL_LR

    @property
    def end(self):
        return self.stopped_at or self.max_steps

    @property
    def fewest_loops_step(self):
        """The step of the first evaluation at which the fewest training openings looped."""
        return min((int(np.argmin(self.loop_counts)) + 1) * EVAL_EVERY, self.end)

    def evaluated(self, step, loops):
        """Record an evaluation after `step` steps; returns why training stops now, or None."""
        self.loop_counts.append(loops)
        recent = self.loop_counts[-PATIENCE - 1:]
        if len(recent) > PATIENCE and recent[0] - min(recent[1:]) < UL_PLATEAU:
            self.stopped_at = step
            return f"the looping openings fell by fewer than {UL_PLATEAU} over the last {PATIENCE} evaluations"
        return None


class Schedule:
    """Warmup-stable-decay: a linear warm-up to LR, LR while the held-out loss improves, then a linear decay
    to MIN_LR over DECAY_FRACTION of the steps trained so far. The decay starts when the held-out loss has
    improved by less than PLATEAU over the last PATIENCE evaluations, or in time to end at max_steps."""

    def __init__(self, max_steps, decay_start=None, decay_steps=None, val_losses=()):
        self.max_steps, self.decay_start, self.decay_steps = max_steps, decay_start, decay_steps
        self.val_losses = list(val_losses)

    def lr(self, step):  # step counts from 0
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        if self.decay_start is None or step < self.decay_start:
            return LR
        return LR - (LR - MIN_LR) * min(1.0, (step - self.decay_start + 1) / self.decay_steps)

    @property
    def end(self):
        return None if self.decay_start is None else self.decay_start + self.decay_steps

    def evaluated(self, step, val_loss):
        """Record an evaluation after `step` steps; returns why the decay starts now, or None."""
        self.val_losses.append(val_loss)
        if self.decay_start is not None:
            return None
        recent = self.val_losses[-PATIENCE - 1:]
        why = None
        if len(recent) > PATIENCE and recent[0] - min(recent[1:]) < PLATEAU:
            why = f"the held-out loss improved by less than {PLATEAU} over the last {PATIENCE} evaluations"
        elif step * (1 + DECAY_FRACTION) >= self.max_steps:
            why = f"--max-steps {self.max_steps} is near"
        if why:
            self.decay_start = step
            self.decay_steps = max(1, self.max_steps - step) if why.startswith("--") else round(DECAY_FRACTION * step)
        return why


def save_checkpoint(path, model, optimizer, batches, state):
    """Everything training needs to go on exactly where it stopped, in one safetensors file (no pickle),
    replaced atomically: the weights, AdamW's moments, the data order's generator, PyTorch's own random
    state, and `state` (JSON)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.transformer.state_dict().items()}
    for i, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            tensors[f"adam.{i}.{key}"] = value.detach().reshape(-1) if key == "step" else value.detach()
    tensors["batches"] = batches.get_state()
    tensors["torch_rng"] = torch.get_rng_state()  # dropout's random numbers, when there is dropout
    partial = Path(path).with_name(Path(path).name + ".partial")
    save_file(tensors, partial, metadata={"state": json.dumps(state)})
    os.replace(partial, path)


def load_checkpoint(path, model, optimizer, batches):
    """Restore what save_checkpoint wrote; returns its state."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        state = json.loads(f.metadata()["state"])
    tensors = load_file(path)
    model.transformer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    saved = optimizer.state_dict()
    for i in range(len(list(model.parameters()))):
        if f"adam.{i}.exp_avg" in tensors:
            saved["state"][i] = {"step": tensors[f"adam.{i}.step"].reshape(()),
                                 "exp_avg": tensors[f"adam.{i}.exp_avg"],
                                 "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"]}
    optimizer.load_state_dict(saved)
    batches.set_state(tensors["batches"])
    if "torch_rng" in tensors:
        torch.set_rng_state(tensors["torch_rng"])
    return state


def write_model(model, path):
    """Write the weights through picogpt's ModelFileWriter (Conv1D weights are already [n_in, n_out])."""
    state = model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight, "the output layer must be tied to wte"
    # hf_to_model_dat_name gives None for lm_head.weight (the tied wte) and anything that is not a weight.
    tensors = {name: v.detach().numpy() for k, v in state.items() if (name := hf_to_model_dat_name(k))}
    assert set(tensors) == set(gpt2_tensor_specs(HPARAMS)), "state dict does not map onto model.dat"
    with ModelFileWriter(path, HPARAMS, weight_dtype=WEIGHT_DTYPE) as out:
        for name, array in tensors.items():
            out.write(name, array)


def held_out_perplexity(model_path, docs, encoding):
    """picogpt's own perplexity over every held-out document (each after <|endoftext|>, longer ones in
    sliding windows): the number the model card compares between models, on the file as shipped."""
    model = picogpt.load(model_path, quiet=True)
    total_log_prob, n_tokens = 0.0, 0
    for doc in docs:
        result = score(model, [EOT] + encoding.encode_ordinary(doc))
        total_log_prob += result.log_prob
        n_tokens += result.n_tokens
    return n_tokens, math.exp(-total_log_prob / n_tokens)


def repeated_phrase(ids, n=4):
    """The first run of n tokens that occurs twice in ids, as text-free ids, or None."""
    positions = repeating_positions(ids, 0, n)  # the first of them starts the first repeat
    return tuple(ids[positions[0]:positions[0] + n]) if positions else None


def greedy_loops(model_path, prompts, encoding, reference=None):
    """How many greedy continuations of the prompts repeat a four-token phrase within SAMPLE_TOKENS tokens,
    how many within the MAKE_RUN_TOKENS that `make run` prints, how many end (at <|endoftext|>) before
    SAMPLE_TOKENS, how many of those before they complete a sentence (empty ones too), and how many of the
    continuations are distinct: the issue's test of the demo model ("at least one complete sentence", "no
    phrase repeated within 30 tokens"), counted over every held-out docstring opening rather than read on a
    dozen. A model that says little loops little, one that ends after "The following functions are:" writes
    no sentence, and one that ends every prompt with "New in version 3.11." does neither
    (--unlikelihood-best-of's trials).

    With a reference model (picogpt's), also how many continuations hold a token that it gives p < RARE_P,
    and its mean negative log-likelihood of their tokens (nats per token): a model can stop looping by
    writing nonsense ("tolerated tolerated toleratedEss"), which a loop count does not see."""
    model = picogpt.load(model_path, quiet=True)
    within_sample = within_make_run = ended_early = unfinished = rare = 0
    nll, n_tokens, continuations = 0.0, 0, set()
    for prompt in prompts:
        ids = encoding.encode(prompt)
        new = list(generate(model, ids, SAMPLE_TOKENS))
        continuations.add(tuple(new))
        within_sample += repeated_phrase(new) is not None
        within_make_run += repeated_phrase(new[:MAKE_RUN_TOKENS]) is not None
        ended_early += len(new) < SAMPLE_TOKENS
        unfinished += len(new) < SAMPLE_TOKENS and not holds_a_sentence(encoding.decode(new))
        if reference is not None and new:
            log_probs = score(reference, ids + new).token_log_probs[len(ids) - 1:]  # [len(new)]
            rare += bool((log_probs < math.log(RARE_P)).any())
            nll -= log_probs.sum()
            n_tokens += len(new)
    counts = within_sample, within_make_run, ended_early, unfinished, len(continuations)
    return counts if reference is None else (*counts, rare, nll / max(1, n_tokens))


def greedy_loops_line(model_path, prompts, encoding, reference_path=None):
    reference = picogpt.load(reference_path, quiet=True) if reference_path else None
    within_sample, within_make_run, ended_early, unfinished, distinct, *rare = greedy_loops(model_path, prompts,
                                                                                          encoding, reference)
    return (f"greedy loops: {within_sample} of {len(prompts)} held-out docstring openings repeat a four-token phrase "
            f"within {SAMPLE_TOKENS} tokens, {within_make_run} within {MAKE_RUN_TOKENS}; {ended_early} end before "
            f"{SAMPLE_TOKENS} tokens, {unfinished} of them before completing a sentence; {distinct} are distinct; "
            f"for {model_path}"
            + (f"; {rare[0]} hold a token that {reference_path} gives p < {RARE_P:g}, and its mean negative "
               f"log-likelihood of their tokens is {rare[1]:.3f} nats" if rare else ""))


def opening(doc, n_words=4):
    """The first few words of a document's first line: a prompt the model never saw continued."""
    return " ".join(doc.splitlines()[0].split()[:n_words])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=20000,
                   help="the most optimizer steps; training normally stops earlier, on the held-out loss")
    p.add_argument("--out", default="data/demo/model.dat", help="model file to write")
    p.add_argument("--seed", type=int, default=1234, help="seeds initialisation and batch order")
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads (the result depends on it)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="products in bfloat16 autocast or float32 (auto: bf16 where the CPU has it natively)")
    p.add_argument("--docs", default=DOCS_DIR, help=f"the HTML documentation (Debian: apt-get install {DOCS_PACKAGE})")
    p.add_argument("--log", default="data/demo/train_log.txt", help="log file (appended to when resuming)")
    p.add_argument("--checkpoint", help="written at every evaluation; the same command resumes from it (default: "
                                        "build/demo_checkpoint.safetensors, or build/demo_unlikelihood.safetensors "
                                        "with --unlikelihood-from)")
    p.add_argument("--fresh", action="store_true", help="start again, ignoring an existing checkpoint")
    p.add_argument("--continue-from", metavar="CHECKPOINT",
                   help="train on from a checkpoint with its decay undone (the .stable.safetensors written when the "
                        "decay began), at the constant rate, until the held-out loss stops improving or --max-steps")
    p.add_argument("--unlikelihood-from", metavar="MODEL_DAT",
                   help="train a trained model on with unlikelihood steps against its greedy loops (at a constant "
                        f"rate {UL_LR}), until they stop falling or --max-steps; the log is appended to")
    p.add_argument("--unlikelihood-anchor", metavar="WEIGHT", type=float,
                   help="with --unlikelihood-from: hand the probability taken from a repeating token to the starting "
                        "model's other choices, and hold the rest of each continuation to it with this weight "
                        "(0.25 was tried), instead of -log(1 - p) alone; with --unlikelihood-margin, only the latter")
    p.add_argument("--unlikelihood-margin", metavar="NATS", type=float,
                   help="with --unlikelihood-from: instead of -log(1 - p), push each repeating token this many nats "
                        "below the model's best other choice (a hinge on the logits), and no further")
    p.add_argument("--unlikelihood-margin-among", metavar="K", type=int,
                   help="with --unlikelihood-margin: take the best other choice among the starting model's K likeliest "
                        "next tokens only (K >= 2), so that the hinge raises a token that model found plausible")
    p.add_argument("--unlikelihood-nonsense", metavar="P", type=float,
                   help="with --unlikelihood-margin: also push down each continuation token that the reference gives "
                        "p < P, as a repeating one is (greedy's junk as well as its loops)")
    p.add_argument("--unlikelihood-early-end", action="store_true",
                   help="with --unlikelihood-margin: also push down an <|endoftext|> that ends a continuation "
                        "holding no complete sentence (empty, or only \"The following functions are:\"), as a "
                        "repeating token is, even where the document does end there")
    p.add_argument("--unlikelihood-best-of", metavar="K", type=int,
                   help="with --unlikelihood-from: also sample K continuations of each prefix (temperature "
                        f"{BEST_OF_TEMPERATURE}, top-k {BEST_OF_TOP_K}) and train on the best by the reference among "
                        "those that end after a complete sentence without repeating a phrase (or, with "
                        "--unlikelihood-nonsense, holding nonsense): its mean log-probability after the prefix less "
                        f"{BEST_OF_GENERIC} times that without; raise good text, not only push down bad (4 was "
                        "tried: sampled from the model itself, every continuation collapsed onto \"New in version "
                        "3.11.\"; see --unlikelihood-best-of-sampler)")
    p.add_argument("--unlikelihood-best-of-sampler", choices=["model", "reference"],
                   help="with --unlikelihood-best-of: sample from the model in training (the default), whose best "
                        "samples feed back into what it samples next, or from the reference, which does not change "
                        "(the shipped model's last run)")
    p.add_argument("--unlikelihood-reference", metavar="MODEL_DAT",
                   help="the model that --unlikelihood-margin-among, --unlikelihood-nonsense, --unlikelihood-anchor "
                        "and --unlikelihood-best-of hold the steps to (default: the starting model, "
                        "--unlikelihood-from)")
    p.add_argument("--unlikelihood-prefixes", choices=["windows", "openings", "sentences"], default="windows",
                   help=f"with --unlikelihood-from, what the sequence-level steps continue: windows, random "
                        f"{UL_PREFIX}-token training windows (the default); openings, the first {UL_OPENING} tokens of "
                        "random training documents, as short as a prompt; sentences, openings alternating with "
                        f"documents' whole first sentences (up to {UL_PREFIX} tokens), as a prompt that is one already")
    p.add_argument("--token-unlikelihood", metavar="WEIGHT", type=float,
                   help="add this weight times token-level unlikelihood to the next-token steps: lower the "
                        "probability of the window's earlier tokens that are not the next one (1.0 was tried)")
    p.add_argument("--keep", choices=["last", "fewest-loops"], default="last",
                   help="with --unlikelihood-from: write the weights of the last evaluation (the default) or of the "
                        "one at which the fewest training openings looped (kept as the run goes in the checkpoint's "
                        ".best.safetensors; given to a finished run, writes them without training)")
    p.add_argument("--compare", metavar="MODEL_DAT", help="another model file to give the held-out perplexity of")
    p.add_argument("--judge", metavar="MODEL_DAT", nargs="+",
                   help="do not train: count the greedy continuations of every held-out docstring opening that "
                        "repeat a phrase, and those that end holding no complete sentence, for each model file")
    p.add_argument("--reference", metavar="MODEL_DAT",
                   help="with --judge: also count the continuations that hold a token this model gives p < "
                        f"{RARE_P:g} (nonsense), and give its mean negative log-likelihood of their tokens")
    args = p.parse_args()
    if args.checkpoint is None:  # the unlikelihood steps keep their own, so as not to resume (or replace) the other
        args.checkpoint = f"build/demo_{'unlikelihood' if args.unlikelihood_from else 'checkpoint'}.safetensors"
    fewest_loops_checkpoint = Path(args.checkpoint).with_suffix(".best.safetensors")
    if args.judge:
        named = args.judge + ([args.reference] if args.reference else [])
        missing = [path for path in named if not Path(path).is_file()]
        if missing:
            sys.exit(f"error: no model file {missing[0]}; name a model.dat (such as data/demo/model.dat)")
        encoding = load_tokenizer()
        prompts = [opening(doc) for doc in docstrings(stdlib_files()) if is_held_out(doc)]
        for path in args.judge:
            print(greedy_loops_line(path, prompts, encoding, args.reference), flush=True)
        return
    if args.reference:
        sys.exit("error: --reference judges models; give --judge MODEL_DAT ... as well")
    if args.unlikelihood_from and args.continue_from:
        sys.exit("error: --unlikelihood-from and --continue-from start from different places; give one")
    unlikelihood_only = [  # flags that mean nothing without unlikelihood steps, and what each does to them
        (args.unlikelihood_prefixes != "windows", "--unlikelihood-prefixes chooses what unlikelihood steps continue"),
        (args.keep != "last", "--keep chooses among the evaluations of unlikelihood steps"),
        (args.unlikelihood_margin is not None, "--unlikelihood-margin shapes unlikelihood steps"),
        (args.unlikelihood_margin_among is not None, "--unlikelihood-margin-among shapes unlikelihood steps"),
        (args.unlikelihood_nonsense is not None, "--unlikelihood-nonsense shapes unlikelihood steps"),
        (args.unlikelihood_early_end, "--unlikelihood-early-end shapes unlikelihood steps"),
        (args.unlikelihood_best_of is not None, "--unlikelihood-best-of adds to unlikelihood steps"),
        (args.unlikelihood_reference is not None, "--unlikelihood-reference holds unlikelihood steps"),
        (args.unlikelihood_anchor is not None, "--unlikelihood-anchor weighs unlikelihood steps")]
    for given, what in unlikelihood_only:
        if given and not args.unlikelihood_from:
            sys.exit(f"error: {what}; give --unlikelihood-from MODEL_DAT as well")
    margin_only = [  # flags that mean nothing without the margin, and what each does with it
        (args.unlikelihood_margin_among is not None, "--unlikelihood-margin-among chooses the margin's other token"),
        (args.unlikelihood_nonsense is not None, "--unlikelihood-nonsense pushes tokens down with the margin"),
        (args.unlikelihood_early_end, "--unlikelihood-early-end pushes <|endoftext|> down with the margin")]
    for given, what in margin_only:
        if given and args.unlikelihood_margin is None:
            sys.exit(f"error: {what}; give --unlikelihood-margin NATS as well")
    if args.unlikelihood_best_of_sampler is not None and args.unlikelihood_best_of is None:
        sys.exit("error: --unlikelihood-best-of-sampler chooses where --unlikelihood-best-of samples; give "
                 "--unlikelihood-best-of K as well")
    if args.unlikelihood_nonsense is not None and not 0 < args.unlikelihood_nonsense < 1:
        sys.exit("error: --unlikelihood-nonsense needs a probability P between 0 and 1 (1e-4 was tried)")
    if args.unlikelihood_reference is not None and not Path(args.unlikelihood_reference).is_file():
        sys.exit(f"error: no model file {args.unlikelihood_reference} to hold unlikelihood steps to")
    if args.unlikelihood_margin_among is not None and not 2 <= args.unlikelihood_margin_among <= N_VOCAB:
        sys.exit(f"error: --unlikelihood-margin-among needs K from 2 (the repeating token may be one of them) to "
                 f"{N_VOCAB} (the vocabulary)")
    if args.unlikelihood_best_of is not None and args.unlikelihood_best_of < 1:
        sys.exit("error: --unlikelihood-best-of needs K of 1 or more samples a prefix (4 was tried)")
    if args.unlikelihood_from and not Path(args.unlikelihood_from).is_file():
        sys.exit(f"error: no model file {args.unlikelihood_from} to train on with unlikelihood steps")
    if not Path(args.docs, "index.html").is_file():
        sys.exit(f"error: no Python documentation in {args.docs}; install it with `apt-get install {DOCS_PACKAGE}` "
                 f"or name its HTML folder with --docs")

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    file_size = ModelFileWriter(args.out, HPARAMS, weight_dtype=WEIGHT_DTYPE).file_size  # the layout; opens nothing
    assert file_size <= MAX_FILE_BYTES, f"{file_size} bytes is over the {MAX_FILE_BYTES} byte limit"

    docstring_docs = list(docstrings(stdlib_files()))
    seen, docs = set(docstring_docs), list(docstring_docs)
    for doc in docs_documents(args.docs):
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    train_docs = [d for d in docs if not is_held_out(d)]
    val_docs = [d for d in docs if is_held_out(d)]
    encoding = load_tokenizer()
    train, val = token_stream(train_docs, encoding), token_stream(val_docs, encoding)
    digest = hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()[:16]

    native_bf16 = hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    precision = {"auto": "bf16" if native_bf16 else "fp32"}.get(args.precision, args.precision)
    settings = dict(hparams=HPARAMS, weight_dtype=WEIGHT_DTYPE, batch=[BATCH_SIZE, BLOCK_SIZE], lr=[LR, MIN_LR, WARMUP],
                    weight_decay=WEIGHT_DECAY, schedule=[PLATEAU, PATIENCE, DECAY_FRACTION, EVAL_EVERY],
                    seed=args.seed, tokens=digest)
    if args.unlikelihood_from:  # and the weights it starts from
        start = hashlib.sha256(Path(args.unlikelihood_from).read_bytes()).hexdigest()[:16]
        settings["unlikelihood"] = dict(start=start, lr=UL_LR, prefix=UL_PREFIX, continuation=UL_CONTINUATION,
                                        every=UL_EVERY, plateau=UL_PLATEAU, openings=N_LOOP_OPENINGS)
        if args.unlikelihood_anchor is not None:
            settings["unlikelihood"]["anchor"] = args.unlikelihood_anchor
        if args.unlikelihood_margin is not None:
            settings["unlikelihood"]["margin"] = args.unlikelihood_margin
        if args.unlikelihood_margin_among is not None:
            settings["unlikelihood"]["margin_among"] = args.unlikelihood_margin_among
        if args.unlikelihood_nonsense is not None:
            settings["unlikelihood"]["nonsense"] = args.unlikelihood_nonsense
        if args.unlikelihood_early_end:
            settings["unlikelihood"]["early_end"] = True
        if args.unlikelihood_best_of is not None:
            settings["unlikelihood"]["best_of"] = [args.unlikelihood_best_of, BEST_OF_TEMPERATURE, BEST_OF_TOP_K,
                                                   BEST_OF_GENERIC]
            if args.unlikelihood_best_of_sampler == "reference":
                settings["unlikelihood"]["best_of"].append("reference")
        if args.unlikelihood_reference is not None:
            settings["unlikelihood"]["reference"] = hashlib.sha256(
                Path(args.unlikelihood_reference).read_bytes()).hexdigest()[:16]
        if args.unlikelihood_prefixes != "windows":
            settings["unlikelihood"]["prefixes"] = [args.unlikelihood_prefixes, UL_OPENING]
    if args.token_unlikelihood is not None:
        settings["token_unlikelihood"] = args.token_unlikelihood

    config = GPT2Config(vocab_size=HPARAMS["n_vocab"], n_positions=HPARAMS["n_ctx"], n_embd=HPARAMS["n_embd"],
                        n_layer=HPARAMS["n_layer"], n_head=HPARAMS["n_head"],
                        layer_norm_epsilon=HPARAMS["layer_norm_epsilon"], activation_function="gelu_new",
                        resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)
    model = GPT2LMHeadModel(config).train()
    n_params = sum(t.numel() for t in model.parameters())  # the tied lm_head counts once
    # Weight decay on matrices only (not on biases and layer-norm gains), as GPT-2 reimplementations do.
    decay = [t for t in model.parameters() if t.dim() >= 2]
    no_decay = [t for t in model.parameters() if t.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))
    batches = torch.Generator().manual_seed(args.seed)  # the data order: random offsets, fixed by the seed
    schedule = UnlikelihoodSchedule(args.max_steps) if args.unlikelihood_from else Schedule(args.max_steps)
    step, trained_s = 0, 0.0

    if args.continue_from and not Path(args.continue_from).is_file():
        sys.exit(f"error: no checkpoint {args.continue_from} to continue from")
    source = args.continue_from or args.checkpoint
    resume = Path(source).is_file() and (not args.fresh or bool(args.continue_from))
    if resume:
        state = load_checkpoint(source, model, optimizer, batches)
        if state["settings"] != settings:
            sys.exit(f"error: {source} was made with other settings or another corpus; "
                     f"run with --fresh to start again")
        step, trained_s, precision = state["step"], state["trained_s"], state["precision"]
        train_loss, val_loss = state.get("train_loss"), state.get("val_loss")  # the last evaluation's
        if args.continue_from:  # the weights from before the decay, and the constant rate again
            state["decay_start"] = state["decay_steps"] = None
        if args.unlikelihood_from:
            schedule = UnlikelihoodSchedule(args.max_steps, state["loop_counts"], state["stopped_at"])
        else:
            schedule = Schedule(args.max_steps, state["decay_start"], state["decay_steps"], state["val_losses"])
        if state["threads"] != args.threads:
            print(f"note: the checkpoint trained on {state['threads']} threads, this run on {args.threads}; "
                  f"the result will differ slightly from an uninterrupted run", file=sys.stderr)
    reference = None  # the frozen model the unlikelihood steps are held to (starting model or --unlikelihood-reference)
    if args.unlikelihood_from:  # the trained weights (bfloat16 matrices widened exactly)
        trained = open_model_file(args.unlikelihood_from)
        if trained.hparams != HPARAMS:
            sys.exit(f"error: {args.unlikelihood_from} is not this script's model ({trained.hparams})")
        held = (args.unlikelihood_anchor is not None or args.unlikelihood_margin_among is not None
                or args.unlikelihood_nonsense is not None or args.unlikelihood_best_of is not None)
        if not resume:  # where the model starts, with a fresh AdamW (a resumed run's weights are the checkpoint's)
            model.transformer.load_state_dict(hf_model(trained.hparams, trained.tensors).transformer.state_dict())
        if held:  # and what it is held to, frozen: the starting model or --unlikelihood-reference
            held_to = open_model_file(args.unlikelihood_reference) if args.unlikelihood_reference else trained
            if held_to.hparams != HPARAMS:
                sys.exit(f"error: {args.unlikelihood_reference} is not this script's model ({held_to.hparams})")
            reference = GPT2LMHeadModel(config).eval().requires_grad_(False)
            reference.transformer.load_state_dict(hf_model(held_to.hparams, held_to.tensors).transformer.state_dict())
    bf16 = precision == "bf16"

    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    log_file = open(args.log, "a" if resume or args.unlikelihood_from else "w", encoding="utf-8")

    def log(message=""):
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    environment = (f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} threads, "
                   f"{platform.machine()}, products in {precision} (native bfloat16: {'yes' if native_bf16 else 'no'})")
    token_level = (f" token-level unlikelihood (weight {args.token_unlikelihood}) on the window's earlier tokens"
                   if args.token_unlikelihood else "")
    if args.unlikelihood_from and not resume:
        held_to = args.unlikelihood_reference or "the starting model"  # the model the steps are held to
        if args.unlikelihood_margin is not None:
            on_repeats = (f"pushes each token that repeats a four-token phrase {args.unlikelihood_margin:g} nats "
                          f"below the model's best other choice (a hinge on the logits)")
            if args.unlikelihood_margin_among is not None:
                on_repeats += f" among {held_to}'s {args.unlikelihood_margin_among} likeliest tokens"
            if args.unlikelihood_nonsense is not None:
                on_repeats += f", and so each token that {held_to} gives p < {args.unlikelihood_nonsense:g}"
            if args.unlikelihood_early_end:
                on_repeats += ", and each <|endoftext|> that ends a continuation before it completes a sentence"
        else:
            on_repeats = "lowers the probability of each token that repeats a four-token phrase"
        if args.unlikelihood_anchor is None:
            anchor_text = ""
        elif args.unlikelihood_margin is not None:
            anchor_text = (f", holding the rest of the continuation to {held_to}'s distributions with "
                           f"weight {args.unlikelihood_anchor}")
        else:
            anchor_text = (f", handing it to {held_to}'s other choices and holding the rest of the "
                           f"continuation to that model's distributions with weight {args.unlikelihood_anchor}")
        best_of_text = ""
        if args.unlikelihood_best_of is not None:
            sampled_by = f" from {held_to}" if args.unlikelihood_best_of_sampler == "reference" else ""
            best_of_text = (f"; and it samples {args.unlikelihood_best_of} continuations of each{sampled_by} "
                            f"(temperature {BEST_OF_TEMPERATURE}, top-k {BEST_OF_TOP_K}) and trains on the best of "
                            f"those that end after a complete sentence without repeating a phrase"
                            + (" or holding nonsense" if args.unlikelihood_nonsense is not None else "")
                            + f": the highest mean log-probability {held_to} gives it after the prefix, less "
                            f"{BEST_OF_GENERIC} times that after <|endoftext|> alone")
        log(f"unlikelihood: {' '.join([Path(sys.executable).name] + sys.argv)}")
        log(environment)
        log(f"corpus: {docs_version(args.docs)}; tokens sha256 {digest}")  # the next-token steps' and openings'
        log(f"from {args.unlikelihood_from} (sha256 {settings['unlikelihood']['start']}), a fresh AdamW at lr {UL_LR}: "
            f"one step in {UL_EVERY} continues {BATCH_SIZE} "
            + {"windows": f"training windows of {UL_PREFIX} tokens",
               "openings": f"training documents' first {UL_OPENING} tokens",
               "sentences": f"training documents' first {UL_OPENING} tokens, or every other time their first "
                            f"sentence (up to {UL_PREFIX} tokens, one length in a batch),"}[args.unlikelihood_prefixes]
            + " greedily for "
            f"{UL_CONTINUATION} tokens and " + on_repeats + anchor_text + best_of_text +
            "; the others are next-token steps" + (" with" + token_level if token_level else "") +
            f"; until the greedy continuations of {N_LOOP_OPENINGS} training "
            f"docstring openings that loop fall by fewer than {UL_PLATEAU} over {PATIENCE} evaluations, "
            f"at most {args.max_steps} steps")
    elif resume:
        log(f"resumed: step {step} from {source}{' with the decay undone' if args.continue_from else ''} "
            f"({' '.join([Path(sys.executable).name] + sys.argv)})")
    else:
        log(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
        log(environment)
        log(f"corpus: {len(docstring_docs)} docstrings from {sysconfig.get_paths()['stdlib']}; "
            f"{len(docs) - len(docstring_docs)} documents from {docs_version(args.docs)}")
        log(f"split: train {len(train_docs)} documents, {len(train)} tokens; held out {len(val_docs)} documents, "
            f"{len(val)} tokens; tokens sha256 {digest}")
        log(f"model: {HPARAMS}, {n_params} parameters, model.dat {file_size} bytes ({WEIGHT_DTYPE} matrices)")
        log(f"training: {BATCH_SIZE} x {BLOCK_SIZE} tokens a step, AdamW lr {LR} (warm-up {WARMUP}, then constant "
            f"until the held-out loss improves by less than {PLATEAU} over {PATIENCE} evaluations, then a linear "
            f"decay to {MIN_LR} over {DECAY_FRACTION:.0%} of the steps), weight decay {WEIGHT_DECAY}, dropout "
            f"{DROPOUT}, grad clip 1.0, seed {args.seed}, at most {args.max_steps} steps"
            + (";" + token_level if token_level else ""))

    train_windows, val_windows = fixed_windows(train, EVAL_WINDOWS), fixed_windows(val, EVAL_WINDOWS)
    train_docstrings = [d for d in docstring_docs if not is_held_out(d)]
    loop_openings = [encoding.encode(opening(train_docstrings[i]))
                     for i in np.linspace(0, len(train_docstrings) - 1, N_LOOP_OPENINGS).astype(int)]
    train_openings = document_openings(train)
    train_sentences = None
    if args.unlikelihood_prefixes == "sentences":
        train_sentences = document_sentences(train, *sentence_ends(encoding))
        if not train_sentences:
            sys.exit(f"error: no training document has a first sentence within {UL_PREFIX} tokens to continue; "
                     f"use --unlikelihood-prefixes openings")
        if not resume:  # (sentences come with --unlikelihood-from, checked above)
            log(f"first sentences: {sum(map(len, train_sentences.values()))} of the {len(train_docs)} training "
                f"documents have one within {UL_PREFIX} tokens")
    losses, unlikelihood_losses, best_of_losses, t_sitting = [], [], [], time.perf_counter()
    while schedule.end is None or step < schedule.end:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step)
        if args.unlikelihood_from and step % UL_EVERY == UL_EVERY - 1:
            if args.unlikelihood_prefixes == "windows":
                prefixes = random_windows(train, UL_PREFIX, batches)
            elif args.unlikelihood_prefixes == "sentences" and step // UL_EVERY % 2:
                prefixes = random_sentences(train, train_sentences, batches)
            else:
                prefixes = random_openings(train, train_openings, batches)
            if args.unlikelihood_margin is not None:
                loss = margin_unlikelihood_loss(model, prefixes, bf16, args.unlikelihood_margin, reference,
                                                args.unlikelihood_anchor or 0.0, args.unlikelihood_margin_among,
                                                args.unlikelihood_nonsense,
                                                encoding if args.unlikelihood_early_end else None)
            elif args.unlikelihood_anchor is None:
                loss = unlikelihood_loss(model, prefixes, bf16)
            else:
                loss = anchored_unlikelihood_loss(model, reference, prefixes, bf16, args.unlikelihood_anchor)
            unlikelihood_losses.append(loss.item())
            if args.unlikelihood_best_of is not None:
                best_of = best_sample_loss(model, reference, prefixes, bf16, args.unlikelihood_best_of, encoding,
                                           batches, args.unlikelihood_nonsense,
                                           reference if args.unlikelihood_best_of_sampler == "reference" else None)
                best_of_losses.append(best_of.item())
                loss = loss + best_of
        else:
            loss = lm_loss(model, random_windows(train, BLOCK_SIZE, batches, with_next=True), bf16,
                           args.token_unlikelihood or 0.0)
            losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % EVAL_EVERY == 0 or step == schedule.end:
            train_loss, val_loss = evaluate(model, train_windows, bf16), evaluate(model, val_windows, bf16)
            elapsed = trained_s + time.perf_counter() - t_sitting
            state = dict(settings=settings, step=step, trained_s=elapsed, precision=precision, threads=args.threads,
                         train_loss=train_loss, val_loss=val_loss)
            if args.unlikelihood_from:
                loops, unfinished = looping_openings(model, loop_openings, encoding)
                log(f"step {step:5d} | lr {schedule.lr(step - 1):.2e} | batch loss {np.mean(losses):.4f} "
                    f"| unlikelihood loss {np.mean(unlikelihood_losses):.4f} "
                    + (f"| best-of loss {np.mean(best_of_losses):.4f} " if best_of_losses else "")
                    + f"| train loss {train_loss:.4f} "
                    f"| val loss {val_loss:.4f} | loops {loops}/{len(loop_openings)} "
                    f"| unfinished {unfinished}/{len(loop_openings)} | {elapsed:6.0f} s")
                losses, unlikelihood_losses, best_of_losses = [], [], []
                why = schedule.evaluated(step, loops)
                state.update(loop_counts=schedule.loop_counts, stopped_at=schedule.stopped_at)
                if why:
                    log(f"stop: at step {step}, because {why}")
                if schedule.fewest_loops_step == step:  # for --keep fewest-loops, now or when the run is over
                    save_checkpoint(fewest_loops_checkpoint, model, optimizer, batches, state)
                save_checkpoint(args.checkpoint, model, optimizer, batches, state)
                continue
            log(f"step {step:5d} | lr {schedule.lr(step - 1):.2e} | batch loss {np.mean(losses):.4f} "
                f"| train loss {train_loss:.4f} | val loss {val_loss:.4f} | {elapsed:6.0f} s")
            losses = []
            why = schedule.evaluated(step, val_loss)
            state.update(decay_start=schedule.decay_start, decay_steps=schedule.decay_steps,
                         val_losses=schedule.val_losses)
            if why:
                log(f"decay: from step {step} over {schedule.decay_steps} steps, because {why}")
                # The weights before any decay: --continue-from it trains on at the constant rate, further
                stable = Path(args.checkpoint).with_suffix(".stable.safetensors")
                save_checkpoint(stable, model, optimizer, batches, state)
                log(f"saved {stable}: train on from here with --continue-from {stable} --max-steps N")
            save_checkpoint(args.checkpoint, model, optimizer, batches, state)
    elapsed = trained_s + time.perf_counter() - t_sitting
    if args.keep == "fewest-loops" and schedule.fewest_loops_step != step:
        if not fewest_loops_checkpoint.is_file():
            sys.exit(f"error: no {fewest_loops_checkpoint} with the weights of step {schedule.fewest_loops_step}; "
                     f"write the last evaluation's without --keep")
        kept = load_checkpoint(fewest_loops_checkpoint, model, optimizer, batches)
        if kept["settings"] != settings or kept["step"] != schedule.fewest_loops_step:
            sys.exit(f"error: {fewest_loops_checkpoint} is not step {schedule.fewest_loops_step} of this run; "
                     f"write the last evaluation's without --keep")
        step, train_loss, val_loss = kept["step"], kept["train_loss"], kept["val_loss"]
        log(f"kept: step {step}, at which {kept['loop_counts'][-1]} of {N_LOOP_OPENINGS} training openings looped, "
            f"the fewest of the run (--keep fewest-loops; {fewest_loops_checkpoint})")

    write_model(model, args.out)
    log(f"final: step {step}, train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
        f"training {elapsed:.0f} s; wrote {args.out} ({Path(args.out).stat().st_size} bytes)")
    n_tokens, perplexity = held_out_perplexity(args.out, val_docs, encoding)
    log(f"held-out perplexity (picogpt, {n_tokens} tokens of {len(val_docs)} documents): {perplexity:.2f} for "
        f"{args.out}")
    if args.compare:
        log(f"held-out perplexity (picogpt, same text): {held_out_perplexity(args.compare, val_docs, encoding)[1]:.2f} "
            f"for {args.compare}")

    demo = picogpt.load(args.out, quiet=True)  # the samples come from picogpt itself, reading the file just written
    held_out_docstrings = [d for d in docstring_docs if is_held_out(d)]
    picks = np.linspace(0, len(held_out_docstrings) - 1, N_HELD_OUT_PROMPTS).astype(int)
    for prompt in [README_PROMPT] + [opening(held_out_docstrings[i]) for i in picks]:
        new = list(generate(demo, encoding.encode(prompt), SAMPLE_TOKENS))
        text, repeat = encoding.decode(new), repeated_phrase(new)
        faults = ([f"repeats {encoding.decode(list(repeat))!r}"] if repeat else []) + (
            ["no complete sentence"] if len(new) < SAMPLE_TOKENS and not holds_a_sentence(text) else [])
        log(f"sample: {prompt!r} -> {text!r}" + (f" ({'; '.join(faults)})" if faults else ""))
    all_openings = [opening(doc) for doc in held_out_docstrings]
    for path in [args.out] + ([args.compare] if args.compare else []):
        log(greedy_loops_line(path, all_openings, encoding))
    log(f"done: {time.perf_counter() - started:.0f} s in this sitting")
    log_file.close()


if __name__ == "__main__":
    main()
