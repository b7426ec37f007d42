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
(not UTF-8, malformed JSON, no text field, empty) gets an output line with an "error" field.
"""

import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import BadArgument, PicogptError, plural
from .outputs import write_atomically
from .generate import generate_batch, left_pad
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
    paths: list  # the file ("jsonl", "lines") or the files ("files")
    offset: int = 0  # "jsonl", "lines": byte offset of the first document's line
    first_line: int = 0  # its line number, from 1
    text_field: str = "text"

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))


def input_files(inputs, exclude=()):
    """The files that INPUT arguments name: files, folders (their .jsonl and .txt files, recursively,
    sorted) and glob patterns (sorted matches), in the order given; each file once, none of `exclude`
    (the output, which may lie among the inputs)."""
    excluded = {Path(p).resolve() for p in exclude}
    files, seen = [], set(excluded)
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise PicogptError(f"the folder {given} holds no .jsonl or .txt files")
        elif path.exists():
            if path.suffix not in SUFFIXES:
                raise PicogptError(f"{given}: expected a .jsonl or .txt file (or a folder of them), not "
                                   f"{path.suffix or 'a file without a suffix'}")
            if path.resolve() in excluded:
                raise PicogptError(f"{given} is the output file (--out); it cannot be an input too")
            found = [path]
        elif glob.has_magic(given):
            found = sorted(Path(p) for p in glob.glob(given, recursive=True) if Path(p).suffix in SUFFIXES)
            if not found:
                raise PicogptError(f"nothing matches {given} (looking for .jsonl and .txt files)")
        else:
            raise PicogptError(f"{given} does not exist; give .jsonl or .txt files, folders or glob patterns")
        for p in found:  # (a folder or pattern that also matches the output leaves it out)
            if p.resolve() not in seen:
                seen.add(p.resolve())
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


def plan(inputs, lines=False, text_field="text", exclude=(), with_files=False):
    """The chunks of a corpus, in input order: a list of Chunk, read from the files' line structure only
    (and the input files, with_files=True)."""
    chunks, n_docs = [], 0

    def add(kind, paths, offset=0, first_line=0, count=0):
        nonlocal n_docs
        chunks.append(Chunk(len(chunks), n_docs, count, kind, [str(p) for p in paths], offset, first_line,
                            text_field))
        n_docs += count

    whole_files, paths = [], input_files(inputs, exclude)
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
            text, error = _decode(Path(path).read_bytes(), path)
            if text is not None and not text.strip():
                text, error = None, "empty"
            docs.append(Document(chunk.first_doc + i, path, text, error))
        return docs
    (path,) = chunk.paths
    lines = _document_lines(path, chunk.offset, chunk.first_line)
    for i, (number, _, raw) in zip(range(chunk.n_docs), lines):
        doc = Document(chunk.first_doc + i, f"{path}:{number}")
        text, doc.error = _decode(raw, f"line {number}")
        if text is not None and chunk.kind == "lines":
            doc.text = text.rstrip("\r\n")
        elif text is not None:
            doc.text, doc.error = _record_text(text, chunk.text_field, doc)
        if doc.text is not None and not doc.text.strip():
            doc.text, doc.error = None, "empty"
        docs.append(doc)
    if len(docs) != chunk.n_docs:
        raise PicogptError(f"{path} changed while the corpus was being read (chunk {chunk.number} expects "
                           f"{chunk.n_docs} documents from line {chunk.first_line}); run the command again")
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
    if not isinstance(record[text_field], str):
        return None, f"the {text_field!r} field is {type(record[text_field]).__name__}, not text"
    return record[text_field], None


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

    def run(self, docs):
        """The output lines of documents, in their order (JSON text, a newline after each), the number of
        tokens they took through the model, and how many have an error field."""
        results = {doc.index: {"id": doc.id, "error": doc.error} for doc in docs if doc.error}
        todo = [(doc, ([EOT] + encode(doc.text)) if self.task == "score" else encode(doc.text))
                for doc in docs if not doc.error]
        work = self._score if self.task == "score" else self._complete
        n_tokens = work(todo, results)
        n_errors = sum("error" in results[doc.index] for doc in docs)
        return "".join(json.dumps(results[doc.index], ensure_ascii=False) + "\n" for doc in docs), n_tokens, n_errors

    def _score(self, todo, results):
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
        for batch in batches_by_length(short, self.batch_tokens):
            tokens, n_pad = left_pad([ids for _, ids in batch])
            logits = self.model(tokens, n_pad=n_pad, all_logits=True)  # [n_batch, longest, n_vocab]
            for row, ((doc, ids), pad) in enumerate(zip(batch, n_pad)):
                # position j predicts token j + 1; these logits are not needed again, so they may be spent
                log_probs = token_log_probs(logits[row, pad:-1], ids[1:])
                results[doc.index] = _score_record(doc, len(ids) - 1, float(log_probs.sum()))
                done += len(ids)
        return done

    def _complete(self, todo, results):
        n_ctx, done = self.model.hparams["n_ctx"], 0
        fits = []
        for doc, ids in todo:
            if len(ids) + self.n_tokens > n_ctx:
                results[doc.index] = {"id": doc.id, "error": f"the document is {len(ids)} tokens; with "
                                      f"{self.n_tokens} new ones it must be at most {n_ctx - self.n_tokens} (the "
                                      f"model's context is {n_ctx})"}
            else:
                fits.append((doc, ids))
        options = {k: v for k, v in self.sampling.items() if k != "seed"}
        for batch in batches_by_length(fits, self.batch_tokens):
            prompts = [ids for _, ids in batch]
            seed = RowRandom(self.sampling.get("seed") or 0, [doc.index for doc, _ in batch]) \
                if options.get("temperature", 0) > 0 else None
            new = generate_batch(self.model, prompts, self.n_tokens, seed=seed, **options)
            for (doc, ids), new_ids in zip(batch, new):
                record = {"id": doc.id, "n_tokens": len(ids), "completion": decode(new_ids)}
                if self.ids:
                    record["ids"] = new_ids
                results[doc.index] = record
                done += len(ids) + len(new_ids)
        return done


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

class CorpusOutput:
    """The output JSONL file and its record of what produced it (OUT.run.json beside it).

    Lines are appended a chunk at a time, flushed and synced, so a kill loses at most the chunk being
    written. Opening an output that exists resumes it: the settings must be the same; a torn last line,
    and any lines of a chunk that was not finished, are cut off, so every chunk is written whole, once.
    """

    def __init__(self, path, settings=None):
        self.path = Path(path)
        self.run_path = self.path.with_name(self.path.name + ".run.json")
        self.settings = settings  # what makes the output (JSON-ready): recorded by open(), or compared with it
        self.done = 0  # documents already in the file
        self._file = None

    def recorded_settings(self):
        """The settings the existing output was made with, or None for a new output."""
        if not self.path.exists():
            return None
        if not self.run_path.exists():
            raise PicogptError(f"{self.path} exists but was not written by this command (there is no "
                               f"{self.run_path.name} beside it); choose another --out or remove it")
        try:
            return json.loads(self.run_path.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError) as e:
            raise PicogptError(f"{self.run_path} is damaged ({e}); remove it and {self.path} to start again") from None

    def open(self, chunks):
        """Check or record the settings, cut the file back to whole chunks; returns the chunks still to do."""
        recorded = self.recorded_settings()
        if recorded is not None:
            changed = sorted(k for k in set(recorded) | set(self.settings) if recorded.get(k) != self.settings.get(k))
            if changed:
                raise PicogptError(f"{self.path} was made with other settings (they differ in {', '.join(changed)}); "
                                   f"run the same command to resume it, or choose another --out to start a new one")
            complete, end = self._complete_lines()
        else:
            write_atomically(self.run_path, (json.dumps({"picogpt": __version__, "settings": self.settings},
                                                         indent=1) + "\n").encode())
            self.path.write_bytes(b"")
            complete, end = [], 0
        total = sum(c.n_docs for c in chunks)
        if len(complete) > total:
            raise PicogptError(f"{self.path} holds {plural(len(complete), 'document')} but the inputs have "
                               f"{total}; run the same command on the same inputs, or choose another --out")
        # Whole chunks only: the chunks are cut the same way every time, so a resumed file is the file an
        # uninterrupted run writes. A torn last line (a kill while writing) goes too.
        remaining = [c for c in chunks if c.first_doc + c.n_docs > len(complete)]
        self.done = remaining[0].first_doc if remaining else total
        cut = complete[self.done] if self.done < len(complete) else end
        if cut < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(cut)
        self._file = open(self.path, "ab", buffering=0)  # unbuffered: a write reaches the file or fails, here
        return remaining

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
            os.fsync(self._file.fileno())
        except OSError as e:
            raise PicogptError(f"cannot write {self.path}: {e.strerror}; {plural(self.done, 'document')} are saved "
                               f"in it: make room and run the same command again to finish") from None
        self.done += n_docs

    def close(self):
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()  # unbuffered: nothing is left to flush, so nothing to fail on
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------------
# Running a plan

class Progress:
    """A progress bar on stderr (documents, documents/s, tokens/s, time left) and the run's totals."""

    def __init__(self, total_docs, done_docs, show=True):
        from tqdm import tqdm
        self.bar = tqdm(total=total_docs, initial=done_docs, unit="doc", dynamic_ncols=True, disable=not show or None,
                        smoothing=0.1, file=sys.stderr)
        self.docs = self.tokens = self.errors = 0
        self.started = time.perf_counter()

    def update(self, n_docs, n_tokens, n_errors):
        self.docs, self.tokens, self.errors = self.docs + n_docs, self.tokens + n_tokens, self.errors + n_errors
        self.bar.update(n_docs)
        self.bar.set_postfix_str(f"{self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s", refresh=False)

    @property
    def seconds(self):
        return time.perf_counter() - self.started

    def close(self):
        self.bar.close()


def run_in_process(job, chunks, output, progress):
    """Run the chunks here, one after the other, appending each chunk's lines as it is done."""
    for chunk in chunks:
        text, n_tokens, n_errors = job.run(read_chunk(chunk))
        output.write(text, chunk.n_docs)
        progress.update(chunk.n_docs, n_tokens, n_errors)
