"""The corpus: Python's own documentation as documents, split by document, as GPT-2 tokens.

Two sources under the PSF licence, read offline in a fixed order: the docstrings of the standard library
that runs this (read with `ast`), and the manual as Debian's python3.11-doc package installs it (HTML
turned into plain paragraphs with the standard library's HTML parser; a document per top-level section).
Each document is a paragraph per line (`reflow`) and follows an <|endoftext|> token. Exact duplicates
go, and a hash of each document's text holds it out or not: whole documents, never lines.
"""

import ast
import hashlib
import html.parser
import re
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from picogpt.tokenizer import EOT

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


def opening(doc, n_words=4):
    """The first few words of a document's first line: a prompt the model never saw continued."""
    return " ".join(doc.splitlines()[0].split()[:n_words])


def held_out_openings(docstring_docs):
    """The openings of the held-out docstrings, in corpus order: the prompts the model is judged on."""
    return [opening(doc) for doc in docstring_docs if is_held_out(doc)]


@dataclass
class Corpus:
    """The documents (docstrings first, then the manual's), their split, and the two token streams."""
    docstrings: list
    docs: list
    train_docs: list
    val_docs: list
    train: np.ndarray
    val: np.ndarray
    digest: str  # of both streams' tokens: which corpus a checkpoint or a log line belongs to


def collect(docs_dir, encoding):
    """Read both sources, drop the manual's documents that a docstring already gave, split and tokenize."""
    docstring_docs = list(docstrings(stdlib_files()))
    seen, docs = set(docstring_docs), list(docstring_docs)
    for doc in docs_documents(docs_dir):
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    train_docs = [d for d in docs if not is_held_out(d)]
    val_docs = [d for d in docs if is_held_out(d)]
    train, val = token_stream(train_docs, encoding), token_stream(val_docs, encoding)
    digest = hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()[:16]
    return Corpus(docstring_docs, docs, train_docs, val_docs, train, val, digest)
