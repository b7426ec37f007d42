"""Whole corpora: score or continue every document of many files, streaming, resumably, in input order.

    from picogpt.corpus import CorpusJob, plan
    job = CorpusJob(model, "score")                        # or "complete", n_tokens=20, sampling options
    chunks = plan(["data/*.jsonl"], text_field="text")     # where the documents are (nothing read yet)
    for chunk in chunks:
        lines = job.run(read_chunk(chunk))                 # one JSON line per document, in input order

`picogpt score-corpus` and `picogpt complete-corpus` run this over an output file that they append to
chunk by chunk (CorpusOutput), so that a killed run, started again with the same command, skips what is
done and finishes the rest; with --ray the chunks go to a Ray cluster instead (picogpt.corpus_ray).

The unit of work is a chunk: up to CHUNK_DOCS documents of one file, described by where they are (file,
byte offset, line number), so that the plan of a whole corpus is small and a worker can read its chunk
itself. Chunks are cut the same way every time, and a chunk's documents are batched the same way whoever
runs it, so the same inputs give the same output file, byte for byte, in one process or on a cluster
(at the same BLAS thread count: OpenBLAS may sum in another order at another),
interrupted or not.

Inputs: .jsonl files (one JSON object per line; the text in --text-field, an "id" carried over when
present), .txt files (one document each, or one per line with lines=True), folders (their .jsonl and
.txt files, sorted) and glob patterns. Blank lines are not documents. A document that cannot be used
(not UTF-8, not valid Unicode, malformed JSON, no text field, empty) gets an output line with an "error"
field. A name that is not UTF-8 (a file's) is shown with \\xNN escapes; every output line is UTF-8 JSON.

Memory before work: CorpusJob refuses, in one sentence naming --batch-tokens, a batch size whose largest
batch would not fit in the memory available (picogpt.memory), before anything is allocated.
"""

import errno
import glob
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, memory
from .errors import BadArgument, PicogptError, first_line, plural, shown
from .generate import generate_batch, left_pad
from .outputs import not_a_file, write_atomically
from .sampling import check_options
from .scoring import score, token_log_probs
from .tokenizer import EOT, decode, encode

CHUNK_DOCS = 64  # documents per chunk: the unit of work, of writing, and of resuming
BATCH_TOKENS = 2048  # padded tokens per forward pass when scoring (the logits are batch x n_vocab float32s)
MAX_BATCH = 32  # documents per batch at most
SUFFIXES = (".jsonl", ".txt")


# ---------------------------------------------------------------------------------------------------
# Where the documents are

@dataclass
class Chunk:
    """Up to CHUNK_DOCS documents of one input: a file's lines from a byte offset on, or whole .txt files."""

    number: int  # the chunk's place in the plan
    first_doc: int  # the input-order number of its first document
    n_docs: int
    kind: str  # "jsonl", "lines" (a .txt file, a document per line) or "files" (a .txt file per document)
    paths: list  # the file ("jsonl", "lines") or the files ("files"), as named (the documents' ids)
    offset: int = 0  # "jsonl", "lines": byte offset of the first document's line
    first_line: int = 0  # its line number, from 1
    text_field: str = "text"
    folder: str = ""  # the folder relative paths are in (the planner's), so that any process reads the same files

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))

    def open_path(self, path):
        return os.path.join(self.folder, path)


def normal_input(given):
    """An INPUT argument as recorded and compared: ./big.jsonl and big.jsonl (and web/ and web) are the same."""
    return str(Path(given)) if given else given


def earlier_output(path):
    """Whether a .jsonl file is the output of an earlier corpus run: its OUT.run.json lies beside it."""
    record = path.with_name(path.name + ".run.json")
    try:
        if not record.is_file() or record.stat().st_size > 1 << 20:
            return False
        data = json.loads(record.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "picogpt" in data and "settings" in data


def input_files(inputs, exclude=(), left_out=None):
    """The files that INPUT arguments name: files, folders (their .jsonl and .txt files, recursively,
    sorted) and glob patterns (sorted matches), in the order given; each file once, none of `exclude`
    (the output, which may lie among the inputs), and no earlier output of a corpus run (a .jsonl with its
    .run.json beside it) that a folder or pattern finds: those go to the list left_out, if given."""
    excluded = {Path(p).resolve() for p in exclude}
    files, seen = [], set(excluded)
    for given in inputs:
        path = Path(given)
        expanded = True  # a folder or a pattern: what it finds may include files that are not corpora
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise PicogptError(f"the folder {shown(given)} holds no .jsonl or .txt files")
        elif path.exists():
            if path.suffix not in SUFFIXES:
                raise PicogptError(f"{shown(given)}: expected a .jsonl or .txt file (or a folder of them), not "
                                   f"{shown(path.suffix) or 'a file without a suffix'}")
            if path.resolve() in excluded:
                raise PicogptError(f"{shown(given)} is the output file (--out); it cannot be an input too")
            if path.suffix == ".jsonl" and earlier_output(path):
                raise PicogptError(f"{shown(given)} is the output of an earlier corpus run "
                                   f"({shown(path.name)}.run.json lies beside it), not a corpus; give the files of "
                                   f"the documents")
            found, expanded = [path], False
        elif glob.has_magic(given):
            found = sorted(Path(p) for p in glob.glob(given, recursive=True) if Path(p).suffix in SUFFIXES)
            if not found:
                raise PicogptError(f"nothing matches {shown(given)} (looking for .jsonl and .txt files)")
        else:
            raise PicogptError(f"{shown(given)} does not exist; give .jsonl or .txt files, folders or glob patterns")
        for p in found:  # (a folder or pattern that also matches the output leaves it out)
            if p.resolve() in seen:
                continue
            seen.add(p.resolve())
            if expanded and p.suffix == ".jsonl" and earlier_output(p):
                if left_out is not None:
                    left_out.append(p)
                continue
            files.append(p)
    return files


def _document_lines(path, offset=0, first_line=1):
    """(line number, byte offset, bytes) of each line of a file that is not blank, from an offset on."""
    with open(path, "rb") as f:
        f.seek(offset)
        number = first_line
        for raw in f:
            if raw.strip():
                yield number, offset, raw
            offset += len(raw)
            number += 1


def plan(inputs, lines=False, text_field="text", exclude=(), with_files=False, left_out=None):
    """The chunks of a corpus, in input order: a list of Chunk, read from the files' line structure only
    (and the input files, with_files=True). Relative paths are read from the folder plan() ran in, by
    whichever process reads a chunk."""
    chunks, n_docs, folder = [], 0, os.getcwd()

    def add(kind, paths, offset=0, first_line=0, count=0):
        nonlocal n_docs
        chunks.append(Chunk(len(chunks), n_docs, count, kind, [str(p) for p in paths], offset, first_line,
                            text_field, folder))
        n_docs += count

    whole_files, paths = [], input_files(inputs, exclude, left_out)
    for path in paths:
        if path.suffix == ".txt" and not lines:
            whole_files.append(path)
            if len(whole_files) == CHUNK_DOCS:
                add("files", whole_files, count=len(whole_files))
                whole_files = []
            continue
        if whole_files:  # a run of whole .txt files ends where another kind of input starts
            add("files", whole_files, count=len(whole_files))
            whole_files = []
        kind = "jsonl" if path.suffix == ".jsonl" else "lines"
        start, count = None, 0
        for number, offset, _ in _document_lines(path):
            if start is None:
                start = (offset, number)
            count += 1
            if count == CHUNK_DOCS:
                add(kind, [path], *start, count)
                start, count = None, 0
        if count:
            add(kind, [path], *start, count)
    if whole_files:
        add("files", whole_files, count=len(whole_files))
    return (chunks, paths) if with_files else chunks


@dataclass
class Document:
    index: int  # its place in the input order
    id: object  # the record's "id", else "FILE:LINE" (or the file, for a whole .txt file)
    text: str | None = None
    error: str | None = None


def _decode(raw, where):
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at {where}, offset {e.start})"


def read_chunk(chunk):
    """The documents of a chunk, read from its files: a list of Document, text or error."""
    docs = []
    if chunk.kind == "files":
        for i, path in enumerate(chunk.paths):
            text, error = _decode(Path(chunk.open_path(path)).read_bytes(), shown(path))
            if text is not None and not text.strip():
                text, error = None, "empty"
            docs.append(Document(chunk.first_doc + i, shown(path), text, error))
        return docs
    (path,) = chunk.paths
    lines = _document_lines(chunk.open_path(path), chunk.offset, chunk.first_line)
    for i, (number, _, raw) in zip(range(chunk.n_docs), lines):
        doc = Document(chunk.first_doc + i, f"{shown(path)}:{number}")
        text, doc.error = _decode(raw, f"line {number}")
        if text is not None and chunk.kind == "lines":
            doc.text = text.rstrip("\r\n")
        elif text is not None:
            doc.text, doc.error = _record_text(text, chunk.text_field, doc)
        if doc.text is not None and not doc.text.strip():
            doc.text, doc.error = None, "empty"
        docs.append(doc)
    if len(docs) != chunk.n_docs:
        raise PicogptError(f"{shown(path)} changed while the corpus was being read (chunk {chunk.number} expects "
                           f"{chunk.n_docs} documents from line {chunk.first_line}); its lines no longer match "
                           f"the plan: give another --out to run the inputs as they are now")
    return docs


def _record_text(line, text_field, doc):
    """(text, error) of a JSON line; sets doc.id from its "id" field when it has one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} (column {e.colno})"
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}"
    if "id" in record:
        doc.id = record["id"]
    if text_field not in record:
        return None, f"no {text_field!r} field"
    text = record[text_field]
    if not isinstance(text, str):
        return None, f"the {text_field!r} field is {type(text).__name__}, not text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, which a JSON escape such as \ud800 can spell
        return None, (f"the {text_field!r} field is not valid Unicode (a lone surrogate \\u{ord(text[e.start]):04x} "
                      f"at character {e.start})")
    return text, None


def check_text_field(chunks):
    """Refuse a --text-field that no record of the first .jsonl chunk has, in one line naming the fields the
    records do have, rather than an error line for every document of the corpus."""
    chunk = next((c for c in chunks if c.kind == "jsonl"), None)
    if chunk is None:
        return
    fields, n_records = Counter(), 0
    lines = _document_lines(chunk.open_path(chunk.paths[0]), chunk.offset, chunk.first_line)
    for _, (_, _, raw) in zip(range(chunk.n_docs), lines):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            if chunk.text_field in record:
                return
            n_records += 1
            fields.update(k for k in record if k != "id")
    if n_records:
        have = ", ".join(repr(k) for k, _ in fields.most_common(5)) or "none but 'id'"
        which = "the first record" if n_records == 1 else f"none of the first {n_records} records"
        raise BadArgument(f"{which} of {shown(chunk.paths[0])} {'has no' if n_records == 1 else 'has a'} "
                          f"{chunk.text_field!r} field (they have {have}); give --text-field the field that holds "
                          f"the text")


# ---------------------------------------------------------------------------------------------------
# The work: a chunk of documents -> their output lines

class RowRandom:
    """One random stream per document, so that what a document samples does not depend on which batch
    it ran in (or on which worker): .random(n) gives one uniform number per row, as choose_next asks."""

    def __init__(self, seed, indices):
        self.streams = [np.random.default_rng([seed, index]) for index in indices]

    def random(self, n):
        assert n == len(self.streams)
        return np.array([stream.random() for stream in self.streams])


@dataclass
class CorpusJob:
    """What to do with each document: "score" it, or "complete" it with n_tokens new tokens."""

    model: object
    task: str  # "score" or "complete"
    stride: int | None = None  # scoring: the sliding window's step for documents longer than the context
    n_tokens: int = 20  # completing: new tokens per document
    sampling: dict = field(default_factory=dict)  # completing: temperature, top_k, top_p, repetition_penalty, seed
    ids: bool = False  # completing: also write the new tokens' ids
    batch_tokens: int = BATCH_TOKENS

    def __post_init__(self):
        if self.task not in ("score", "complete"):
            raise ValueError(f"task must be 'score' or 'complete', not {self.task!r}")
        n_ctx = self.model.hparams["n_ctx"]
        if self.stride is not None and not 1 <= self.stride < n_ctx:
            raise BadArgument(f"the stride must be from 1 to {n_ctx - 1} (less than the model's context of {n_ctx} "
                              f"tokens, so that windows overlap), not {self.stride}")
        if self.task == "complete":
            check_options(**{k: v for k, v in self.sampling.items() if k != "seed"})
            if not 1 <= self.n_tokens < n_ctx:
                raise BadArgument(f"-n must be from 1 to {n_ctx - 1} (the model's context is {n_ctx} tokens)")
        self.check_memory()

    # Memory before work: the largest batch that --batch-tokens allows, estimated before anything runs.

    def largest_batch(self, limit=None):
        """(bytes, {part: bytes}, rows, tokens a row) of the largest batch `limit` padded tokens allow (default
        batch_tokens): up to MAX_BATCH rows of at most limit tokens in all, or one document alone of up to
        the context (as batches_by_length groups them). Scoring keeps every position's logits, [rows, tokens,
        n_vocab] float32; completing runs picogpt.generate's loop, which memory.memory_needed estimates."""
        hparams, limit = self.model.hparams, self.batch_tokens if limit is None else limit
        n_ctx, n_vocab = hparams["n_ctx"], hparams["n_vocab"]
        longest_prompt = n_ctx if self.task == "score" else n_ctx - self.n_tokens
        worst = None
        for rows in range(1, MAX_BATCH + 1):
            length = longest_prompt if rows == 1 else min(longest_prompt, limit // rows)
            if length < 1:
                break
            if self.task == "score":
                parts = memory.memory_needed(hparams, rows, length, length, use_cache=False)
                parts["logits"] = rows * length * n_vocab * 4 + length * n_vocab * 4  # all positions, and a row's work
            else:
                parts = memory.memory_needed(hparams, rows, length, length + self.n_tokens)
            if worst is None or sum(parts.values()) > worst[0]:
                worst = (sum(parts.values()), parts, rows, length)
        return worst

    def check_memory(self):
        """Refuse, in one sentence naming --batch-tokens, a batch size whose largest batch cannot fit in the
        memory available; nothing is allocated before."""
        available = memory.available_memory()
        needed, parts, rows, length = self.largest_batch()
        if available is None or needed <= available:
            return

        def need(parts):
            largest = max(parts, key=parts.get)
            return (f"about {_size(sum(parts.values()))} of memory ({largest} {_size(parts[largest])}) but "
                    f"{_size(available)} is available")
        alone = self.largest_batch(1)  # one document of the longest kind, the least any batch size allows
        if alone[0] > available:
            raise PicogptError(f"a document of {plural(alone[3], 'token')} needs {need(alone[1])}, even alone in its "
                               f"batch; free some memory or use a smaller model")
        low, high = 1, self.batch_tokens  # the largest --batch-tokens that fits
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.largest_batch(middle)[0] <= available else (low, middle - 1)
        raise PicogptError(f"--batch-tokens {self.batch_tokens} lets a batch hold {rows} documents of up to "
                           f"{plural(length, 'token')}, which need {need(parts)}; give a smaller --batch-tokens (at "
                           f"most {low} fits)")

    def run(self, docs, on_batch=None):
        """The output lines of documents, in their order (JSON text, a newline after each), the number of
        tokens they took through the model, and how many have an error field. on_batch(n_docs, n_tokens) is
        called after each batch, for a progress bar."""
        results = {doc.index: {"id": doc.id, "error": doc.error} for doc in docs if doc.error}
        todo = [(doc, ([EOT] + encode(doc.text)) if self.task == "score" else encode(doc.text))
                for doc in docs if not doc.error]
        work = self._score if self.task == "score" else self._complete
        n_tokens = work(todo, results, on_batch or (lambda n_docs, n_tokens: None))
        n_errors = sum("error" in results[doc.index] for doc in docs)
        return "".join(json_line(results[doc.index]) for doc in docs), n_tokens, n_errors

    def _score(self, todo, results, on_batch):
        n_ctx, done = self.model.hparams["n_ctx"], 0
        short = [(doc, ids) for doc, ids in todo if len(ids) <= n_ctx]
        for doc, ids in todo:
            if len(ids) > n_ctx:  # a sliding window, one document at a time (scoring.score)
                stride = self.stride or max(1, n_ctx // 2)
                result = score(self.model, ids, stride=stride)
                windows = 1 + math.ceil((len(ids) - n_ctx) / stride)
                results[doc.index] = _score_record(doc, result.n_tokens, result.log_prob, windows=windows,
                                                   stride=stride)
                done += len(ids)
                on_batch(1, len(ids))
        for batch in batches_by_length(short, self.batch_tokens):
            tokens, n_pad = left_pad([ids for _, ids in batch])
            logits = self.model(tokens, n_pad=n_pad, all_logits=True)  # [n_batch, longest, n_vocab]
            for row, ((doc, ids), pad) in enumerate(zip(batch, n_pad)):
                # position j predicts token j + 1; these logits are not needed again, so they may be spent
                log_probs = token_log_probs(logits[row, pad:-1], ids[1:])
                results[doc.index] = _score_record(doc, len(ids) - 1, float(log_probs.sum()))
                done += len(ids)
            del logits
            on_batch(len(batch), sum(len(ids) for _, ids in batch))
        return done

    def _complete(self, todo, results, on_batch):
        n_ctx, done = self.model.hparams["n_ctx"], 0
        fits = []
        for doc, ids in todo:
            if len(ids) + self.n_tokens > n_ctx:
                results[doc.index] = {"id": doc.id, "error": f"the document is {len(ids)} tokens; with "
                                      f"{self.n_tokens} new ones it must be at most {n_ctx - self.n_tokens} (the "
                                      f"model's context is {n_ctx})"}
            else:
                fits.append((doc, ids))
        failures = []
        for batch in batches_by_length(fits, self.batch_tokens):
            try:
                new = self._continue(batch)
            except DOCUMENT_FAILURES:  # find which document fails, alone, and go on with the others
                new = []
                for item in batch:
                    try:
                        new += self._continue([item])
                    except DOCUMENT_FAILURES as e:
                        new.append(e)
            for (doc, ids), new_ids in zip(batch, new):
                if isinstance(new_ids, Exception):
                    failures.append(first_line(new_ids))
                    results[doc.index] = {"id": doc.id, "error": f"cannot continue it: {failures[-1]}"}
                    continue
                record = {"id": doc.id, "n_tokens": len(ids), "completion": decode(new_ids)}
                if self.ids:
                    record["ids"] = new_ids
                results[doc.index] = record
                done += len(ids) + len(new_ids)
            on_batch(len(batch), sum(len(ids) for _, ids in batch))
        if fits and len(failures) == len(fits):  # not the documents: the settings or the model
            raise PicogptError(f"continuing fails for every document of the chunk: {failures[0]}")
        return done

    def _continue(self, batch):
        options = {k: v for k, v in self.sampling.items() if k != "seed"}
        seed = RowRandom(self.sampling.get("seed") or 0, [doc.index for doc, _ in batch]) \
            if options.get("temperature", 0) > 0 else None
        return generate_batch(self.model, [ids for _, ids in batch], self.n_tokens, seed=seed, **options)


# What continuing one document may raise for that document alone: its line gets an error field. A
# PicogptError of the whole run (NaN logits of a damaged model) fails every document, and so stops the run.
DOCUMENT_FAILURES = (PicogptError, ValueError, KeyError, IndexError, FloatingPointError)


def json_line(record):
    """A record as one line of UTF-8 JSON: its text as it is, or, where it holds a lone surrogate (an id
    spelled \\ud800 in its input), that character as a JSON escape, so the line is still valid and the same
    value."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


def batches_by_length(items, limit):
    """(document, token ids) pairs grouped by length, shortest first (ties in their given order), so that
    each batch's rows padded to its longest hold at most `limit` tokens and MAX_BATCH rows: the same
    grouping whoever runs the chunk."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i][1]), i))
    batch = []
    for item in (items[i] for i in order):
        if batch and (len(item[1]) * (len(batch) + 1) > limit or len(batch) == MAX_BATCH):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _score_record(doc, n_tokens, log_prob, **extra):
    mean_nll = -log_prob / n_tokens
    return {"id": doc.id, "n_tokens": n_tokens, "log_prob": round(log_prob, 6), "mean_nll": round(mean_nll, 6),
            "perplexity": round(math.exp(mean_nll), 6), **extra}


# ---------------------------------------------------------------------------------------------------
# The output file: appended chunk by chunk, resumable

STREAMS = ("a character device", "a named pipe")  # outputs written through as they come, without resuming


class StreamClosed(PicogptError):
    """The reader of a streamed output (a pipe) went away: the command ends quietly, as a shell tool does."""


class CorpusOutput:
    """The output JSONL file and its record of what produced it (OUT.run.json beside it).

    Lines are appended a chunk at a time, flushed and synced, so a kill loses at most the chunk being
    written. Opening an output that exists resumes it: the settings must be the same; a torn last line,
    and any lines of a chunk that was not finished, are cut off, so every chunk is written whole, once.

    A character device or a named pipe (/dev/stdout, /dev/null, a FIFO) is written through as the lines
    come, with no OUT.run.json beside it and no resuming, which needs a file that can be read back and
    cut; it is never replaced. A block device (a disk) or a socket is refused.
    """

    def __init__(self, path, settings=None):
        self.path = Path(path)
        self.run_path = self.path.with_name(self.path.name + ".run.json")
        self.settings = settings  # what makes the output (JSON-ready): recorded by open(), or compared with it
        self.done = 0  # documents already in the file
        self.written = 0  # documents this run wrote
        self.created = False  # whether this run made the file (and its record)
        self.notes = []  # one-line notices for the user: an output recorded by an earlier picogpt
        self._file = self._cut = None
        self.kind = not_a_file(self.path)  # None: a file, or nothing yet
        self.existed = self.path.exists()
        self.stream = self.kind in STREAMS
        if self.kind == "a folder":
            raise PicogptError(f"{shown(self.path)} is a folder; give a file name, such as "
                               f"{shown(self.path / 'scores.jsonl')}")
        if self.kind == "a block device":
            raise PicogptError(f"{shown(self.path)} is a block device (a disk), not a file: the lines would be "
                               f"written over it; give a file name (a resumable output), or a pipe or /dev/stdout "
                               f"to stream them")
        if self.kind is not None and not self.stream:
            raise PicogptError(f"{shown(self.path)} is {self.kind}, not a file; give a file name (a resumable "
                               f"output), or a pipe or /dev/stdout to stream the lines")
        run_kind = None if self.stream else not_a_file(self.run_path)
        if run_kind is not None:
            raise PicogptError(f"{shown(self.run_path)} is {run_kind}, not a file, so the record of {shown(self.path)} "
                               f"cannot be kept beside it; choose another --out")

    def recorded_settings(self):
        """The settings the existing output was made with, or None for a new output (or a stream)."""
        if self.stream or not self.existed:
            return None
        if not self.run_path.exists():
            if self.path.stat().st_size == 0:  # an empty file (a shell's > redirection): nothing to lose
                return None
            raise PicogptError(f"{shown(self.path)} exists but was not written by this command (there is no "
                               f"{shown(self.run_path.name)} beside it); choose another --out")
        try:
            return json.loads(self.run_path.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PicogptError(f"{shown(self.run_path)} is damaged ({first_line(e)}); choose another --out, or "
                               f"remove it and {shown(self.path)} to start again") from None

    def plan(self, chunks):
        """Check the settings against those recorded, and find what is left to do, writing nothing: the
        chunks still to do. start() then makes or opens the file."""
        recorded = self.recorded_settings()
        total = sum(c.n_docs for c in chunks)
        if recorded is None:
            self.done, self._cut = 0, None
            return list(chunks)
        problem = self._difference(recorded)
        if problem:
            raise PicogptError(problem)
        complete, end = self._complete_lines()
        if len(complete) > total:
            raise PicogptError(f"{shown(self.path)} holds {plural(len(complete), 'document')} but the inputs have "
                               f"{total}, so it was not made from them; give another --out")
        # Whole chunks only: the chunks are cut the same way every time, so a resumed file is the file an
        # uninterrupted run writes. A torn last line (a kill while writing) goes too.
        remaining = [c for c in chunks if c.first_doc + c.n_docs > len(complete)]
        self.done = remaining[0].first_doc if remaining else total
        self._cut = complete[self.done] if self.done < len(complete) else end
        return remaining

    def start(self):
        """Make the output (and record its settings), or cut an existing one back to whole chunks; then open
        it to append."""
        if self.stream:
            self._file = open(self.path, "ab", buffering=0)  # a pipe with no reader yet waits for one, as for `>`
            return
        if self._cut is None:
            write_atomically(self.run_path, (json.dumps({"picogpt": __version__, "settings": self.settings},
                                                         indent=1) + "\n").encode())
            self.created = True
            self.path.write_bytes(b"")
        elif self._cut < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(self._cut)
        self._file = open(self.path, "ab", buffering=0)  # unbuffered: a write reaches the file or fails, here

    def open(self, chunks):
        """plan() and start(): the chunks still to do."""
        remaining = self.plan(chunks)
        self.start()
        return remaining

    def _difference(self, recorded):
        """One sentence on how this run differs from the one that made the output (and what to do), or None.
        An output recorded before picogpt noted BLAS thread counts resumes at any count, with a note."""
        out, now = shown(self.path), self.settings
        if "threads" not in recorded and "threads" in now:
            recorded = dict(recorded, threads=now["threads"])
            self.notes.append(f"{out} was begun by an earlier picogpt, which did not record its BLAS thread count: "
                              f"resuming with {now['threads']}; its lines equal an uninterrupted run's only if that "
                              f"was the count then")
        recorded = dict(recorded, inputs=[normal_input(i) for i in recorded.get("inputs") or []])
        changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
        if not changed:
            return None
        names = " ".join(shown(i) for i in recorded["inputs"])
        if "inputs" in changed:
            return (f"{out} was begun on other inputs ({names}); give those to resume it, or another --out to start a "
                    f"new one")
        if "input_files" in changed:
            then = dict(map(tuple, recorded.get("input_files") or []))
            nowf = dict(map(tuple, now.get("input_files") or []))
            for name in list(then) + list(nowf):
                if name not in nowf:
                    what = f"{shown(name)}, one of its inputs, is gone"
                elif name not in then:
                    what = f"the inputs now include {shown(name)}, which it was begun without"
                elif then[name] != nowf[name]:
                    what = (f"{shown(name)} has {'grown' if nowf[name] > then[name] else 'changed'} since it was begun "
                            f"({then[name]:,} bytes then, {nowf[name]:,} now)")
                else:
                    continue
                return (f"{what}, so the lines in {out} no longer match the inputs; give another --out to run the "
                        f"inputs as they are now (or put the inputs back as they were to finish {out})")
        if "threads" in changed:
            return (f"{out} was made with {recorded['threads']} BLAS threads and this run has {now.get('threads')} "
                    f"(a score may then differ in its last digits); give --threads {recorded['threads']} (on Ray: "
                    f"--threads-per-worker {recorded['threads']}) to resume it, or another --out to start a new one")
        if {"model", "model_sha256"} & set(changed):
            return (f"{out} was made with another model ({shown(recorded.get('model'))}); give that model to resume "
                    f"it, or another --out to start a new one")
        shown_values = "; ".join(f"{k}: {_brief(recorded.get(k))} then, {_brief(now.get(k))} now" for k in changed)
        return (f"{out} was made with other settings ({shown_values}); give the same options to resume it, or another "
                f"--out to start a new one")

    def _complete_lines(self):
        """Byte offsets of the file's complete lines (ending in a newline, holding JSON), and where they end."""
        offsets, offset = [], 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    json.loads(raw)
                except ValueError:
                    break
                offsets.append(offset)
                offset += len(raw)
        return offsets, offset

    def write(self, text, n_docs):
        """Append one chunk's lines (n_docs of them), flushed to the disk before returning."""
        data = memoryview(text.encode("utf-8"))
        try:
            while data:  # a raw file may take part of the bytes at a time
                data = data[self._file.write(data):]
            if not self.stream:
                os.fsync(self._file.fileno())
        except OSError as e:
            if self.stream and e.errno == errno.EPIPE:
                raise StreamClosed(f"the reader of {shown(self.path)} has closed it") from None
            if self.stream:
                went = f"{plural(self.done, 'document')} went through it, and " if self.done else ""
                raise PicogptError(f"cannot write {shown(self.path)}: {e.strerror}; {went}a stream cannot be resumed: "
                                   f"give a file name (a resumable output) or another device") from None
            raise PicogptError(f"cannot write {shown(self.path)}: {e.strerror}; {plural(self.done, 'document')} are "
                               f"saved in it: make room and run the same command again to finish") from None
        self.done += n_docs
        self.written += n_docs

    def close(self, discard_unused=False):
        """Close the file. discard_unused: a run that made the file and wrote nothing (it failed or was
        stopped before its first chunk) removes the file and its record, leaving nothing."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()  # unbuffered: nothing is left to flush, so nothing to fail on
            except OSError:
                pass
        if discard_unused and self.created and not self.written:
            # (an empty file that was there before, such as a shell's `>` made, stays: not this command's)
            for path in (self.run_path,) if self.existed else (self.path, self.run_path):
                try:
                    path.unlink()
                except OSError:
                    pass
            self.created = False


def _size(n_bytes):
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.0f} MB"


def _brief(value):
    text = "none" if value is None else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------------
# Running a plan

class Progress:
    """A progress bar on stderr (documents, documents/s, tokens/s, time left) and the run's totals.

    The bar moves as batches are done (advance); the totals count what is written (update), chunk by
    chunk. Before the first document, status() says what the run is waiting for (Ray's start-up)."""

    def __init__(self, total_docs, done_docs, show=True):
        from tqdm import tqdm
        self.total, self.initial = total_docs, done_docs
        self.bar = tqdm(total=total_docs, initial=done_docs, unit="doc", dynamic_ncols=True, disable=not show or None,
                        smoothing=0.1, file=sys.stderr)
        self.docs = self.tokens = self.errors = 0  # written
        self.shown_docs = self.shown_tokens = 0  # computed, as the bar shows them
        self.started = time.perf_counter()

    def status(self, text):
        """What the run is doing before its documents move the bar ("starting 2 Ray actors"), or "" once they do."""
        self.bar.set_description_str(text, refresh=True)

    def advance(self, n_docs, n_tokens):
        """Documents computed (a batch): the bar moves, never past the total."""
        n_docs = max(0, min(n_docs, self.total - self.initial - self.shown_docs))
        self.shown_docs += n_docs
        self.shown_tokens += n_tokens
        self.bar.update(n_docs)
        self._rate()

    def update(self, n_docs, n_tokens, n_errors):
        """A chunk written: the totals, and the bar moved to at least them."""
        self.docs, self.tokens, self.errors = self.docs + n_docs, self.tokens + n_tokens, self.errors + n_errors
        if self.docs > self.shown_docs:
            self.bar.update(self.docs - self.shown_docs)
            self.shown_docs = self.docs
        self.shown_tokens = max(self.shown_tokens, self.tokens)
        self._rate()

    def _rate(self):
        self.bar.set_postfix_str(f"{self.shown_tokens / max(self.seconds, 1e-9):,.0f} tokens/s", refresh=False)

    def write(self, line):
        """A line on stderr that leaves the bar whole."""
        self.bar.write(line, file=sys.stderr)

    @property
    def seconds(self):
        return time.perf_counter() - self.started

    def close(self):
        self.bar.close()


def run_in_process(job, chunks, output, progress):
    """Run the chunks here, one after the other, appending each chunk's lines as it is done."""
    for chunk in chunks:
        text, n_tokens, n_errors = job.run(read_chunk(chunk), on_batch=progress.advance)
        output.write(text, chunk.n_docs)
        progress.update(chunk.n_docs, n_tokens, n_errors)
